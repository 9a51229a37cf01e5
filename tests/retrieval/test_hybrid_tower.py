"""The hybrid tower: a two-tower with item text whose ID rows are dropped in training (DropoutNet), so
that items without a trained row (cold items) get a vector from their text."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys.data.datamodule import CTRDataModule
from recsys.models.two_tower import TwoTower
from tests.retrieval.towers import in_batch_loss_by_hand, small_tower

TEXT = {"pooling": "mean", "dim": 4}


def _tower(dm: CTRDataModule, dropout: float, text: dict | None = TEXT, mba: float = 0.0) -> TwoTower:
    return small_tower(dm, item_id_dropout=dropout, text=text, mba_lambda=mba, resources=dm.resources)


def test_dropped_rows_read_the_oov_row_and_keep_their_text_forward_and_backward(tiny_dataset: Path) -> None:
    dm = CTRDataModule(str(tiny_dataset), batch_size=64)
    model = _tower(dm, 0.5)
    rows = torch.arange(1, 41)
    items = model.embedding.embed_ids("item", rows)  # [40, 8 ID + 4 text]
    table = model.embedding.table_weight("t_item")
    text = model.embedding.item_text["item"](rows)
    torch.manual_seed(3)
    out = model._drop_ids(items)
    torch.manual_seed(3)
    drop = (torch.rand(40, 1) < 0.5).flatten().tolist()
    assert 5 < sum(drop) < 35
    for i, dropped in enumerate(drop):  # the plain reference: row by row
        id_part = table[0] if dropped else table[rows[i]]
        torch.testing.assert_close(out[i], torch.cat([id_part, text[i]]))
    out.sum().backward()  # the OOV row learns from the dropped rows, each item's own row from the kept ones
    grad = table.grad if table.grad is not None else model.embedding.table_weight("t_item").grad
    assert grad is not None
    torch.testing.assert_close(grad[0], torch.full((8,), float(sum(drop))))
    for i, dropped in enumerate(drop):
        assert float(grad[rows[i]].abs().sum()) == (0.0 if dropped else 8.0)
    model.eval()
    torch.testing.assert_close(model._drop_ids(items), items)  # nothing is dropped outside training


def test_item_vectors_take_other_text_in_place_of_the_rows(tiny_dataset: Path) -> None:
    dm = CTRDataModule(str(tiny_dataset), batch_size=64)
    model = _tower(dm, 0.5).eval()
    rows, other = torch.tensor([0, 3, 7]), torch.randn(3, 4)
    ids = model.embedding.table_weight("t_item")[rows]
    expected = torch.nn.functional.normalize(model.item_tower(torch.cat([ids, other], dim=1)), dim=1)
    torch.testing.assert_close(model.item_vectors(rows, text=other), expected)
    own = model.embedding.item_text["item"](rows)
    torch.testing.assert_close(model.item_vectors(rows, text=own), model.item_vectors(rows))


@pytest.mark.parametrize(
    "dropout, text, message",
    [
        (0.5, None, "item_id_dropout: an item whose ID row is dropped keeps only its text"),
        (0.5, {"pooling": "mean", "combine": "sum", "dim": 8}, "no item text combined by concat"),
        (1.0, TEXT, r"item_id_dropout: 1.0 is not in \[0, 1\)"),
    ],
)
def test_item_id_dropout_is_refused_where_nothing_would_stand_for_the_id(
    tiny_dataset: Path, dropout: float, text: dict | None, message: str
) -> None:
    dm = CTRDataModule(str(tiny_dataset), batch_size=64)
    with pytest.raises(ValueError, match=message):
        _tower(dm, dropout, text)


def test_retrieval_scores_cold_items_through_the_hybrid_towers_text(tmp_path: Path, tiny_dataset: Path) -> None:
    from recsys.retrieval.evaluate import Queries, Retriever
    from recsys.text.encoder import TextEncoder

    test_file = tiny_dataset / "test" / "part-0.parquet"
    table = pq.read_table(test_file)
    items = table.column("item").to_numpy().copy()
    items[:40] = 1000 + np.arange(40) % 5  # five items no train row has: cold, with titles of their own
    titles = [f"item {i}" for i in items]
    table = table.set_column(table.schema.get_field_index("item"), "item", pa.array(items))
    pq.write_table(table.set_column(table.schema.get_field_index("title"), "title", pa.array(titles)), test_file)
    dm = CTRDataModule(str(tiny_dataset), batch_size=64)
    id_tower = TwoTower(dm.dataset_info, user="user", item="item", history="hist_item", embedding={"dim": 8})
    hybrid = _tower(dm, 0.5)
    retriever = Retriever(id_tower, tiny_dataset, "title", hybrid_tower=hybrid)
    catalogue = retriever.catalogue
    assert catalogue.cold.sum() == 5
    # every item: its ID row (cold: the OOV row) ⊕ its title through the hybrid's own head and projection
    with torch.no_grad():
        states, mask = TextEncoder()(catalogue.texts)  # [L, N, T, D], [N, T]
    item_text = hybrid.embedding.item_text["item"]
    with torch.no_grad():
        text = item_text.proj((states[-1] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))  # mean pooling
        expected = hybrid.item_vectors(torch.from_numpy(catalogue.rows), text=text)
    np.testing.assert_allclose(retriever.hybrid_items, expected.numpy(), atol=2e-3)
    cold = np.flatnonzero(catalogue.cold)
    assert np.abs(retriever.hybrid_items[cold[0]] - retriever.hybrid_items[cold[1]]).max() > 1e-3  # not one OOV vector
    warm = torch.from_numpy(catalogue.rows[~catalogue.cold])
    with torch.no_grad():  # a warm item's title is its table's text row
        np.testing.assert_allclose(retriever.hybrid_items[~catalogue.cold], hybrid.item_vectors(warm), atol=2e-3)
    # the learned hybrid: the tower's own z-scores for warm items, blended with content's for cold ones
    queries = Queries(catalogue, "test", "user", "item", "click")
    s_id, s_text = retriever.scores(queries)
    s_hybrid = retriever.hybrid_scores(queries, s_id)
    with torch.no_grad():
        from recsys.retrieval.evaluate import _encode

        users = hybrid.user_vectors(_encode(retriever.vocab, queries.templates)).numpy()
    np.testing.assert_allclose(s_hybrid, users @ retriever.hybrid_items.T, atol=1e-5)
    fused = retriever.fused(s_hybrid, s_text, 0.7)
    for u in range(len(s_hybrid)):  # the plain reference: per user, per item
        z_h = (s_hybrid[u] - s_hybrid[u].mean()) / s_hybrid[u].std()
        z_t = (s_text[u] - s_text[u].mean()) / s_text[u].std()
        for i in range(len(z_h)):
            expected = 0.7 * z_h[i] + 0.3 * z_t[i] if catalogue.cold[i] else z_h[i]
            assert abs(fused[u, i] - expected) < 1e-4
    report = retriever.evaluate(din=None, k=10, rerank_depth=20)
    assert list(report["results"]) == ["id", "text", "hybrid_rrf", "hybrid_tower", "hybrid_learned"]
    assert report["results"]["hybrid_tower"]["cold_recall@10"] >= 0


def test_the_cold_floor_keeps_the_alpha_whose_cold_recall_is_at_least_contents(
    tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recsys.retrieval.evaluate import Queries, Retriever

    dm = CTRDataModule(str(tiny_dataset), batch_size=64)
    retriever = Retriever(_tower(dm, 0.0, None), tiny_dataset, "title")
    val = Queries(retriever.catalogue, "val", "user", "item", "click")
    cold = np.zeros(len(retriever.catalogue.items), dtype=bool)
    cold[::4] = True  # a quarter of the items made cold: their ID score is their content score (back-off)
    monkeypatch.setattr(retriever.catalogue, "cold", cold)
    val = Queries(retriever.catalogue, "val", "user", "item", "click")
    s_id, s_text = retriever.scores(val)

    def recall(scores: np.ndarray, positives: list[set]) -> float:  # plain loop: top 5 unseen per user
        values = []
        for u, wanted in enumerate(positives):
            if wanted:
                top = [int(i) for i in np.argsort(-scores[u], kind="stable") if int(i) not in val.seen[u]][:5]
                values.append(len(set(top) & wanted) / len(wanted))
        return float(np.mean(values))

    floor = recall(s_text, val.cold_positives)
    kept = {}
    for a in np.arange(11) / 10:
        fused = retriever.fused(s_id, s_text, a)
        if recall(fused, val.cold_positives) >= floor:
            kept[a] = recall(fused, val.positives)
    assert 0.0 in kept  # α = 0 ranks as content does
    expected = max(kept, key=lambda a: (kept[a], -a))  # ties: the smaller α, as best_on_val
    assert retriever.alpha(val, 5, cold_floor=True) == pytest.approx(expected)
    overall = {a: recall(retriever.fused(s_id, s_text, a), val.positives) for a in np.arange(11) / 10}
    unconstrained = max(overall, key=lambda a: (overall[a], -a))
    assert retriever.alpha(val, 5) == pytest.approx(unconstrained) and unconstrained != expected  # the floor bites


def test_retrieve_refuses_a_hybrid_tower_without_item_text(tiny_dataset: Path) -> None:
    from recsys.retrieval.evaluate import Retriever

    dm = CTRDataModule(str(tiny_dataset), batch_size=64)
    plain = _tower(dm, 0.0, None)
    with pytest.raises(ValueError, match="--hybrid-tower: expected a TwoTower over 'item' with item text"):
        Retriever(plain, tiny_dataset, "title", hybrid_tower=_tower(dm, 0.0, None))


def test_the_oov_side_lookup_keeps_the_batchs_mba_rows_and_its_nonfinite_flag(tiny_dataset: Path) -> None:
    dm = CTRDataModule(str(tiny_dataset), batch_size=64)
    batch = next(iter(dm.stream("train")))
    penalties = []
    for dropout in (0.0, 0.5):  # the same weights (seed 0): only the tower's input differs
        model = _tower(dm, dropout, mba=0.1)
        model.training_loss(batch)
        penalties.append(float(model.embedding.regularization()))
    assert penalties[0] > 0 and penalties[1] == pytest.approx(penalties[0])  # the batch's rows, not the OOV row's
    layer = _tower(dm, 0.5).embedding
    for side_last in (True, False):  # a NaN in the batch's lookups is flagged whichever backward runs last
        rows = torch.arange(1, 9)
        main = layer.embed_ids("item", rows) if not side_last else None
        side = layer.embed_ids("item", torch.zeros(1, dtype=torch.long))
        main = layer.embed_ids("item", rows) if side_last else main
        (main.sum() * float("nan") + side.sum()).backward()
        assert layer.nonfinite_gradient


def test_val_in_batch_loss_leaves_out_a_shares_padding(tiny_dataset: Path) -> None:
    import dataclasses

    dm = CTRDataModule(str(tiny_dataset), batch_size=64, eval_batch_size=64)
    model = _tower(dm, 0.5).eval()
    batch = next(iter(dm.stream("val")))
    padded = dataclasses.replace(batch, padded=20)  # the last 20 rows repeat a real row on this rank
    model.on_validation_epoch_start()
    with torch.no_grad():
        model.validation_step(padded, 0)
        real = (batch.labels > 0.5) & (torch.arange(len(batch)) < len(batch) - 20)
        users, rows = model.user_vectors(batch)[real], batch.sparse["item"].values()[real]
        total = in_batch_loss_by_hand(model, users, rows)  # the plain reference over the real clicked rows
    assert model._val_in_batch[1] == len(rows) < int((batch.labels > 0.5).sum())
    assert model._val_in_batch[0] == pytest.approx(total, rel=1e-4)
