"""``recsys optembed``: arguments and printing; the work is in ``recsys.train.optembed``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recsys.commands.table import example
from recsys.embedding.optembed import ARTIFACT
from recsys.train import optembed, optembed_run
from recsys.train.optembed import SearchConfig, search, search_config
from recsys.train.optembed_run import pipeline


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """The search's own flags (shared by ``recsys optembed search`` and ``recsys optembed run``)."""
    parser.add_argument("--budget", type=float, help="max embedding parameters as a fraction of the full tables' (0-1]")
    defaults = SearchConfig()
    for name in ("population", "generations", "keep", "mutations", "crossovers", "seed", "dim_step"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--mutation-prob", type=float, default=defaults.mutation_prob)
    parser.add_argument("--batch-size", type=int, default=8192, help="val rows per batch while embedding the split")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys optembed search",
        description=optembed.__doc__,
        epilog=example("optembed"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ckpt", required=True, help="supernet checkpoint (.ckpt file or sharded checkpoint dir)")
    parser.add_argument("--out", required=True, help="output directory (optembed.pt, search.json, pareto.csv/png)")
    parser.add_argument("--data", help="dataset directory (default: the one the supernet was trained on)")
    add_search_arguments(parser)
    return parser


USAGE = """usage: recsys optembed run --config MODEL.yaml --config configs/embedding/optembed_supernet.yaml --out DIR
       recsys optembed search --ckpt SUPERNET --out DIR [--budget B]
(recsys optembed run --help, recsys optembed search --help)"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("search", "run"):
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] == "run":
        return run_main(argv[1:])
    args = build_parser().parse_args(argv[1:])
    try:
        config = search_config(args)
    except ValueError as err:
        print(f"recsys optembed search: {err}", file=sys.stderr)
        return 2
    result = search(args.ckpt, args.out, config, data=args.data, batch_size=args.batch_size)
    print(
        json.dumps({k: result[k] for k in ("dims", "kept_rows", "val_auc", "full_dims_val_auc", "sparsity")}, indent=2)
    )
    print(
        f"wrote {args.out}/{ARTIFACT}; retrain with --config configs/embedding/optembed_retrain.yaml "
        f"--model.init_args.embedding.artifact {args.out}"
    )
    return 0


def run_main(argv: list[str]) -> int:
    """``recsys optembed run``."""
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="recsys optembed run",
        description=optembed_run.__doc__,
        epilog=example("optembed"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", action="append", required=True, help="LightningCLI config(s), as for recsys fit")
    parser.add_argument("--out", required=True, help="pipeline directory (a rerun resumes at the first stage to do)")
    add_search_arguments(parser)
    args = parser.parse_args(argv)
    try:
        result = pipeline(args.config, Path(args.out), args, extra)
    except (ValueError, FileNotFoundError) as err:
        print(f"recsys optembed run: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in result.items() if k not in ("dims", "kept_rows")}, indent=2))
    return 0
