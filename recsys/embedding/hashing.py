"""Salted 64-bit hashing of ids in plain torch ops: the same rows in training, export and serving.

The mixer is SplitMix64's finalizer on ``id + salt · φ`` (φ = 0x9E3779B97F4A7C15), computed in
int64 with wrap-around multiplication and logical shifts, so results do not depend on the
process, platform, device or torch release. Test vectors pin it (tests/embedding/test_hashing.py),
checked against a pure-Python implementation on unbounded ints.

Example::

    rows = hash_to_rows(torch.tensor([3, 17, 3]), salt=feature_salt("user_id", 0), num_rows=1000)
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    value &= MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


GOLDEN = _signed(0x9E3779B97F4A7C15)
MIX1 = _signed(0xBF58476D1CE4E5B9)
MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical (unsigned) right shift of int64 values."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def hash64(ids: Tensor, salt: int) -> Tensor:
    """SplitMix64 of ``ids + salt·φ`` as int64 bits (any value, negative included)."""
    z = ids.to(torch.int64) + _signed(salt * GOLDEN)
    z = (z ^ _shift_right(z, 30)) * MIX1
    z = (z ^ _shift_right(z, 27)) * MIX2
    return z ^ _shift_right(z, 31)


def hash_to_rows(ids: Tensor, salt: int, num_rows: int) -> Tensor:
    """Rows in ``[0, num_rows)``: the top 63 bits of ``hash64`` modulo ``num_rows``."""
    if num_rows < 1:
        raise ValueError(f"num_rows must be positive, got {num_rows}")
    return torch.remainder(_shift_right(hash64(ids, salt), 1), num_rows)


def feature_salt(feature: str, probe: int) -> int:
    """A stable salt for probe ``probe`` of ``feature`` (first 8 bytes of SHA-256, 63 bits)."""
    digest = hashlib.sha256(f"{feature}#{probe}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def hash64_reference(value: int, salt: int) -> int:
    """Plain-Python SplitMix64 on unbounded ints, the reference the torch version must equal."""
    z = (value + salt * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)
