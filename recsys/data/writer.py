"""Writing datasets in the contract: split writers with bounded memory, Criteo-shaped schema files."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


class SplitWriter:
    """Appends Arrow tables to ``<out>/<split>/part-NNNNN.parquet``, rolling files every ``rows_per_file``."""

    def __init__(
        self, out: Path, split: str, schema: pa.Schema, rows_per_file: int = 2_000_000, row_group_size: int = 65_536
    ) -> None:
        self.folder = out / split
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob("part-*.parquet"):
            old.unlink()
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.row_group_size = row_group_size
        self.files = 0
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_file = 0

    def write(self, table: pa.Table) -> None:
        start = 0
        while start < table.num_rows:
            if self._writer is None:
                path = self.folder / f"part-{self.files:05d}.parquet"
                self._writer = pq.ParquetWriter(path, self.schema)
                self.files += 1
                self._in_file = 0
            take = min(table.num_rows - start, self.rows_per_file - self._in_file)
            self._writer.write_table(table.slice(start, take), row_group_size=self.row_group_size)
            start += take
            self._in_file += take
            self.rows += take
            if self._in_file >= self.rows_per_file:
                self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def criteo_schema_yaml(
    title: str, num_dense: int, num_sparse: int, min_count: int = 1, num_buckets: int | None = None
) -> str:
    lines = [f"# {title}", "label: label", "features:"]
    lines += [f"  - {{name: I{i}, type: numeric}}" for i in range(1, num_dense + 1)]
    extra = f", num_buckets: {num_buckets}" if num_buckets else (f", min_count: {min_count}" if min_count > 1 else "")
    lines += [f"  - {{name: C{i}, type: categorical{extra}}}" for i in range(1, num_sparse + 1)]
    return "\n".join(lines) + "\n"
