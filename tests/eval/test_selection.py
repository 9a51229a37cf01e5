"""Choices are made on val only: permuting the test labels never changes them (issue 19, item 1)."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from recsys.eval.selection import SelectionError, best_on_val


def _scored(rng: np.random.Generator, strength: float, rows: int = 400) -> dict[str, np.ndarray]:
    """Labels and scores whose AUC grows with ``strength``."""
    labels = rng.integers(0, 2, rows)
    return {"labels": labels, "scores": labels * strength + rng.normal(size=rows)}


def _results(splits: dict[str, dict[str, dict[str, np.ndarray]]]) -> dict[str, dict]:
    """candidate → split → {"auc": [one per seed]} from precomputed labels and scores (scikit-learn's AUC)."""
    return {
        c: {s: {"auc": [roc_auc_score(d["labels"], d["scores"])]} for s, d in by_split.items()}
        for c, by_split in splits.items()
    }


def test_the_choice_is_the_best_val_metric_and_ignores_the_test_labels() -> None:
    rng = np.random.default_rng(0)
    # four heads: "c" is best on val, "d" best on test, so a chooser that read test would pick "d"
    val = {"a": 0.2, "b": 0.5, "c": 1.2, "d": 0.8}
    test = {"a": 0.2, "b": 0.5, "c": 0.6, "d": 1.5}
    splits = {c: {"val": _scored(rng, val[c]), "test": _scored(rng, test[c])} for c in val}
    results = _results(splits)
    chosen = best_on_val(results, "auc")
    by_loop = max(results, key=lambda c: results[c]["val"]["auc"][0])  # the plain reference: argmax over val
    by_test = max(results, key=lambda c: results[c]["test"]["auc"][0])
    assert chosen == by_loop == "c" and by_test == "d"
    for seed in range(5):  # permuting the test labels changes test AUCs, never the choice
        shuffled = np.random.default_rng(seed)
        permuted = {
            c: {**s, "test": {**s["test"], "labels": shuffled.permutation(s["test"]["labels"])}}
            for c, s in splits.items()
        }
        assert best_on_val(_results(permuted), "auc") == chosen
    # permuting the val labels does change it: the choice depends on val
    flat = {
        c: {**s, "val": {**s["val"], "labels": np.random.default_rng(1).permutation(s["val"]["labels"])}}
        for c, s in splits.items()
    }
    assert best_on_val(_results(flat), "auc") != chosen


def test_means_over_seeds_lower_is_better_and_ties_go_to_the_first() -> None:
    results = {
        "one seed lucky": {"val": {"auc": [0.9, 0.6, 0.6]}},  # mean 0.70
        "steady": {"val": {"auc": [0.72, 0.72, 0.72]}},
    }
    assert best_on_val(results, "auc") == "steady"
    assert best_on_val({"x": {"val": {"logloss": 0.5}}, "y": {"val": {"logloss": 0.4}}}, "logloss", False) == "y"
    assert best_on_val({"first": {"val": {"r": 0.3}}, "second": {"val": {"r": 0.3}}}, "r") == "first"
    assert best_on_val({"x": {"val": {"r": np.array([0.1, 0.5])}}, "y": {"val": {"r": np.float32(0.2)}}}, "r") == "x"


@pytest.mark.parametrize(
    ("results", "message"),
    [
        ({}, "no candidates"),
        ({"a": {"test": {"auc": 0.9}}}, "candidate 'a' has no val 'auc'"),
        ({"a": {"val": {"auc": [0.7, float("nan")]}}}, "candidate 'a': val auc is"),
        ({"a": {"val": {"auc": "0.7"}}}, "not a number per seed"),
    ],
)
def test_refuses_what_it_cannot_compare(results: dict, message: str) -> None:
    with pytest.raises(SelectionError, match=message):
        best_on_val(results, "auc")
