"""``recsys data check DIR``: every problem of a dataset directory at once, before a long run.

    recsys data check data/criteo
    recsys data check data/criteo --json report.json

Reads the schema, then streams every Parquet file of every split (only the columns the schema
uses) and reports, per file and column, with counts and the first bad row:

errors (training would stop on them)
    unreadable schema or files, corrupt row groups, missing or mistyped columns, id columns whose
    kind differs from train's (schema drift: ints vs strings, lists vs scalars), labels that are
    not 0/1, missing/NaN/inf numeric values in a feature whose schema says ``missing: error``.
notes (handled as the schema says)
    numeric values that will be imputed (``missing: mean|zero``), null ids (→ OOV row), empty
    lists and sequences, sequences longer than ``max_len`` (the most recent are kept), a split
    with no rows of one class.

Exit status 1 when there is an error, 0 otherwise. Ids can never fall outside a table here: the
vocabulary maps unseen values to the OOV row; a model additionally bounds-checks every id before
the FBGEMM kernels see it (``recsys.embedding.tables.check_ids``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from recsys.data.arrow import (
    SPLITS,
    DataError,
    bad_numbers,
    column_problems,
    id_kind,
    open_parquet,
    split_files,
)
from recsys.data.schema import FeatureType, Schema, SchemaError, load_schema


@dataclass
class Finding:
    """Rows of one kind of problem in one file and column."""

    severity: str  # "error" | "note"
    file: str
    column: str | None
    message: str
    count: int = 0
    first_row: int | None = None

    def text(self) -> str:
        where = f"{self.file}" + (f": column {self.column!r}" if self.column else "")
        rows = f" ({self.count:,} row(s), first at row {self.first_row})" if self.count else ""
        return f"{where}: {self.message}{rows}"


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def notes(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "note"]


class _Tally:
    """Counts bad rows per (severity, file, column, message) over a file's record batches."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str | None, str], list[int]] = defaultdict(lambda: [0, -1])

    def add(
        self, severity: str, file: Path, column: str | None, message: str, mask: np.ndarray, first_row: int
    ) -> None:
        hits = np.flatnonzero(mask)
        if not len(hits):
            return
        entry = self.counts[(severity, str(file), column, message)]
        if entry[0] == 0:
            entry[1] = first_row + int(hits[0])
        entry[0] += len(hits)

    def findings(self) -> list[Finding]:
        return [Finding(s, f, c, m, n, first) for (s, f, c, m), (n, first) in self.counts.items()]


def _check_batch(
    schema: Schema, batch: pa.RecordBatch, file: Path, first: int, tally: _Tally, split: str, usable: dict[str, int]
) -> None:
    label = pc.fill_null(batch.column(schema.label).cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    tally.add("error", file, schema.label, "label is not 0 or 1 (or missing)", ~((label == 0) | (label == 1)), first)
    for spec in schema.features:
        column = batch.column(spec.name)
        if spec.type is FeatureType.NUMERIC:
            x = pc.fill_null(column.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
            bad = bad_numbers(x)
            if spec.missing == "error":
                tally.add(
                    "error",
                    file,
                    spec.name,
                    "missing, NaN, inf or beyond float32 (|x| > 3.4e38) numeric value (schema: missing: error)",
                    bad,
                    first,
                )
            else:
                tally.add(
                    "note",
                    file,
                    spec.name,
                    f"missing, NaN, inf or beyond float32 numeric value, imputed ({spec.missing})",
                    bad,
                    first,
                )
            if split == "train":
                usable[spec.name] = usable.get(spec.name, 0) + int((~bad).sum())
        elif spec.type is FeatureType.CATEGORICAL:
            tally.add(
                "note",
                file,
                spec.name,
                "null id (reads the null id's row)" if spec.raw else "null id (reads the OOV row)",
                column.is_null().to_numpy(zero_copy_only=False),
                first,
            )
        elif spec.type in (FeatureType.CATEGORICAL_LIST, FeatureType.SEQUENCE):
            lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
            tally.add("note", file, spec.name, "empty list", lengths == 0, first)
            if spec.type is FeatureType.SEQUENCE and spec.max_len:
                tally.add(
                    "note",
                    file,
                    spec.name,
                    f"longer than max_len {spec.max_len} (the most recent are kept)",
                    lengths > spec.max_len,
                    first,
                )


def _check_sequence_lengths(schema: Schema, batch: pa.RecordBatch, file: Path, first: int, tally: _Tally) -> None:
    sequences = schema.sequences
    if len(sequences) < 2:
        return
    lengths = [
        pc.fill_null(pc.list_value_length(batch.column(s.name)), 0).to_numpy(zero_copy_only=False) for s in sequences
    ]
    differ = np.zeros(len(lengths[0]), dtype=bool)
    for other in lengths[1:]:
        differ |= other != lengths[0]
    names = [s.name for s in sequences]
    tally.add(
        "note",
        file,
        names[0],
        f"sequences {names} differ in length: DIN, which reads them together behavior by "
        f"behavior by default, refuses such rows (or set its attention_groups)",
        differ,
        first,
    )


def check(data_dir: str | Path, progress: bool = True) -> Report:
    """Checks ``data_dir`` against its schema; never raises for a data problem (it reports it)."""
    data_dir = Path(data_dir)
    report = Report()
    try:
        schema = load_schema(data_dir)
    except (SchemaError, OSError, ValueError) as err:
        report.findings.append(Finding("error", str(data_dir / "schema.yaml"), None, str(err)))
        return report
    files: dict[str, list[Path]] = {}
    for split in SPLITS:
        try:
            files[split] = split_files(data_dir, split)
        except DataError as err:
            report.findings.append(Finding("error", str(data_dir / split), None, str(err)))
    train_kinds: dict[str, str] = {}
    tally = _Tally()
    total = sum(len(v) for v in files.values())
    usable: dict[str, int] = {}  # numeric values a mean can be taken from, per column, in train
    with tqdm(total=total, desc=f"checking {data_dir.name}", unit="file", disable=not progress) as bar:
        for split, split_list in files.items():
            rows = 0
            labels_seen: set[float] = set()
            for file in split_list:
                bar.update(1)
                try:
                    parquet = open_parquet(file)
                except DataError as err:
                    report.findings.append(Finding("error", str(file), None, str(err)))
                    continue
                arrow_schema = parquet.schema_arrow
                problems = column_problems(schema, arrow_schema, file)
                report.findings += [Finding("error", str(file), None, p.split(": ", 1)[1]) for p in problems]
                if problems:
                    continue
                for spec in schema.features:  # drift: the id kind of each id column vs train's
                    if spec.type in (FeatureType.CATEGORICAL, FeatureType.CATEGORICAL_LIST, FeatureType.SEQUENCE):
                        kind = id_kind(arrow_schema.field(spec.name).type)
                        expected = (
                            train_kinds.setdefault(spec.name, kind)
                            if split == "train"
                            else train_kinds.get(spec.name, kind)
                        )
                        if kind != expected:
                            report.findings.append(
                                Finding(
                                    "error",
                                    str(file),
                                    spec.name,
                                    f"{kind} ids here but {expected} ids in train (schema drift)",
                                )
                            )
                first = 0
                for rg in range(parquet.num_row_groups):
                    try:
                        table = parquet.read_row_group(rg, columns=schema.columns())
                    except (pa.ArrowException, OSError) as err:
                        report.findings.append(
                            Finding("error", str(file), None, f"row group {rg} is unreadable: {err}")
                        )
                        first += parquet.metadata.row_group(rg).num_rows
                        continue
                    for batch in table.to_batches(max_chunksize=65_536):
                        _check_batch(schema, batch, file, first, tally, split, usable)
                        _check_sequence_lengths(schema, batch, file, first, tally)
                        label = pc.unique(batch.column(schema.label).cast(pa.float64())).to_pylist()
                        labels_seen.update(v for v in label if v in (0.0, 1.0))
                        first += batch.num_rows
                rows += first
            report.rows[split] = rows
            if rows and labels_seen != {0.0, 1.0}:
                report.findings.append(
                    Finding(
                        "note",
                        str(data_dir / split),
                        schema.label,
                        f"only label(s) {sorted(labels_seen)} in this split: AUC is undefined on it",
                    )
                )
            if split in files and rows == 0:
                report.findings.append(Finding("error", str(data_dir / split), None, "the split has no rows"))
    for spec in schema.numeric:
        if spec.missing == "mean" and "train" in report.rows and usable.get(spec.name, 0) == 0:
            report.findings.append(
                Finding(
                    "error",
                    str(data_dir / "train"),
                    spec.name,
                    "no usable value in train: `missing: mean` has no mean to impute",
                )
            )
    report.findings += tally.findings()
    return report
