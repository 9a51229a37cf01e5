import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys.data.datamodule import CTRDataModule
from recsys.eval.metrics import ndcg_at_k, recall_at_k
from recsys.models.two_tower import TwoTower
from recsys.retrieval.index import VectorIndex
from tests.conftest import write_dataset
from tests.retrieval.towers import in_batch_loss_by_hand, small_tower

SCHEMA = """\
label: click
group: user
features:
  - {name: user, type: categorical}
  - {name: item, type: categorical}
  - {name: price, type: numeric}
  - {name: hist_item, type: sequence, target: item, max_len: 4}
  - {name: title, type: text}
"""


def test_exact_index_matches_brute_force_and_approximate_ones_mostly_agree() -> None:
    rng = np.random.default_rng(0)
    items = rng.normal(size=(3000, 16)).astype(np.float32)
    queries = rng.normal(size=(20, 16)).astype(np.float32)
    truth = np.argsort(-(queries @ items.T), axis=1)[:, :10]
    ids, scores = VectorIndex(items, kind="exact").search(queries, 10)
    assert np.array_equal(ids, truth)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ items.T, truth, 1), rtol=1e-5)
    for kind in ("hnsw", "ivf"):
        approx, _ = VectorIndex(items, kind=kind, nprobe=32).search(queries, 10)
        overlap = np.mean([len(set(a) & set(t)) / 10 for a, t in zip(approx, truth, strict=True)])
        assert overlap >= 0.8, (kind, overlap)
    excluded, _ = VectorIndex(items, ids=np.arange(3000) + 100).search(
        queries[:2], 5, exclude=[{truth[0, 0] + 100}, set()]
    )
    assert truth[0, 0] + 100 not in excluded[0] and excluded[1][0] == truth[1, 0] + 100


def test_recall_and_ndcg_by_hand() -> None:
    ranked = [[3, 1, 7], [5, 6, 2]]
    positives = [{1, 9}, {2}]
    assert recall_at_k(ranked, positives, 2) == pytest.approx((1 / 2 + 0) / 2)
    assert recall_at_k(ranked, positives, 3) == pytest.approx((1 / 2 + 1) / 2)
    # user 1: hit at rank 2 → (1/log2 3) / (1/log2 2 + 1/log2 3); user 2: hit at rank 3 → (1/log2 4) / 1
    expected = ((1 / np.log2(3)) / (1 + 1 / np.log2(3)) + 0.5) / 2
    assert ndcg_at_k(ranked, positives, 3) == pytest.approx(expected)
    assert math.isnan(recall_at_k([[1]], [set()], 1))  # no user with positives


def test_in_batch_softmax_with_log_q_matches_a_plain_reference(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d", schema=SCHEMA)
    dm = CTRDataModule(str(data), batch_size=64)
    model = small_tower(dm, temperature=0.5)
    batch = next(iter(dm.stream("train")))
    loss = model.training_loss(batch)
    clicked = batch.labels > 0.5
    total = in_batch_loss_by_hand(model, model.user_vectors(batch)[clicked], batch.sparse["item"].values()[clicked])
    assert float(loss) == pytest.approx(total / int(clicked.sum()), rel=1e-4)
    loss.backward()
    assert model.user_tower.layers[0].weight.grad.abs().sum() > 0


def test_vectors_are_normalized_and_history_matters(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d", schema=SCHEMA)
    dm = CTRDataModule(str(data), batch_size=32, eval_batch_size=32)
    model = TwoTower(dm.dataset_info, user="user", item="item", history="hist_item", embedding={"dim": 8}, output_dim=4)
    batch = next(iter(dm.stream("val")))
    users = model.user_vectors(batch)
    torch.testing.assert_close(users.norm(dim=1), torch.ones(32))
    torch.testing.assert_close(model.item_vectors(torch.tensor([1, 2, 3])).norm(dim=1), torch.ones(3))
    assert model(batch).shape == (32,)
    with pytest.raises(ValueError, match="must be a sequence of 'user'"):
        TwoTower(dm.dataset_info, user="user", item="user", history="hist_item")


def test_retrieve_end_to_end_excludes_seen_items_and_scores_cold_items(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recsys.retrieval.evaluate import Queries, Retriever

    data = write_dataset(tmp_path / "d", schema=SCHEMA)
    test_file = data / "test" / "part-0.parquet"
    table = pq.read_table(test_file)
    items = table.column("item").to_numpy().copy()
    items[:40] = 1000 + np.arange(40) % 5  # five items no train row has: cold
    pq.write_table(table.set_column(table.schema.get_field_index("item"), "item", pa.array(items)), test_file)
    dm = CTRDataModule(str(data), batch_size=128)
    model = TwoTower(dm.dataset_info, user="user", item="item", history="hist_item", embedding={"dim": 8}, output_dim=4)
    retriever = Retriever(model, data, "title")
    assert retriever.catalogue.cold.sum() == 5
    report = retriever.evaluate(din=None, k=10, rerank_depth=20)
    queries = Queries(retriever.catalogue, "test", "user", "item", "click")
    both = retriever.evaluate(din=None, k=[5, 10], rerank_depth=20)  # several cut-offs: the same lists, cut
    assert both["ks"] == [5, 10] and both["alpha"] == report["alpha"]
    for name, metrics in both["results"].items():
        assert metrics["recall@10"] == report["results"][name]["recall@10"]
        assert metrics["recall@5"] <= metrics["recall@10"]
    assert report["cold_items"] == 5 and report["users"] == len(queries.users) > 0
    for name, metrics in report["results"].items():
        assert 0 <= metrics["recall@10"] <= 1 and 0 <= metrics["ndcg@10"] <= 1, name
    # the fused score: a cold item's ID score is its content score (it has no trained ID row)
    s_id, s_text = retriever.scores(queries)
    fused = retriever.fused(s_id, s_text, 0.7)
    cold = retriever.catalogue.cold
    from recsys.retrieval.evaluate import _standardize

    np.testing.assert_allclose(fused[:, cold], _standardize(s_text)[:, cold], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        fused[:, ~cold], (0.7 * _standardize(s_id) + 0.3 * _standardize(s_text))[:, ~cold], rtol=1e-5, atol=1e-5
    )
    # every user has seen most of the 60 train items: what remains are the unseen ones
    s_id, s_text = retriever.scores(queries)
    assert s_id.shape == s_text.shape == (len(queries.users), len(retriever.catalogue.items))
    assert np.allclose(np.linalg.norm(retriever.text_items, axis=1), 1, atol=1e-5)
    ranked, _ = retriever.index_text.search(retriever.user_vectors(queries)[1], 10, queries.seen)
    for row, seen in zip(ranked, queries.seen, strict=True):
        assert not (set(int(i) for i in row if i >= 0) & seen)
    # DIN re-ranking reorders each user's candidates, dropping and adding none
    from recsys.models.din import DIN

    din = DIN(dm.dataset_info, embedding={"dim": 8}, dnn_hidden_units=[8])
    candidates = [
        list(r[:7]) for r in retriever.index_id.search(retriever.user_vectors(queries)[0], 7, queries.seen)[0]
    ]
    reranked = retriever.rerank(din, queries, candidates)
    assert all(sorted(a) == sorted(b) for a, b in zip(reranked, candidates, strict=True))
    assert "hybrid_learned+din" in retriever.evaluate(din=din, k=10, rerank_depth=20)["results"]
    # α is chosen on val: the queries it is scored on are the val split's users, whatever split is reported
    chosen_on = []
    choose = Retriever.alpha
    monkeypatch.setattr(
        Retriever, "alpha", lambda self, q, k, floor: chosen_on.append(q.split) or choose(self, q, k, floor)
    )
    assert retriever.evaluate(din=None, k=10, rerank_depth=20, split="test")["split"] == "test"
    assert chosen_on == ["val"]


def test_item_text_can_carry_more_item_columns(tmp_path: Path) -> None:
    from recsys.data.vocab import Vocabulary
    from recsys.retrieval.evaluate import Catalogue, _standardize

    data = write_dataset(tmp_path / "d", schema=SCHEMA)
    vocab = Vocabulary.load_or_build(data)
    catalogue = Catalogue(data, vocab, "item", "title", text_with=["title"])
    assert catalogue.texts[0].startswith("item ") and ". title: item " in catalogue.texts[0]
    with pytest.raises(ValueError, match="'price' is not an item-level column"):
        Catalogue(data, vocab, "item", "title", text_with=["price"])
    z = _standardize(np.array([[1.0, 2.0, 3.0], [10.0, 10.0, 40.0]]))
    np.testing.assert_allclose(z.mean(1), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(1), 1, atol=1e-12)


def test_the_catalogue_adds_the_datasets_item_file_and_warm_and_cold_positives_partition(tmp_path: Path) -> None:
    from recsys.data.vocab import Vocabulary
    from recsys.retrieval.evaluate import Catalogue, Queries

    data = write_dataset(tmp_path / "d", schema=SCHEMA)
    vocab = Vocabulary.load_or_build(data)
    before = Catalogue(data, vocab, "item", "title")
    pq.write_table(pa.table({"item": [5000], "title": ["an item nobody met"]}), data / "items.parquet")
    after = Catalogue(data, vocab, "item", "title")
    assert list(after.items) == list(before.items) + [5000]
    assert after.cold[-1] and after.texts[-1] == "an item nobody met"
    queries = Queries(after, "test", "user", "item", "click")
    for every, cold, warm in zip(queries.positives, queries.cold_positives, queries.warm_positives, strict=True):
        assert cold | warm == every and not cold & warm
        assert all(after.cold[p] for p in cold) and not any(after.cold[p] for p in warm)


def test_val_in_batch_loss_is_the_training_loss_on_the_val_clicks(tmp_path: Path) -> None:
    import lightning as L

    data = write_dataset(tmp_path / "d", schema=SCHEMA)
    dm = CTRDataModule(str(data), batch_size=64, eval_batch_size=128)
    model = small_tower(dm)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, dm)
    model.eval()
    total, clicks = 0.0, 0
    with torch.no_grad():  # the plain reference: each val batch's clicks, row by row
        for batch in dm.stream("val"):
            clicked = batch.labels > 0.5
            users, rows = model.user_vectors(batch)[clicked], batch.sparse["item"].values()[clicked]
            total, clicks = total + in_batch_loss_by_hand(model, users, rows), clicks + int(clicked.sum())
    assert float(trainer.callback_metrics["val/in_batch_loss"]) == pytest.approx(total / clicks, rel=1e-5)
