"""``recsys export``: arguments and printing; the work is in ``recsys.export.exporter``."""

from __future__ import annotations

import argparse
import json
import sys

from recsys.commands.table import example
from recsys.export import exporter
from recsys.export.exporter import MANIFEST, export


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys export",
        description=exporter.__doc__,
        epilog=example("export"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint: a .ckpt file or a sharded checkpoint directory")
    parser.add_argument("--out", required=True, help="export directory to create")
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "fp16", "int8", "int4"],
        help="table storage: floats, or FBGEMM row-wise quantized int8/int4 (default fp32)",
    )
    parser.add_argument("--data", help="dataset directory holding vocab/ (default: the one the model was trained on)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--since",
        help="the previous export of a chain (full or delta): write only the rows that changed since it, "
        "beside it (recsys serve --watch DIR applies the chain while serving)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = export(args.ckpt, args.out, args.dtype, data=args.data, force=args.force, since=args.since)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
        print(f"recsys export: {err}", file=sys.stderr)
        return 1
    manifest = json.loads((out / MANIFEST).read_text())
    table_bytes = sum(manifest["files"][e["file"]]["bytes"] for e in manifest["tables"])
    if manifest["kind"] == "delta":
        changed = sum(e["changed_rows"] for e in manifest["tables"])
        print(
            f"wrote {out}: delta {manifest['sequence']} on {manifest['previous']}, {changed:,} changed row(s), "
            f"{table_bytes:,} table bytes; a server watching {out.parent} applies it"
        )
        return 0
    print(
        f"wrote {out}: {len(manifest['tables'])} table(s), {table_bytes:,} table bytes ({args.dtype}), "
        f"{len(manifest['files'])} files; serve with: recsys serve {out}"
    )
    return 0
