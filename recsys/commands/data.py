"""``recsys data``: arguments and printing; the work is in ``recsys.data.check``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recsys.commands.table import example
from recsys.data import check as data_check
from recsys.data.check import check


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "check":
        print("usage: recsys data check DIR [--json FILE]   (recsys data check --help)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog="recsys data check",
        description=data_check.__doc__,
        epilog=example("data"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", help="dataset directory (schema.yaml + train/ val/ test/)")
    parser.add_argument("--json", help="also write the findings to this JSON file")
    args = parser.parse_args(argv[1:])
    report = check(args.directory)
    for title, items in (("errors", report.errors), ("notes", report.notes)):
        if items:
            print(f"{len(items)} {title}:")
            for finding in items:
                print(f"  - {finding.text()}")
    rows = ", ".join(f"{k} {v:,}" for k, v in report.rows.items())
    verdict = "FAILED" if report.errors else "OK"
    print(
        f"{args.directory}: {verdict} — {len(report.errors)} error(s), "
        f"{len(report.notes)} note(s); rows: {rows or 'none'}"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"ok": not report.errors, "rows": report.rows, "findings": [f.__dict__ for f in report.findings]},
                indent=2,
            )
        )
    return 1 if report.errors else 0
