"""Table row formats of an export (docs/export_format.md).

``fp32`` / ``fp16``: rows of little-endian floats. ``int8`` / ``int4``: FBGEMM's fused row-wise
format, one row = ``D · bits / 8`` bytes of codes (int4: two codes per byte, low nibble first)
followed by an fp16 scale and an fp16 bias; ``x ≈ scale · code + bias``. That is the layout
FBGEMM's ``IntNBitTableBatchedEmbeddingBagsCodegen`` reads, so serving loads it as is.
"""

from __future__ import annotations

import torch
from torchrec.modules.embedding_configs import DataType

DTYPES: dict[str, tuple[DataType, int]] = {
    "fp32": (DataType.FP32, 32),
    "fp16": (DataType.FP16, 16),
    "int8": (DataType.INT8, 8),
    "int4": (DataType.INT4, 4),
}
SCALE_BIAS_BYTES = 4  # fp16 scale + fp16 bias per row (row-wise quantized types)


def check_dtype(dtype: str) -> tuple[DataType, int]:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def is_rowwise(dtype: str) -> bool:
    return check_dtype(dtype)[1] <= 8


def row_bytes(dim: int, dtype: str) -> int:
    """Bytes of one stored row: ``D · bits / 8`` (+ 4 for the scale/bias of int8/int4)."""
    _, bits = check_dtype(dtype)
    if dim * bits % 8:
        raise ValueError(f"a {dim}-wide row does not fill whole bytes at {dtype}")
    return dim * bits // 8 + (SCALE_BIAS_BYTES if bits <= 8 else 0)


def quantize_rows(weight: torch.Tensor, dtype: str) -> torch.Tensor:
    """``[R, D]`` float rows → ``[R, row_bytes(D, dtype)]`` uint8 in the export's row format."""
    _, bits = check_dtype(dtype)
    weight = weight.detach().float().contiguous()
    if bits == 32:
        return weight.view(torch.uint8).reshape(weight.shape[0], -1)
    if bits == 16:
        return weight.half().view(torch.uint8).reshape(weight.shape[0], -1)
    row_bytes(weight.shape[1], dtype)  # validates the width
    return torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(weight, bits)


def dequantize_rows(rows: torch.Tensor, dim: int, dtype: str) -> torch.Tensor:
    """Inverse of ``quantize_rows`` (up to quantization error): ``[R, D]`` float32."""
    _, bits = check_dtype(dtype)
    if rows.shape[1] != row_bytes(dim, dtype):
        raise ValueError(f"rows of {rows.shape[1]} bytes are not {dtype} rows of width {dim}")
    if bits == 32:
        return rows.contiguous().view(torch.float32).reshape(rows.shape[0], dim)
    if bits == 16:
        return rows.contiguous().view(torch.float16).reshape(rows.shape[0], dim).float()
    return torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(rows.contiguous(), bits)


def split_scale_bias(rows: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(codes, scale_bias) as FBGEMM's inference TBE takes them (scale_bias None for floats)."""
    if not is_rowwise(dtype):
        return rows.contiguous(), None
    return rows[:, :-SCALE_BIAS_BYTES].contiguous(), rows[:, -SCALE_BIAS_BYTES:].contiguous()
