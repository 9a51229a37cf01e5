"""Delta exports: only the table rows that changed since the previous export, for a live server.

::

    exports/                      a chain, side by side (what `recsys serve --watch exports/` follows)
      day1/   full export         manifest {"kind": "full", "sequence": 0, ...} + every table + vocab/
      day2/   delta               manifest {"kind": "delta", "sequence": 1, "base_manifest_sha256":
                                  SHA-256 of day1/manifest.json, "previous": "day1", ...}
                                  tables/<key>.safetensors: {"index": int64 [k], "rows": uint8 [k, row_bytes]}
                                  dense.safetensors: the whole dense network (managed tables' id → slot
                                  buffers included)
      day3/   delta               sequence 2, base = day2's manifest

A delta holds the rows whose *stored bytes* differ from the previous export's (after its own chain
is applied), in the same dtype: full + deltas in order is byte for byte the full export of the last
checkpoint (``tests/export/test_delta.py``). A delta is refused — by the exporter and by the loader —
for another model (class, hyperparameters or tables differ from the chain's full export), an older
or unknown base (the SHA-256 of the previous manifest), a sequence that is not the previous + 1, and
(the loader) any file whose size or SHA-256 differs from its manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from recsys.export.exporter import MANIFEST, sha256


def _error(message: str) -> Exception:
    from recsys.export.loader import ExportError

    return ExportError(message)


def same_model(full: dict[str, Any], other: dict[str, Any]) -> str | None:
    """Why ``other`` is not an export of the same model as ``full`` (None: it is)."""
    if other["model"]["class"] != full["model"]["class"]:
        return f"model {other['model']['class']} is not the chain's {full['model']['class']}"
    if json.dumps(other["model"]["hparams"], sort_keys=True) != json.dumps(full["model"]["hparams"], sort_keys=True):
        differ = sorted(
            k
            for k in set(full["model"]["hparams"]) | set(other["model"]["hparams"])
            if full["model"]["hparams"].get(k) != other["model"]["hparams"].get(k)
        )
        return f"hyperparameters differ from the chain's full export in {differ}"
    shape = [(t["key"], t["rows"], t["dim"], t["dtype"]) for t in full["tables"]]
    if [(t["key"], t["rows"], t["dim"], t["dtype"]) for t in other["tables"]] != shape:
        return "its tables (names, rows, widths or dtype) differ from the chain's full export"
    return None


def check_chain(full_dir: Path, full: dict[str, Any], deltas: list[tuple[Path, dict[str, Any]]]) -> None:
    """Each delta is the next in sequence on the export before it, for the same model."""
    previous, sequence = full_dir, int(full.get("sequence", 0))
    for directory, manifest in deltas:
        where = directory / MANIFEST
        if manifest.get("kind") != "delta":
            raise _error(f"{where}: not a delta export (kind {manifest.get('kind', 'full')!r})")
        if manifest.get("sequence") != sequence + 1:
            raise _error(f"{where}: sequence {manifest.get('sequence')!r}, expected {sequence + 1} (after {previous})")
        base = sha256(previous / MANIFEST)
        if manifest.get("base_manifest_sha256") != base:
            raise _error(
                f"{where}: its base is not {previous} (base_manifest_sha256 {manifest.get('base_manifest_sha256')!r},"
                f" that manifest's is {base}): a delta of another or an older export"
            )
        reason = same_model(full, manifest)
        if reason:
            raise _error(f"{where}: a delta for another model: {reason}")
        previous, sequence = directory, sequence + 1


def delta_rows(directory: Path, entry: dict[str, Any], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [k] int64, rows [k, row_bytes] uint8) of one table in a delta, checked."""
    from recsys.export.loader import _read_tensors, inside
    from recsys.export.quantize import row_bytes

    tensors = _read_tensors(inside(directory, entry["file"]))
    index, values = tensors.get("index"), tensors.get("rows")
    width = row_bytes(entry["dim"], entry["dtype"])
    ok = index is not None and values is not None and index.dtype == torch.int64 and values.dtype == torch.uint8
    ok = ok and index.dim() == 1 and tuple(values.shape) == (len(index), width)
    if not ok or (len(index) and (int(index.min()) < 0 or int(index.max()) >= rows)):
        raise _error(f"{directory / entry['file']}: not a delta table of {rows} rows × {width} bytes")
    return index, values


def applied_rows(rows: torch.Tensor, entry: dict[str, Any], deltas: list[tuple[Path, dict[str, Any]]]) -> torch.Tensor:
    """A full export's stored rows of one table with ``deltas`` applied in order."""
    owned = False
    for directory, manifest in deltas:
        changed = next(t for t in manifest["tables"] if t["key"] == entry["key"])
        index, values = delta_rows(directory, changed, entry["rows"])
        if len(index):
            rows, owned = (rows if owned else rows.clone()), True
            rows[index] = values
    return rows


def chain_of(since: Path) -> tuple[Path, list[Path]]:
    """(full export, deltas in order) ending at ``since``, following each delta's ``previous`` (a sibling)."""
    from recsys.export.loader import read_manifest

    deltas: list[Path] = []
    current = since
    while True:
        manifest = read_manifest(current)
        if manifest.get("kind", "full") == "full":
            return current, deltas[::-1]
        deltas.append(current)
        previous = manifest.get("previous")
        sibling = current.parent / previous if isinstance(previous, str) else None
        if (
            sibling is None
            or previous in ("", ".", "..", current.name)
            or Path(previous).name != previous
            or sibling.resolve().parent != current.parent.resolve()
        ):
            raise _error(f"{current / MANIFEST}: 'previous' must name a sibling export directory, got {previous!r}")
        current = sibling
        if len(deltas) > 100_000:
            raise _error(f"{since}: the chain of previous exports does not end")


def changed_rows(new: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Indices of the rows whose stored bytes differ (exact for every dtype: bytes, not values)."""
    return torch.nonzero((new != base).any(dim=1)).flatten()
