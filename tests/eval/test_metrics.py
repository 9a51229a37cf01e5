import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from recsys.eval import metrics


@pytest.fixture
def scored() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 4000)
    scores = np.round(np.clip(labels * 0.3 + rng.random(4000) * 0.7, 0, 1), 2)  # many ties
    groups = rng.integers(0, 150, 4000)
    return labels, scores, groups


def test_auc_matches_sklearn_with_ties(scored) -> None:
    labels, scores, _ = scored
    assert metrics.auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert np.isnan(metrics.auc(np.ones(5), np.arange(5)))


def test_gauc_matches_per_user_reference(scored) -> None:
    labels, scores, groups = scored
    total, weight = 0.0, 0
    for g in np.unique(groups):
        m = groups == g
        if 0 < labels[m].sum() < m.sum():
            total += m.sum() * roc_auc_score(labels[m], scores[m])
            weight += m.sum()
    assert metrics.gauc(labels, scores, groups) == pytest.approx(total / weight, abs=1e-12)
    # groups with one class are left out
    only_pos = np.r_[groups, [10_000] * 3]
    assert metrics.gauc(np.r_[labels, [1, 1, 1]], np.r_[scores, [0.1, 0.2, 0.3]], only_pos) == pytest.approx(
        total / weight
    )


def test_logloss_matches_sklearn_and_clips(scored) -> None:
    labels, scores, _ = scored
    assert metrics.logloss(labels, scores) == pytest.approx(
        log_loss(labels, np.clip(scores, 1e-7, 1 - 1e-7)), rel=1e-12
    )
    assert metrics.logloss(np.array([1.0]), np.array([0.0])) == pytest.approx(-np.log(1e-7))


def test_rela_impr() -> None:
    assert metrics.rela_impr(0.75, 0.70) == pytest.approx(25.0)
    assert metrics.rela_impr(0.70, 0.70) == 0.0


def test_bootstrap_interval_brackets_the_estimate(scored) -> None:
    labels, scores, groups = scored
    ci = metrics.bootstrap_intervals(labels, scores, groups, num_samples=300, seed=1)
    point = metrics.ctr_metrics(labels, scores, groups)
    for key in ("auc", "gauc", "logloss"):
        lo, hi = ci[key]
        assert lo < point[key] < hi and hi - lo < 0.1
    assert ci == metrics.bootstrap_intervals(labels, scores, groups, num_samples=300, seed=1)


def test_bootstrap_intervals_equal_resampling_rows_by_hand(scored) -> None:
    # the plain procedure: per resample, draw users with replacement, stack their rows, score them
    labels, scores, groups = scored
    labels, scores, groups = labels[:1500], scores[:1500], groups[:1500]
    rng = np.random.default_rng(4)
    users = np.unique(groups)
    by_user = {u: np.flatnonzero(groups == u) for u in users}
    user_auc = {u: roc_auc_score(labels[m], scores[m]) for u, m in by_user.items() if 0 < labels[m].sum() < len(m)}
    draws = {"auc": [], "gauc": [], "logloss": []}
    for _ in range(60):
        drawn = users[rng.integers(0, len(users), len(users))]
        rows = np.concatenate([by_user[u] for u in drawn])
        y, p = labels[rows], scores[rows]
        draws["auc"].append(roc_auc_score(y, p))
        draws["logloss"].append(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1]))
        total = weight = 0.0
        for u in drawn:  # a user drawn twice counts twice; users with one class are left out
            if u in user_auc:
                total += len(by_user[u]) * user_auc[u]
                weight += len(by_user[u])
        draws["gauc"].append(total / weight)
    got = metrics.bootstrap_intervals(labels, scores, groups, num_samples=60, seed=4)
    for key, values in draws.items():
        assert got[key] == pytest.approx((np.quantile(values, 0.025), np.quantile(values, 0.975)), abs=1e-9), key


def test_a_nan_probability_blanks_only_the_resamples_that_draw_its_user(scored) -> None:
    labels, scores, groups = scored
    labels, scores, groups = labels[:600], scores[:600].astype(np.float64), groups[:600] % 40
    scores[groups == 7] = np.nan  # one user's rows
    rng = np.random.default_rng(2)
    users = np.unique(groups)
    by_user = {u: np.flatnonzero(groups == u) for u in users}
    losses = []
    for _ in range(80):  # the plain procedure: stack the drawn users' rows, mean row loss (NaN if drawn)
        rows = np.concatenate([by_user[u] for u in users[rng.integers(0, len(users), len(users))]])
        p = np.clip(scores[rows], 1e-7, 1 - 1e-7)
        losses.append(float(-(labels[rows] * np.log(p) + (1 - labels[rows]) * np.log(1 - p)).mean()))
    assert 0 < sum(map(np.isnan, losses)) < 80  # some resamples drew the user, some did not
    got = metrics.bootstrap_intervals(labels, scores, groups, num_samples=80, seed=2)["logloss"]
    assert got == pytest.approx((np.nanquantile(losses, 0.025), np.nanquantile(losses, 0.975)), abs=1e-9)


def test_paired_bootstrap_detects_a_better_model(scored) -> None:
    labels, scores, groups = scored
    noisy = np.clip(scores + np.random.default_rng(5).normal(0, 0.4, len(scores)), 0, 1)
    assert metrics.paired_bootstrap_pvalue(labels, scores, noisy, groups, 500) < 0.01
    assert metrics.paired_bootstrap_pvalue(labels, noisy, scores, groups, 500) > 0.99


def test_calibration_bins() -> None:
    probs = np.array([0.05, 0.05, 0.95, 0.95, 0.55])
    labels = np.array([0, 0, 1, 1, 0])
    bins = metrics.calibration_bins(labels, probs, 10)
    assert bins["counts"].tolist() == [2, 0, 0, 0, 0, 1, 0, 0, 0, 2]
    assert bins["observed"][9] == 1.0 and bins["predicted"][0] == pytest.approx(0.05)
    assert metrics.expected_calibration_error(labels, probs) == pytest.approx((2 * 0.05 + 0.55 + 2 * 0.05) / 5)


def test_paired_bootstrap_interval_matches_the_normal_approximation_and_keeps_pairs() -> None:
    from recsys.eval.metrics import paired_bootstrap_interval

    rng = np.random.default_rng(0)
    b = rng.uniform(size=3000)
    a = b + 0.02 + rng.normal(0, 0.1, size=3000)
    low, high = paired_bootstrap_interval(a, b, num_samples=4000)
    diff = a - b  # the textbook interval for a mean: x̄ ± 1.96·s/√n
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))
    assert abs(low - (diff.mean() - half)) < 0.1 * half and abs(high - (diff.mean() + half)) < 0.1 * half
    # pairs are kept: a constant shift has no spread at all (unpaired resampling would give a wide one)
    assert paired_bootstrap_interval(b + 0.05, b) == pytest.approx((0.05, 0.05))
    with pytest.raises(ValueError, match="equal-length finite"):
        paired_bootstrap_interval(np.array([0.1, np.nan]), np.array([0.1, 0.2]))
