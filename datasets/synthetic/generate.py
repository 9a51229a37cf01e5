"""Synthetic Criteo-shaped click data of any size, written in the recsys contract, for scale tests.

13 numeric + 26 categorical features (counts configurable). Categorical ids are Zipf-distributed
over cardinalities spread log-uniformly from 10 to ``--max-cardinality``, like Criteo's. Clicks
carry a planted signal: ``P(click) = sigmoid(bias + Σ_f w_f[id_f] + v · dense)`` with fixed random
per-id weights, so a model that learns the tables beats the base rate (the planted logit's own AUC
is printed). Rows are generated and written in chunks: memory stays bounded at any size.

    python datasets/synthetic/generate.py --rows 2000000 --out data/synthetic-2m
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from recsys.data.arrow import SPLITS
from recsys.data.writer import SplitWriter, criteo_schema_yaml


class Generator:
    def __init__(
        self,
        num_dense: int = 13,
        num_sparse: int = 26,
        max_cardinality: int = 1_000_000,
        zipf_exponent: float = 1.1,
        signal: float = 0.6,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.num_dense, self.num_sparse = num_dense, num_sparse
        self.cardinalities = np.geomspace(10, max_cardinality, num_sparse).astype(np.int64)
        # inverse CDF of a truncated Zipf law per feature, and a random id for each popularity rank
        self.cdfs = []
        self.ids = []
        self.weights = []
        for card in self.cardinalities:
            p = 1.0 / np.arange(1, card + 1) ** zipf_exponent
            self.cdfs.append(np.cumsum(p / p.sum()))
            self.ids.append(rng.permutation(card).astype(np.int64) + 1)
            self.weights.append((rng.normal(0, signal, card) / np.sqrt(num_sparse / 4)).astype(np.float32))
        self.dense_weights = rng.normal(0, 0.3, num_dense).astype(np.float32)
        self.bias = -1.2  # about a quarter of rows click, as in Criteo
        self.schema = pa.schema(
            [("label", pa.int8())]
            + [(f"I{i}", pa.float32()) for i in range(1, num_dense + 1)]
            + [(f"C{i}", pa.int64()) for i in range(1, num_sparse + 1)]
        )

    def chunk(self, rows: int, rng: np.random.Generator) -> tuple[pa.Table, np.ndarray]:
        dense = rng.gamma(1.5, 1.0, (rows, self.num_dense)).astype(np.float32)
        logit = self.bias + (dense - 1.5) @ self.dense_weights
        columns = []
        for cdf, ids, weights in zip(self.cdfs, self.ids, self.weights, strict=True):
            rank = np.minimum(np.searchsorted(cdf, rng.random(rows)), len(cdf) - 1)
            logit += weights[rank]
            columns.append(ids[rank])
        label = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int8)
        arrays = (
            [pa.array(label)] + [pa.array(dense[:, i]) for i in range(self.num_dense)] + [pa.array(c) for c in columns]
        )
        return pa.Table.from_arrays(arrays, schema=self.schema), logit


def generate(
    out: Path,
    rows: int,
    chunk_rows: int = 500_000,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 0,
    rows_per_file: int = 2_000_000,
    **kwargs,
) -> dict:
    generator = Generator(seed=seed, **kwargs)
    rng = np.random.default_rng([seed, 1])
    writers = {s: SplitWriter(out, s, generator.schema, rows_per_file=rows_per_file) for s in SPLITS}
    sample_labels, sample_logits = [], []
    try:
        with tqdm(total=rows, unit="row", unit_scale=True, desc=f"synthetic {out.name}") as bar:
            done = 0
            while done < rows:
                n = min(chunk_rows, rows - done)
                table, logit = generator.chunk(n, rng)
                u = rng.random(n)
                which = np.where(u < test_fraction, 2, np.where(u < test_fraction + val_fraction, 1, 0))
                for code, name in enumerate(SPLITS):
                    writers[name].write(table.take(np.flatnonzero(which == code)))
                if len(sample_labels) < 4:
                    sample_labels.append(table.column("label").to_numpy()[:100_000])
                    sample_logits.append(logit[:100_000])
                done += n
                bar.update(n)
    finally:
        for w in writers.values():
            w.close()
    from recsys.eval.metrics import auc

    labels, logits = np.concatenate(sample_labels), np.concatenate(sample_logits)
    title = f"synthetic Criteo-shaped data: {rows:,} rows, seed {seed}, Zipf categoricals, planted signal"
    (out / "schema.yaml").write_text(criteo_schema_yaml(title, generator.num_dense, generator.num_sparse))
    info = {
        "rows": {s: w.rows for s, w in writers.items()},
        "positive_rate": float(labels.mean()),
        "planted_auc": auc(labels, logits),
        "cardinalities": generator.cardinalities.tolist(),
        "seed": seed,
    }
    (out / "GENERATED.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, required=True, help="total rows over all splits")
    parser.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-dense", type=int, default=13)
    parser.add_argument("--num-sparse", type=int, default=26)
    parser.add_argument("--max-cardinality", type=int, default=1_000_000)
    parser.add_argument("--zipf-exponent", type=float, default=1.1)
    parser.add_argument("--chunk-rows", type=int, default=500_000, help="rows generated at a time (bounds memory)")
    parser.add_argument("--rows-per-file", type=int, default=2_000_000)
    args = parser.parse_args(argv)
    if args.rows < 100:
        parser.error("--rows must be at least 100")
    info = generate(
        args.out,
        args.rows,
        args.chunk_rows,
        seed=args.seed,
        rows_per_file=args.rows_per_file,
        num_dense=args.num_dense,
        num_sparse=args.num_sparse,
        max_cardinality=args.max_cardinality,
        zipf_exponent=args.zipf_exponent,
    )
    print(
        f"[synthetic] {info['rows']}  positive rate {info['positive_rate']:.3f} "
        f" planted-logit AUC {info['planted_auc']:.3f}  → {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
