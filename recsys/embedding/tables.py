"""Table-level helpers every kind shares: where tables are built, the id guard, jagged pooling.

Example::

    with tables_on("meta"):                       # nothing allocated for the tables
        model = DIN(info)
    check_ids({"item_id": jagged}, {"item_id": 1683})
    pooled = pool_jagged(rows, lengths, "mean")   # [N, D] rows of B bags → [B, D]
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torchrec import PoolingType
from torchrec.sparse.jagged_tensor import JaggedTensor

from recsys.data.batch import jagged_rows
from recsys.embedding.spec import TABLE_POOLINGS

TORCHREC_POOLING = {name: PoolingType[name.upper()] for name in TABLE_POOLINGS}  # the spec's names

_TABLE_DEVICE: ContextVar[torch.device | None] = ContextVar("recsys_table_device", default=None)


@contextmanager
def tables_on(device: torch.device | str) -> Iterator[None]:
    """Models built inside this context create their embedding tables on ``device``.

    ``tables_on("meta")`` allocates nothing: the torchrec strategy then materialises only each
    rank's shards (tables larger than one host). Dense layers are built as usual.
    """
    token = _TABLE_DEVICE.set(torch.device(device))
    try:
        yield
    finally:
        _TABLE_DEVICE.reset(token)


def table_device() -> torch.device | None:
    """The device tables are built on (None: the default device)."""
    return _TABLE_DEVICE.get()


def check_ids(features: dict[str, JaggedTensor], rows: dict[str, int]) -> None:
    """Stops a batch whose ids fall outside their table before any embedding kernel sees it.

    FBGEMM kernels do not bounds-check; an out-of-range id reads or corrupts another row. One
    vectorised comparison per feature.
    """
    for key, jagged in features.items():
        values = jagged.values()
        if values.numel() == 0:
            continue
        bad = (values < 0) | (values >= rows[key])
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise IndexError(
                f"feature {key!r}: id {int(values[first])} outside its table of {rows[key]} rows "
                f"({int(bad.sum())} bad ids in this batch); is the checkpoint's vocabulary the dataset's?"
            )


def pool_jagged(values: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[N, D]`` rows of ``B`` bags (``lengths [B]``) → ``[B, D]`` sum or mean (an empty bag → zeros),
    what torchrec's ``EmbeddingBagCollection`` computes."""
    if pooling not in TORCHREC_POOLING:
        raise ValueError(f"pooling must be one of {sorted(TORCHREC_POOLING)}, got {pooling!r}")
    bags = lengths.numel()
    segment = jagged_rows(lengths, values.shape[0])
    out = values.new_zeros(bags, values.shape[1]).index_add(0, segment, values)
    if pooling == "mean":
        out = out / lengths.clamp(min=1).unsqueeze(1).to(values.dtype)
    return out
