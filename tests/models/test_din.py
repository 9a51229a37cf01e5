from pathlib import Path

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys.data.datamodule import CTRDataModule
from recsys.data.vocab import Vocabulary
from recsys.embedding.regularization import inverse_counts, mba_penalty
from recsys.eval.metrics import auc
from recsys.eval.report import predict_split
from recsys.models.din import DIN
from recsys.train.cli import run
from tests.conftest import ROOT, TINY_SCHEMA, write_dataset


def test_forward_shapes_shared_tables_and_gradients(tiny_dataset: Path) -> None:
    dm = CTRDataModule(str(tiny_dataset), batch_size=64)
    model = DIN(dm.dataset_info, embedding={"dim": 8}, attention_hidden_units=[12], dnn_hidden_units=[16])
    configs = {c.name: c.feature_names for c in model.embedding.rows["d8"].embedding_configs()}
    assert configs == {"t_item": ["item", "hist_item"]}  # the sequence reads its target's table, row by row
    assert model.pooled == ["user", "tags", "city"]
    batch = next(iter(dm.stream("train")))
    logits = model(batch)
    assert logits.shape == (64,)
    logits.sum().backward()
    assert model.embedding.table_weight("t_item").grad.abs().sum() > 0
    assert model.attention[0].first.weight.grad.abs().sum() > 0
    # pooled 3 x 8 + target 8 + interest 8 + 1 numeric
    assert model.dnn.layers[0].in_features == 3 * 8 + 8 + 8 + 1


def test_history_changes_the_prediction_only_through_attention(tiny_dataset: Path) -> None:
    dm = CTRDataModule(str(tiny_dataset), batch_size=32)
    model = DIN(dm.dataset_info, embedding={"dim": 8}).eval()
    batch = next(iter(dm.stream("val")))
    with torch.no_grad():
        base = model(batch)
        empty = batch.sequences.to_dict()["hist_item"]
        from recsys.data.batch import make_kjt

        no_history = make_kjt(
            {"hist_item": (empty.values()[:0].numpy(), torch.zeros(len(batch), dtype=torch.int32).numpy())}
        )
        changed = model(type(batch)(batch.dense, batch.sparse, no_history, batch.labels, batch.groups))
    had_history = empty.lengths() > 0
    assert torch.allclose(base[~had_history], changed[~had_history])
    assert not torch.allclose(base[had_history], changed[had_history])


def test_mba_penalty_matches_train_counts(tiny_dataset: Path) -> None:
    dm = CTRDataModule(str(tiny_dataset), batch_size=64)
    model = DIN(dm.dataset_info, embedding={"dim": 4}, mba_lambda=0.5, resources=dm.resources).train()
    batch = next(iter(dm.stream("train")))
    model(batch)  # the penalty covers the rows this forward looked up
    counts = Vocabulary.load_or_build(tiny_dataset).counts
    ids = {"item": torch.cat([batch.sparse["item"].values(), batch.sequences["hist_item"].values()])}
    ids |= {f: batch.sparse[f].values() for f in ("user", "city")}  # single-valued pooled features
    weights = {f: model.embedding.table_weight(f"t_{f}") for f in ("item", "user", "city")}
    expected = sum(
        mba_penalty(weights[t], table_ids, inverse_counts(torch.from_numpy(counts[t])), 0.5)
        for t, table_ids in ids.items()
    )
    penalty = model.embedding.regularization()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    # and the gradient reaching the tables is the weight-based one: 2λ w_j / n_j for rows in the batch
    penalty.backward()
    reference = model.embedding.table_weight("t_item").detach().clone().requires_grad_(True)
    mba_penalty(reference, ids["item"], inverse_counts(torch.from_numpy(counts["item"])), 0.5).backward()
    assert torch.allclose(model.embedding.table_weight("t_item").grad, reference.grad, atol=1e-6)
    assert model.embedding.regularization() == 0.0  # used once per forward


def _two_sequences(tmp_path: Path, same_lengths: bool) -> Path:
    schema = TINY_SCHEMA + "  - {name: hist_tag, type: sequence, target: city, max_len: 4}\n"
    root = write_dataset(tmp_path / "two", schema=schema)
    for split in ("train", "val", "test"):
        file = root / split / "part-0.parquet"
        table = pq.read_table(file)
        hist = table.column("hist_item").to_pylist()
        tags = [["paris"] * len(h) if same_lengths else ["paris"] * (len(h) + 1) for h in hist]
        pq.write_table(table.append_column("hist_tag", pa.array(tags, type=pa.list_(pa.string()))), file)
    return root


def test_sequences_attend_together_as_in_the_paper(tmp_path: Path) -> None:
    root = _two_sequences(tmp_path, same_lengths=True)
    dm = CTRDataModule(str(root), batch_size=16)
    model = DIN(dm.dataset_info, embedding={"dim": 4})
    assert model.attention[0].embedding_dim == 8  # item ⊕ city per behavior
    batch = next(iter(dm.stream("val")))
    assert model(batch).shape == (len(batch),)
    separate = DIN(dm.dataset_info, embedding={"dim": 4}, attention_groups=[["hist_item"], ["hist_tag"]])
    assert [a.embedding_dim for a in separate.attention] == [4, 4]


def test_unequal_sequences_in_one_group_are_refused(tmp_path: Path) -> None:
    root = _two_sequences(tmp_path, same_lengths=False)
    dm = CTRDataModule(str(root), batch_size=16)
    model = DIN(dm.dataset_info, embedding={"dim": 4})
    with pytest.raises(
        ValueError,
        match=r"attend together but differ in length in \d+ row\(s\) of this batch, first "
        r"batch row 0 \(file #0 of the split, row 0\)",
    ):
        model(next(iter(dm.stream("val"))))
    from recsys.data.check import check

    notes = [f.text() for f in check(root, progress=False).notes]
    assert any(
        "val/part-0.parquet: column 'hist_item': sequences ['hist_item', 'hist_tag'] differ in length" in n
        for n in notes
    ), notes
    # serving: a request whose grouped sequences differ in length is refused, naming the row
    from recsys.export.exporter import export
    from recsys.export.loader import RowError, load
    from tests.test_composition import save_checkpoint

    scorer = load(export(save_checkpoint(model, tmp_path / "din.ckpt"), tmp_path / "export", "fp32", progress=False))
    row = {
        "user": 1000,
        "item": 3,
        "tags": [],
        "city": "paris",
        "price": 10.0,
        "hist_item": [1, 2],
        "hist_tag": ["paris"],
    }
    with pytest.raises(RowError, match=r"row 0: sequences \['hist_item', 'hist_tag'\] .* lengths \[2, 1\]"):
        scorer.score([row])
    assert scorer.score([row | {"hist_tag": ["paris", "lyon"]}]).shape == (1,)
    with pytest.raises(ValueError, match="attention_groups must list each sequence feature"):
        DIN(dm.dataset_info, attention_groups=[["hist_item"]])


def test_needs_a_sequence_feature(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "flat", schema="label: click\nfeatures:\n  - {name: item, type: categorical}\n")
    with pytest.raises(ValueError, match="DIN needs at least one 'sequence' feature"):
        DIN(CTRDataModule(str(root)).dataset_info)


def test_learns_the_planted_signal(tiny_dataset: Path) -> None:
    L.seed_everything(0)
    dm = CTRDataModule(str(tiny_dataset), batch_size=128)
    model = DIN(
        dm.dataset_info,
        embedding={"dim": 8},
        attention_softmax=True,
        mba_lambda=0.001,
        resources=dm.resources,
        optimizer=lambda p: torch.optim.Adam(p, lr=0.01),
    )
    L.Trainer(
        max_epochs=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(model, dm)
    scored = predict_split(model, dm.stream("test"))
    assert auc(scored["label"], scored["prob"]) > 0.72


def test_din_config_runs(tiny_dataset: Path, tmp_path: Path) -> None:
    cli = run(
        [
            "fit",
            "--config",
            str(ROOT / "configs/movielens/din.yaml"),
            "--data.path",
            str(tiny_dataset),
            "--trainer.max_epochs",
            "2",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"),
            "--trainer.enable_progress_bar",
            "false",
            "--data.batch_size",
            "256",
        ]
    )
    assert isinstance(cli.model, DIN) and cli.model.embedding.mba_lambda > 0
    # a real validation AUC: the planted signal is learnable (NaN would have been logged as 0)
    assert 0.6 < cli.trainer.callback_metrics["val/auc"].item() < 1.0
