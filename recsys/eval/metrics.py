"""CTR metrics by the definitions in docs/protocols.md, vectorised in numpy (no per-group Python loop).

Example::

    auc(labels, probs)                 # ROC AUC, ties averaged
    gauc(labels, probs, users)         # impression-weighted mean of per-user AUC
    logloss(labels, probs)             # probabilities clipped to [1e-7, 1 - 1e-7]
    rela_impr(0.80, 0.78)              # % relative improvement over the base AUC
"""

from __future__ import annotations

import numpy as np

EPS = 1e-7


def _tied_ranks(sorted_scores: np.ndarray, segment_starts: np.ndarray | None = None) -> np.ndarray:
    """1-based ranks of already-sorted scores with ties averaged; restarts at ``segment_starts``."""
    n = len(sorted_scores)
    new_value = np.ones(n, dtype=bool)
    new_value[1:] = sorted_scores[1:] != sorted_scores[:-1]
    if segment_starts is not None:
        new_value[segment_starts] = True
    run_id = np.cumsum(new_value) - 1
    run_start = np.flatnonzero(new_value)
    run_end = np.append(run_start[1:], n)
    base = np.zeros(n, dtype=np.int64)
    if segment_starts is not None:
        base[segment_starts] = segment_starts
        base = np.maximum.accumulate(base)
    # average of positions run_start..run_end-1 (0-based), made 1-based and relative to segment
    avg = (run_start + run_end - 1) / 2.0 + 1.0
    return avg[run_id] - base


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney U with averaged ties). NaN when only one class is present."""
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(scores, kind="mergesort")
    ranks = _tied_ranks(scores[order])
    positive = labels[order] > 0.5
    n_pos = positive.sum()
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def group_aucs(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group (group ids, AUC, impressions) for groups holding both classes."""
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    groups = np.asarray(groups)
    order = np.lexsort((scores, groups))
    g, s, y = groups[order], scores[order], labels[order] > 0.5
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    ranks = _tied_ranks(s, starts)
    n = np.diff(np.append(starts, len(g)))
    n_pos = np.add.reduceat(y.astype(np.int64), starts)
    rank_pos = np.add.reduceat(np.where(y, ranks, 0.0), starts)
    n_neg = n - n_pos
    both = (n_pos > 0) & (n_neg > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_group = (rank_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return g[starts][both], per_group[both], n[both]


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Σ_u n_u·AUC_u / Σ_u n_u over groups with both classes (docs/protocols.md)."""
    _, aucs, weights = group_aucs(labels, scores, groups)
    if len(aucs) == 0:
        return float("nan")
    return float((aucs * weights).sum() / weights.sum())


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    labels = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return float(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean())


def rela_impr(metric_model: float, metric_base: float) -> float:
    """RelaImpr (DIN paper) in percent: ((m − 0.5) / (base − 0.5) − 1) × 100."""
    return ((metric_model - 0.5) / (metric_base - 0.5) - 1.0) * 100.0


def ctr_metrics(labels: np.ndarray, probs: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    return {
        "auc": auc(labels, probs),
        "gauc": gauc(labels, probs, groups),
        "logloss": logloss(labels, probs),
    }


def bootstrap_intervals(
    labels: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray,
    num_samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of AUC, GAUC and logloss, resampling groups (users) with replacement.

    Resampling whole users keeps each user's correlated rows together, so the intervals are
    not too narrow; GAUC reuses the per-user AUCs (they do not change when a user is drawn).
    A resample is not built row by row: each row counts as often as its user was drawn, so its
    AUC is the Mann-Whitney statistic with those multiplicities over the rows sorted once (tied
    scores share a run and count half), and its log loss the drawn users' loss sums over their row
    counts — the same numbers as stacking the drawn users' rows (tests/eval/test_metrics.py).
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    groups = np.asarray(groups)
    if len(probs) == 0:
        return {k: (float("nan"), float("nan")) for k in ("auc", "gauc", "logloss")}
    uniq, user = np.unique(groups, return_inverse=True)
    gids, aucs, weights = group_aucs(labels, probs, groups)
    group_auc = np.full(len(uniq), np.nan)
    group_weight = np.zeros(len(uniq))
    position = np.searchsorted(uniq, gids)
    group_auc[position], group_weight[position] = aucs, weights
    order = np.argsort(probs, kind="mergesort")
    ordered = probs[order]
    run = np.cumsum(np.r_[True, ordered[1:] != ordered[:-1]]) - 1  # tied scores share a run
    positive = labels[order] > 0.5
    pos_run, pos_user = run[positive], user[order][positive]
    neg_run, neg_user = run[~positive], user[order][~positive]
    p = np.clip(probs, EPS, 1 - EPS)
    user_loss = np.bincount(user, -(labels * np.log(p) + (1 - labels) * np.log(1 - p)), len(uniq))
    bad_loss = ~np.isfinite(user_loss)  # (a NaN probability: the resamples that draw its user say NaN)
    user_loss[bad_loss] = 0.0
    user_rows = np.bincount(user, minlength=len(uniq)).astype(np.float64)
    results: dict[str, list[float]] = {"auc": [], "gauc": [], "logloss": []}
    for _ in range(num_samples):
        drawn = rng.integers(0, len(uniq), len(uniq))
        times = np.bincount(drawn, minlength=len(uniq)).astype(np.float64)  # how often each user was drawn
        pos = np.bincount(pos_run, times[pos_user], run[-1] + 1)
        neg = np.bincount(neg_run, times[neg_user], run[-1] + 1)
        pairs = pos.sum() * neg.sum()
        below = np.cumsum(neg) - neg
        results["auc"].append(float(pos @ (below + neg / 2) / pairs) if pairs else np.nan)
        drew_bad = bool(times[bad_loss].any())
        results["logloss"].append(np.nan if drew_bad else float(times @ user_loss / (times @ user_rows)))
        w = group_weight[drawn]
        results["gauc"].append(float(np.nansum(group_auc[drawn] * w) / w.sum()) if w.sum() else np.nan)
    alpha = (1 - level) / 2
    return {k: (float(np.nanquantile(v, alpha)), float(np.nanquantile(v, 1 - alpha))) for k, v in results.items()}


def paired_bootstrap_pvalue(
    labels: np.ndarray,
    probs_a: np.ndarray | list[np.ndarray],
    probs_b: np.ndarray | list[np.ndarray],
    groups: np.ndarray,
    num_samples: int = 1000,
    seed: int = 0,
) -> float:
    """One-sided p-value that model A's GAUC is not above model B's, resampling users.

    ``probs_a``/``probs_b`` may be lists (one array per training seed, rows aligned): each
    user's AUC is then averaged over seeds, so the test is on the seed-mean GAUC.
    """

    def mean_group_auc(probs: np.ndarray | list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        runs = [group_aucs(labels, p, groups) for p in (probs if isinstance(probs, list) else [probs])]
        return np.mean([r[1] for r in runs], axis=0), runs[0][2]

    auc_a, weights = mean_group_auc(probs_a)
    auc_b, _ = mean_group_auc(probs_b)
    diff = auc_a - auc_b
    drawn = np.random.default_rng(seed).integers(0, len(diff), (num_samples, len(diff)))
    stats = (diff[drawn] * weights[drawn]).sum(1) / weights[drawn].sum(1)
    return float((np.sum(stats <= 0) + 1) / (num_samples + 1))


def paired_bootstrap_interval(
    a: np.ndarray, b: np.ndarray, num_samples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of ``mean(a − b)`` over units (users) drawn with replacement; ``a[i]`` and
    ``b[i]`` are one unit's metric under two systems (e.g. per-user Recall@K), so the pairing is kept."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diff.ndim != 1 or not len(diff) or not np.isfinite(diff).all():
        raise ValueError(f"paired_bootstrap_interval needs two equal-length finite 1-d arrays, got {diff.shape}")
    drawn = np.random.default_rng(seed).integers(0, len(diff), (num_samples, len(diff)))
    means = diff[drawn].mean(1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def calibration_bins(labels: np.ndarray, probs: np.ndarray, num_bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width reliability bins: mean predicted vs observed click rate, and counts."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    edges = np.linspace(0, 1, num_bins + 1)
    which = np.clip(np.digitize(probs, edges[1:-1]), 0, num_bins - 1)
    counts = np.bincount(which, minlength=num_bins)
    with np.errstate(invalid="ignore"):
        predicted = np.bincount(which, probs, minlength=num_bins) / counts
        observed = np.bincount(which, labels, minlength=num_bins) / counts
    return {"edges": edges, "predicted": predicted, "observed": observed, "counts": counts}


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, num_bins: int = 10) -> float:
    bins = calibration_bins(labels, probs, num_bins)
    mask = bins["counts"] > 0
    gap = np.abs(bins["predicted"][mask] - bins["observed"][mask])
    return float((gap * bins["counts"][mask]).sum() / bins["counts"].sum())


def recall_per_user(ranked: list[list], positives: list[set], k: int) -> list[float]:
    """|top-K ∩ positives| / |positives| of each user with positives (users without are left out)."""
    return [len(set(r[:k]) & p) / len(p) for r, p in zip(ranked, positives, strict=True) if p]


def recall_at_k(ranked: list[list], positives: list[set], k: int) -> float:
    """docs/protocols.md Recall@K: per user |top-K ∩ positives| / |positives|, averaged over users with positives."""
    values = recall_per_user(ranked, positives, k)
    return float(np.mean(values)) if values else float("nan")


def ndcg_at_k(ranked: list[list], positives: list[set], k: int) -> float:
    """NDCG@K with binary relevance: DCG of the top K over the DCG of an ideal ranking, averaged."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    values = []
    for r, p in zip(ranked, positives, strict=True):
        if not p:
            continue
        gains = np.array([1.0 if item in p else 0.0 for item in r[:k]])
        ideal = discounts[: min(len(p), k)].sum()
        values.append(float((gains * discounts[: len(gains)]).sum() / ideal))
    return float(np.mean(values)) if values else float("nan")
