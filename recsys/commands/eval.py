"""``recsys eval``: arguments and printing; the work is in ``recsys.eval.report``."""

from __future__ import annotations

import argparse
import math
import sys

from recsys.commands.table import example
from recsys.data.arrow import DataError
from recsys.data.days import is_split
from recsys.data.schema import SchemaError
from recsys.eval.report import evaluate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys eval",
        epilog=example("eval"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Offline CTR evaluation of a checkpoint: AUC, GAUC, logloss, RelaImpr against a "
        "baseline report, 95%% bootstrap intervals and a reliability plot.",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint written by `recsys fit`")
    parser.add_argument("--data", help="dataset directory (default: the one the model was trained on)")
    parser.add_argument(
        "--split",
        default="test",
        type=_split,
        help="split to score: train, val, test, or one day of a day-partitioned dataset, train/day=YYYY-MM-DD "
        "(default: test)",
    )
    parser.add_argument("--out", help="output directory (default: <run dir>/eval_<split>)")
    parser.add_argument("--baseline", help="another report.json; adds RelaImpr against it")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (0: none)")
    parser.add_argument("--batch-size", type=int, default=8192, help="rows per scoring batch")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return parser


def _split(name: str) -> str:
    if not is_split(name):
        raise argparse.ArgumentTypeError(f"{name!r}: one of train, val, test or train/day=YYYY-MM-DD")
    return name


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = evaluate(
            args.ckpt, args.data, args.split, args.out, args.baseline, args.bootstrap, args.batch_size, args.seed
        )
    except (FileNotFoundError, DataError, SchemaError, ValueError) as err:
        print(f"recsys eval: error: {err}", file=sys.stderr)
        return 2
    ci = report["ci95"]
    summary = "  ".join(
        (f"{k}={report[k]:.4f}" if math.isfinite(report[k]) else f"{k}=undefined")
        + (f" [{ci[k][0]:.4f}, {ci[k][1]:.4f}]" if k in ci and all(map(math.isfinite, ci[k])) else "")
        for k in ("auc", "gauc", "logloss")
    )
    print(f"[recsys eval] {report['split']} ({report['rows']:,} rows): {summary}")
    if not math.isfinite(report["auc"]):
        print(
            f"[recsys eval] AUC is undefined: the {report['split']} split has one class only "
            f"(positive rate {report['positive_rate']:.3f}); report.json holds null",
            file=sys.stderr,
        )
    if "rela_impr_auc" in report:
        print(
            "[recsys eval] RelaImpr vs baseline: AUC "
            f"{report['rela_impr_auc']:+.2f}%  GAUC {report['rela_impr_gauc']:+.2f}%"
        )
    print(f"[recsys eval] report: {report['out']}/report.md  (report.json, reliability.png, predictions.parquet)")
    return 0 if all(math.isfinite(report[k]) for k in ("auc", "logloss")) else 1
