"""Tiny generated datasets in the recsys contract, with a planted click signal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT / "data" / "ml100k-ctr"

TINY_SCHEMA = """\
label: click
group: user
features:
  - {name: user, type: categorical}
  - {name: item, type: categorical}
  - {name: tags, type: categorical_list}
  - {name: city, type: categorical, num_buckets: 7}
  - {name: price, type: numeric}
  - {name: hist_item, type: sequence, target: item, max_len: 4}
  - {name: title, type: text, item: item}
"""


def make_rows(n: int, seed: int, num_users: int = 40, num_items: int = 60, row_offset: int = 0) -> pa.Table:
    """Rows whose click depends on the item (and the user's taste), so a model can learn it."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, num_users, n)
    item = rng.integers(0, num_items, n)
    item_quality = np.sin(np.arange(num_items) * 1.7)
    user_bias = np.cos(np.arange(num_users) * 0.9) * 0.5
    price = rng.normal(10, 3, n)
    logit = 2.5 * item_quality[item] + user_bias[user] - 0.2 * (price - 10)
    click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    hist_len = rng.integers(0, 7, n)
    hist = [rng.integers(0, num_items, k).tolist() for k in hist_len]
    tags = [[f"t{t}" for t in rng.integers(0, 5, rng.integers(0, 3))] for _ in range(n)]
    cities = np.array(["paris", "lyon", "nice", "lille", None], dtype=object)[rng.integers(0, 5, n)]
    return pa.table(
        {
            "click": click,
            "user": user + 1000,
            "item": item,
            "tags": pa.array(tags, type=pa.list_(pa.string())),
            "city": pa.array(cities.tolist(), type=pa.string()),
            "price": price,
            "hist_item": pa.array(hist, type=pa.list_(pa.int64())),
            "title": [f"item {i}" for i in item],
            "row_id": np.arange(row_offset, row_offset + n),
        }
    )


def write_dataset(
    root: Path, rows: dict[str, int] | None = None, schema: str = TINY_SCHEMA, row_group_size: int = 256
) -> Path:
    rows = rows or {"train": 3000, "val": 600, "test": 600}
    root.mkdir(parents=True, exist_ok=True)
    (root / "schema.yaml").write_text(schema)
    offset = 0
    for i, (split, n) in enumerate(rows.items()):
        (root / split).mkdir(exist_ok=True)
        pq.write_table(
            make_rows(n, seed=i, row_offset=offset), root / split / "part-0.parquet", row_group_size=row_group_size
        )
        offset += n
    return root


WORDS = ("great", "quiet", "red", "fast", "local", "classic", "fresh", "simple", "bright", "old", "prime", "neat")
TEXT_SCHEMA = """\
label: click
group: user
features:
  - {name: user, type: categorical}
  - {name: query, type: text}
"""


def write_text_dataset(root: Path, rows: dict[str, int] | None = None, word: str = "bargain") -> Path:
    """Row-level text whose click is planted in its words: the label is 1 exactly when the row's
    text contains ``word`` (about half the rows); ids carry no signal. At most 400 distinct texts."""
    rows = rows or {"train": 1200, "val": 300, "test": 300}
    rng = np.random.default_rng(7)
    texts = []
    for i in range(400):
        words = list(rng.choice(WORDS, size=3, replace=False))
        if i % 2:
            words.insert(int(rng.integers(0, 4)), word)
        texts.append(" ".join(words))
    root.mkdir(parents=True, exist_ok=True)
    (root / "schema.yaml").write_text(TEXT_SCHEMA)
    for i, (split, n) in enumerate(rows.items()):
        (root / split).mkdir(exist_ok=True)
        pick = np.random.default_rng(i).integers(0, len(texts), n)
        query = [texts[j] for j in pick]
        pq.write_table(
            pa.table(
                {
                    "click": np.array([int(word in q.split()) for q in query]),
                    "user": np.random.default_rng(i + 10).integers(0, 30, n),
                    "query": query,
                }
            ),
            root / split / "part-0.parquet",
        )
    return root


def plain_ctr_metrics(labels: np.ndarray, probs: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """AUC, GAUC and logloss by the protocol's definitions, written independently of recsys.eval.metrics:
    scikit-learn's ROC AUC, a loop over groups, the clipped cross-entropy formula."""
    from sklearn.metrics import roc_auc_score

    weighted, rows = 0.0, 0
    for group in np.unique(groups):
        mine = groups == group
        if len(np.unique(labels[mine])) == 2:  # only groups holding both classes
            weighted += mine.sum() * roc_auc_score(labels[mine], probs[mine])
            rows += mine.sum()
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    logloss = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    return {"auc": roc_auc_score(labels, probs), "gauc": weighted / rows, "logloss": logloss}


def fit_and_auc(model, dm, epochs: int = 4) -> float:  # noqa: ANN001
    """Trains ``model`` on ``dm`` with a plain Lightning trainer; its test AUC."""
    import lightning as L

    from recsys.eval.metrics import auc
    from recsys.eval.report import predict_split

    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    scored = predict_split(model, dm.stream("test"))
    return auc(scored["label"], scored["prob"])


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "tiny")


@pytest.fixture(scope="session")
def ml100k() -> Path:
    """The prepared ml100k-ctr directory (`make test` prepares it first)."""
    if not (ML100K / "PREPARED.json").exists():
        import subprocess
        import sys

        subprocess.run(
            [sys.executable, str(ROOT / "datasets/movielens/prepare.py"), "--out", str(ML100K)], check=True, cwd=ROOT
        )
    return ML100K


# trained checkpoints of every table kind (export and serve tests share them)
from tests.export.helpers import trained  # noqa: E402, F401
