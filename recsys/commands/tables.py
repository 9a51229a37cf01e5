"""``recsys tables CKPT``: the embedding tables of a checkpoint, and what managed tables hold.

Per table-owning feature: its kind, rows, width, probes and vocabulary rows (0: raw ids); for a
managed table also its occupancy (share of slots holding an id, the default row left out),
admissions and evictions since training began, and ids pending admission.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recsys.commands.table import example


def rows_of(model) -> list[dict]:  # noqa: ANN001 (a CTRModule)
    layer = model.embedding
    stats = layer.managed_statistics()
    out = []
    for owner, plan in layer.plans.items():
        row = {"feature": owner, "kind": plan.kind, "rows": plan.rows, "dim": plan.dim, "probes": plan.probes}
        row["vocabulary_rows"] = plan.vocab_rows
        for key in ("occupancy", "admissions", "evictions", "pending"):
            if f"managed/{owner}/{key}" in stats:
                row[key] = stats[f"managed/{owner}/{key}"]
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="recsys tables",
        description=__doc__,
        epilog=example("tables"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ckpt", help="checkpoint written by `recsys fit` (a .ckpt file or a sharded directory)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from recsys.train.checkpoint import load_model  # lightning import kept out of `--help`

    try:
        model = load_model(args.ckpt)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"recsys tables: {err}", file=sys.stderr)
        return 1
    rows = rows_of(model)
    print(f"{'feature':<16} {'kind':<9} {'rows':>10} {'dim':>4} {'vocab rows':>10}  managed")
    for r in rows:
        managed = (
            f"occupancy {r['occupancy']:.1%}, {r['admissions']:,.0f} admitted, {r['evictions']:,.0f} evicted, "
            f"{r['pending']:,.0f} pending"
            if "occupancy" in r
            else ""
        )
        vocab = "raw ids" if r["vocabulary_rows"] == 0 else f"{r['vocabulary_rows']:,}"
        print(f"{r['feature']:<16} {r['kind']:<9} {r['rows']:>10,} {r['dim']:>4} {vocab:>10}  {managed}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0
