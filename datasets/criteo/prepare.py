"""Criteo click logs (Kaggle Display Advertising ``train.txt`` or Terabyte ``day_N``) → the recsys contract.

Each line: ``label \\t I1..I13 \\t C1..C26`` (13 integer counts, 26 hashed categorical hex strings,
any of them may be empty). The files are streamed in blocks, so a file bigger than memory converts
with bounded memory. Integers become ``log1p(max(x, 0))`` with empty → 0 (the DLRM preprocessing;
recsys itself rejects missing numerics); empty categoricals stay null and read the OOV row.

    # one file, random 90/5/5 split (seeded)
    python datasets/criteo/prepare.py --input train.txt --out data/criteo-kaggle
    # Terabyte: explicit days per split, hashed tables instead of vocabularies
    python datasets/criteo/prepare.py --train day_0 day_1 --val day_22 --test day_23 \\
        --out data/criteo-tb --num-buckets 10000000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import csv
from tqdm.auto import tqdm

from recsys.data.arrow import SPLITS
from recsys.data.writer import SplitWriter, criteo_schema_yaml

NUM_DENSE, NUM_SPARSE = 13, 26
COLUMNS = ["label"] + [f"I{i}" for i in range(1, NUM_DENSE + 1)] + [f"C{i}" for i in range(1, NUM_SPARSE + 1)]
OUT_SCHEMA = pa.schema(
    [("label", pa.int8())]
    + [(f"I{i}", pa.float32()) for i in range(1, NUM_DENSE + 1)]
    + [(f"C{i}", pa.string()) for i in range(1, NUM_SPARSE + 1)]
)


class CriteoError(ValueError):
    pass


def read_blocks(path: Path, block_size: int) -> csv.CSVStreamingReader:
    if not path.exists():
        raise CriteoError(f"{path}: input file not found")
    convert = csv.ConvertOptions(
        column_types={
            "label": pa.int64(),
            **{f"I{i}": pa.float64() for i in range(1, NUM_DENSE + 1)},
            **{f"C{i}": pa.string() for i in range(1, NUM_SPARSE + 1)},
        },
        strings_can_be_null=True,
    )
    try:
        return csv.open_csv(
            path,
            read_options=csv.ReadOptions(column_names=COLUMNS, block_size=block_size),
            parse_options=csv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=convert,
        )
    except pa.ArrowInvalid as err:
        raise CriteoError(f"{path}: malformed line in the first block: {err}") from err


def transform(block: pa.RecordBatch, path: Path, first_line: int) -> pa.Table:
    label = block.column("label")
    valid = pc.and_(pc.is_valid(label), pc.is_in(label, value_set=pa.array([0, 1])))
    if not pc.all(valid).as_py():
        bad = int(np.flatnonzero(~valid.to_numpy(zero_copy_only=False))[0])
        raise CriteoError(f"{path}: line {first_line + bad + 1}: label must be 0 or 1, got {label[bad].as_py()!r}")
    columns = [label.cast(pa.int8())]
    for i in range(1, NUM_DENSE + 1):
        x = pc.fill_null(block.column(f"I{i}"), 0.0).to_numpy(zero_copy_only=False)
        columns.append(pa.array(np.log1p(np.maximum(x, 0.0)).astype(np.float32)))
    for i in range(1, NUM_SPARSE + 1):
        columns.append(block.column(f"C{i}"))
    return pa.Table.from_arrays(columns, schema=OUT_SCHEMA)


def convert(
    assignments: list[tuple[Path, str | None]],
    out: Path,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 0,
    block_size: int = 64 << 20,
    rows_per_file: int = 2_000_000,
    max_rows: int | None = None,
    min_count: int = 1,
    num_buckets: int | None = None,
) -> dict[str, int]:
    """Converts each (file, split) — split None means a seeded random split by the fractions."""
    out.mkdir(parents=True, exist_ok=True)
    writers = {s: SplitWriter(out, s, OUT_SCHEMA, rows_per_file=rows_per_file) for s in SPLITS}
    rng = np.random.default_rng(seed)
    total = 0
    try:
        for path, split in assignments:
            reader = read_blocks(path, block_size)
            line = 0
            with tqdm(unit="row", unit_scale=True, desc=f"criteo {path.name}") as bar:
                while True:
                    try:
                        block = reader.read_next_batch()
                    except StopIteration:
                        break
                    except pa.ArrowInvalid as err:
                        raise CriteoError(f"{path}: malformed line near line {line + 1}: {err}") from err
                    if max_rows is not None:
                        block = block.slice(0, max(0, max_rows - total))
                    table = transform(block, path, line)
                    if split is None:
                        u = rng.random(table.num_rows)
                        which = np.where(u < test_fraction, 2, np.where(u < test_fraction + val_fraction, 1, 0))
                        for code, name in enumerate(SPLITS):
                            rows = np.flatnonzero(which == code)
                            if len(rows):
                                writers[name].write(table.take(rows))
                    else:
                        writers[split].write(table)
                    line += block.num_rows
                    total += block.num_rows
                    bar.update(block.num_rows)
                    if max_rows is not None and total >= max_rows:
                        break
            if max_rows is not None and total >= max_rows:
                break
    finally:
        for w in writers.values():
            w.close()
    empty = [s for s, w in writers.items() if w.rows == 0]
    if empty:
        raise CriteoError(f"{out}: split(s) {empty} received no rows; give more input or larger fractions")
    title = "Criteo click logs: label, I1-I13 = log1p(count), C1-C26 hashed categoricals"
    (out / "schema.yaml").write_text(criteo_schema_yaml(title, NUM_DENSE, NUM_SPARSE, min_count, num_buckets))
    return {s: w.rows for s, w in writers.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", type=Path, default=[], help="files split at random by the fractions")
    parser.add_argument("--train", nargs="+", type=Path, default=[], help="files that go whole to train")
    parser.add_argument("--val", nargs="+", type=Path, default=[], help="files that go whole to val")
    parser.add_argument("--test", nargs="+", type=Path, default=[], help="files that go whole to test")
    parser.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--test-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random split")
    parser.add_argument("--max-rows", type=int, help="stop after this many rows (a sample)")
    parser.add_argument("--min-count", type=int, default=1, help="schema min_count of each categorical")
    parser.add_argument("--num-buckets", type=int, help="hash each categorical into this many rows instead")
    parser.add_argument("--rows-per-file", type=int, default=2_000_000)
    parser.add_argument("--block-mb", type=int, default=64, help="bytes read per block (bounds memory)")
    args = parser.parse_args(argv)
    assignments = [(p, None) for p in args.input] + [(p, s) for s in SPLITS for p in getattr(args, s)]
    if not assignments:
        parser.error("give --input, or --train/--val/--test files")
    try:
        rows = convert(
            assignments,
            args.out,
            args.val_fraction,
            args.test_fraction,
            args.seed,
            args.block_mb << 20,
            args.rows_per_file,
            args.max_rows,
            args.min_count,
            args.num_buckets,
        )
    except CriteoError as err:
        print(f"[criteo] error: {err}", file=sys.stderr)
        return 2
    print("[criteo] " + "  ".join(f"{s}: {n:,} rows" for s, n in rows.items()) + f"  → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
