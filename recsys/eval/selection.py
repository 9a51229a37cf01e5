"""Choices made on the val split only: a head, a re-ranker, a fusion weight, text columns, a budget.

Every choice a benchmark or a command makes (which text head, which DIN re-ranks, the hybrid's α,
which item columns go into the content text) goes through ``best_on_val``: it reads the ``"val"``
entry of each candidate's results and nothing else, so the test split is read once, after the choice,
to report it. ``results`` maps a candidate to its metrics per split::

    best_on_val({"mean": {"val": {"auc": [0.79, 0.80]}, "test": {...}},
                 "gem":  {"val": {"auc": [0.81, 0.80]}, "test": {...}}}, "auc")   # → "gem"

A metric may be one number or one per seed (its mean is compared). Ties go to the earlier candidate
(put the simpler one first). Retrieval's α and the OptEmbed search score their candidates on val
directly (``recsys.retrieval.evaluate.Retriever.alpha``, ``recsys.train.optembed.ValCache``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any, TypeVar

import numpy as np

K = TypeVar("K", bound=Hashable)


class SelectionError(ValueError):
    """No candidate can be chosen (none given, or one without a finite val metric)."""


def val_score(metrics: Mapping[str, Any], metric: str, candidate: object = None) -> float:
    """The mean of ``metrics["val"][metric]`` (a number or one per seed); refuses a missing or NaN one."""
    val = metrics.get("val")
    if not isinstance(val, Mapping) or metric not in val:
        raise SelectionError(f"candidate {candidate!r} has no val {metric!r} (has: {sorted(val or {})})")
    value = val[metric]
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        values = [float(v) for v in np.asarray(value, dtype=np.float64).ravel()]
    except (TypeError, ValueError):
        raise SelectionError(f"candidate {candidate!r}: val {metric} is {value!r}, not a number per seed") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise SelectionError(f"candidate {candidate!r}: val {metric} is {value!r}, not a finite number per seed")
    return sum(values) / len(values)


def best_on_val(results: Mapping[K, Mapping[str, Any]], metric: str, higher_is_better: bool = True) -> K:
    """The candidate with the best mean val ``metric``; reads only ``results[c]["val"]``."""
    if not results:
        raise SelectionError("no candidates to choose from")
    sign = 1.0 if higher_is_better else -1.0
    best, best_score = None, -math.inf
    for candidate, metrics in results.items():
        score = sign * val_score(metrics, metric, candidate)
        if score > best_score:
            best, best_score = candidate, score
    return best
