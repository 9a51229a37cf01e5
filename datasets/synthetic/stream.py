"""A drifting click stream, day by day: Criteo-shaped rows where new ids keep arriving and old ones fade.

::

    <out>/schema.yaml                        13 numeric + 26 categorical features (counts configurable)
    <out>/train/day=2024-01-01/part-00000.parquet
    ...                                      one folder per day (recsys.data.days)
    <out>/STREAM.json                        per day: rows, share of ids first seen that day, planted AUC

The first ``--drifting`` categorical features are catalogues (users, items, ads): each day a share
``--new-share`` of the catalogue's positions get brand-new ids, anywhere in the Zipf popularity order,
so the ids they replace fade out and the new ones are popular at once. Every id has its own planted
click weight, drawn when it first appears; the other categorical features are static Zipf ids. So a
model whose vocabulary was built on day 1 reads every new id as OOV and loses AUC day after day, while
a table that admits new ids can learn them. Ids are large scattered int64 values (real logs carry
hashes, not dense indices).

    python datasets/synthetic/stream.py --days 8 --rows-per-day 500000 --out data/stream
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from recsys.data.writer import SplitWriter, criteo_schema_yaml

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def scattered(counter: np.ndarray, feature: int) -> np.ndarray:
    """Distinct counters → distinct positive int64 ids that look like hashes (an odd multiplier is a
    bijection modulo 2⁶⁴; the top bit is dropped, the feature keeps the ids of features apart)."""
    with np.errstate(over="ignore"):
        mixed = (counter.astype(np.uint64) + np.uint64(feature) * np.uint64(1 << 40)) * GOLDEN
    return (mixed >> np.uint64(1)).astype(np.int64)


class Catalogue:
    """One drifting feature: ``size`` positions in Zipf popularity order, each holding an id."""

    def __init__(self, feature: int, size: int, zipf: float, signal: float, rng: np.random.Generator) -> None:
        self.feature, self.signal = feature, signal
        p = 1.0 / np.arange(1, size + 1) ** zipf
        self.cdf = np.cumsum(p / p.sum())
        self.counter = size  # ids 0..size-1 exist on day 1
        self.position_ids = np.arange(size)  # counter of the id at each position
        self.weights = rng.normal(0, signal, size).astype(np.float32)  # by counter

    def renew(self, share: float, rng: np.random.Generator) -> None:
        """A share of the positions (uniform over popularity) get new ids with new weights."""
        chosen = np.flatnonzero(rng.random(len(self.position_ids)) < share)
        fresh = np.arange(self.counter, self.counter + len(chosen))
        self.counter += len(chosen)
        self.position_ids[chosen] = fresh
        self.weights = np.concatenate([self.weights, rng.normal(0, self.signal, len(chosen)).astype(np.float32)])

    def draw(self, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(ids [rows], planted weights [rows])."""
        position = np.minimum(np.searchsorted(self.cdf, rng.random(rows)), len(self.cdf) - 1)
        counters = self.position_ids[position]
        return scattered(counters, self.feature), self.weights[counters]


def generate(
    out: Path,
    days: int = 8,
    rows_per_day: int = 500_000,
    first_day: str = "2024-01-01",
    num_dense: int = 13,
    num_sparse: int = 26,
    drifting: int = 6,
    catalogue: int = 50_000,
    static_cardinality: int = 10_000,
    new_share: float = 0.2,
    zipf: float = 1.05,
    signal: float = 0.8,
    seed: int = 0,
    row_group_size: int = 65_536,
) -> dict:
    if not 1 <= drifting <= num_sparse:
        raise ValueError(f"--drifting must be between 1 and --num-sparse ({num_sparse}), got {drifting}")
    rng = np.random.default_rng(seed)
    sizes = np.geomspace(max(catalogue // 20, 10), catalogue, drifting).astype(np.int64)
    per_feature = signal / np.sqrt(num_sparse / 4)
    catalogues = [Catalogue(f, int(n), zipf, per_feature * 1.5, rng) for f, n in enumerate(sizes)]
    static = [
        Catalogue(drifting + f, int(n), zipf, per_feature * 0.5, rng)
        for f, n in enumerate(np.geomspace(10, static_cardinality, num_sparse - drifting).astype(np.int64))
    ]
    dense_weights = rng.normal(0, 0.3, num_dense).astype(np.float32)
    schema = pa.schema(
        [("label", pa.int8())]
        + [(f"I{i}", pa.float32()) for i in range(1, num_dense + 1)]
        + [(f"C{i}", pa.int64()) for i in range(1, num_sparse + 1)]
    )
    seen = [set() for _ in range(drifting)]
    report = []
    start = dt.date.fromisoformat(first_day)
    from recsys.eval.metrics import auc

    for d in tqdm(range(days), desc=f"stream {out.name}", unit="day"):
        if d:
            for c in catalogues:
                c.renew(new_share, rng)
        day = (start + dt.timedelta(days=d)).isoformat()
        dense = rng.gamma(1.5, 1.0, (rows_per_day, num_dense)).astype(np.float32)
        logit = -1.2 + (dense - 1.5) @ dense_weights
        columns, new = [], []
        for i, c in enumerate([*catalogues, *static]):
            ids, weights = c.draw(rows_per_day, rng)
            logit += weights
            columns.append(ids)
            if i < drifting:
                distinct = np.unique(ids)
                new.append(float(np.mean([v not in seen[i] for v in distinct.tolist()])))
                seen[i].update(distinct.tolist())
        label = (rng.random(rows_per_day) < 1 / (1 + np.exp(-logit))).astype(np.int8)
        arrays = [pa.array(label)] + [pa.array(dense[:, j]) for j in range(num_dense)]
        table = pa.Table.from_arrays(arrays + [pa.array(c) for c in columns], schema=schema)
        writer = SplitWriter(out, f"train/day={day}", schema, row_group_size=row_group_size)  # ranks share row groups
        writer.write(table)
        writer.close()
        report.append(
            {
                "day": day,
                "rows": rows_per_day,
                "positive_rate": float(label.mean()),
                "new_id_share": new,  # per drifting feature: distinct ids of the day not seen before
                "planted_auc": auc(label, logit),
            }
        )
    title = f"drifting click stream: {days} days × {rows_per_day:,} rows, seed {seed}"
    (out / "schema.yaml").write_text(criteo_schema_yaml(title, num_dense, num_sparse))
    info = {
        "days": report,
        "drifting_features": [f"C{i}" for i in range(1, drifting + 1)],
        "catalogue_sizes": sizes.tolist(),
        "new_share": new_share,
        "seed": seed,
    }
    (out / "STREAM.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    parser.add_argument("--days", type=int, default=8)
    parser.add_argument("--rows-per-day", type=int, default=500_000)
    parser.add_argument("--first-day", default="2024-01-01")
    parser.add_argument("--num-dense", type=int, default=13)
    parser.add_argument("--num-sparse", type=int, default=26)
    parser.add_argument("--drifting", type=int, default=6, help="categorical features whose ids drift")
    parser.add_argument("--catalogue", type=int, default=50_000, help="ids alive at once in the largest drifting one")
    parser.add_argument("--new-share", type=float, default=0.2, help="share of a catalogue renewed each day")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.days < 2 or args.rows_per_day < 100:
        parser.error("--days must be at least 2 and --rows-per-day at least 100")
    info = generate(
        args.out,
        args.days,
        args.rows_per_day,
        args.first_day,
        args.num_dense,
        args.num_sparse,
        args.drifting,
        args.catalogue,
        new_share=args.new_share,
        seed=args.seed,
    )
    for day in info["days"]:
        print(
            f"{day['day']}: {day['rows']:,} rows, new ids {np.mean(day['new_id_share']):.0%} of the drifting "
            f"features' distinct ids, planted AUC {day['planted_auc']:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
