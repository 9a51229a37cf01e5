from pathlib import Path

import pyarrow as pa
import pytest
import torch

from recsys.data.datamodule import CTRDataModule
from recsys.data.vocab import DatasetInfo, Vocabulary
from recsys.models.din import DIN
from recsys.text.features import ItemText, TextSpec, item_texts
from recsys.text.pooling import masked_mean


def test_item_texts_follow_the_item_table_rows(tiny_dataset: Path) -> None:
    vocab = Vocabulary.load_or_build(tiny_dataset)
    texts = item_texts(tiny_dataset, vocab, "title", "item")
    assert len(texts) == vocab.num_embeddings("item") and texts[0] == ""
    rows = vocab.lookup("item", pa.array([3, 17, 42]))
    assert [texts[r] for r in rows] == ["item 3", "item 17", "item 42"]  # the tiny data's title is "item <id>"
    with pytest.raises(ValueError, match="not a text feature"):
        item_texts(tiny_dataset, vocab, "item", "item")


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_item_text_vectors_match_a_per_row_reference(tiny_dataset: Path, pooling: str) -> None:
    info = DatasetInfo.from_any(CTRDataModule(str(tiny_dataset)).dataset_info)
    torch.manual_seed(0)
    module = ItemText(info, TextSpec(feature="title", pooling=pooling), "item", dim=6)
    rows = torch.tensor([5, 2, 5, 0, 9, 2])
    out = module(rows)
    assert out.shape == (6, 6)
    for i, r in enumerate(rows.tolist()):
        states, mask = module.states[-1, r : r + 1].float(), module.mask[r : r + 1]
        pooled = masked_mean(states, mask) if pooling == "mean" else module.head(states, mask)
        torch.testing.assert_close(out[i], module.proj(pooled)[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[1], out[0])  # different titles, different vectors


def _batch(dm: CTRDataModule):  # noqa: ANN202
    return next(iter(dm.stream("train")))


def test_din_joins_text_to_the_item_rows_and_trains_it(tiny_dataset: Path) -> None:
    dm = CTRDataModule(str(tiny_dataset), batch_size=64)
    plain = DIN(dm.dataset_info, embedding_dim=8, dnn_hidden_units=[16])
    model = DIN(dm.dataset_info, embedding_dim=8, dnn_hidden_units=[16], text=TextSpec(feature="title", combine="concat"))
    assert model.width["item"] == plain.width["item"] + 8 and model.width["hist_item"] == plain.width["hist_item"] + 8
    assert model.dnn.layers[0].in_features == plain.dnn.layers[0].in_features + 16  # target + attended behaviors
    logits = model(_batch(dm))
    assert logits.shape == (64,)
    logits.sum().backward()
    assert model.item_text.proj.weight.grad.abs().sum() > 0
    summed = DIN(dm.dataset_info, embedding_dim=8, dnn_hidden_units=[16], text={"feature": "title", "combine": "sum"})
    assert summed.width["item"] == 8 and summed(_batch(dm)).shape == (64,)
    with pytest.raises(ValueError, match="needs text.dim equal"):
        DIN(dm.dataset_info, embedding_dim=8, text=TextSpec(feature="title", combine="sum", dim=4))


def test_init_starts_the_item_table_from_the_texts(tiny_dataset: Path) -> None:
    dm = CTRDataModule(str(tiny_dataset), batch_size=64)
    torch.manual_seed(0)
    model = DIN(dm.dataset_info, embedding_dim=8, dnn_hidden_units=[16], text=TextSpec(feature="title", combine="init"))
    weight = model.sequence_tables.embeddings["t_item"].weight.detach()
    expected = model.item_text.initial_rows(float(weight.std()))
    torch.testing.assert_close(weight, expected, atol=1e-5, rtol=1e-4)
    assert model.width["item"] == 8
