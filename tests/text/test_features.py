"""Text as features of any model: item text joined to the item's rows, row-level text as a feature."""

from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pytest
import torch

from recsys.data.datamodule import CTRDataModule
from recsys.embedding.layer import EmbeddingLayer
from recsys.models.base import EmbeddingMLP
from recsys.models.din import DIN
from recsys.models.dlrm import DLRM
from recsys.models.two_tower import TwoTower
from recsys.text.features import TextConfigError
from tests.conftest import fit_and_auc, write_text_dataset


@pytest.fixture
def dm(tiny_dataset: Path) -> CTRDataModule:
    return CTRDataModule(str(tiny_dataset), batch_size=64)


def test_item_texts_follow_the_item_table_rows(dm: CTRDataModule) -> None:
    texts = dm.resources.item_texts("title", "item")
    assert len(texts) == dm.vocab.num_embeddings("item") and texts[0] == ""  # row 0: the OOV row
    rows = dm.vocab.lookup("item", pa.array([3, 17, 42]))
    assert [texts[r] for r in rows] == ["item 3", "item 17", "item 42"]  # the tiny data's title is "item <id>"


@pytest.mark.parametrize("pooling", ["mean", "attention", "gem"])
def test_item_text_vectors_match_a_reference_computed_from_the_encoder(dm: CTRDataModule, pooling: str) -> None:
    torch.manual_seed(0)
    layer = EmbeddingLayer(dm.resources.info, {"dim": 8}, {"pooling": pooling, "dim": 4}, resources=dm.resources)
    module = layer.item_text["item"]
    encoder = dm.resources.text_encoder(None, 32)
    raw = [3, 17, 42]
    rows = torch.as_tensor(dm.vocab.lookup("item", pa.array(raw)))
    out = module(rows)
    states, mask = encoder([f"item {i}" for i in raw])  # the texts encoded afresh, not read from the module
    for i in range(len(raw)):
        tokens = [states[-1, i, t].float() for t in range(mask.shape[1]) if mask[i, t]]
        if pooling == "mean":
            pooled = sum(tokens) / len(tokens)
        elif pooling == "gem":  # (mean of max(x, eps)^p over the real tokens)^(1/p), per dimension
            p = float(module.head.p.detach())
            pooled = (sum(tok.clamp(min=1e-6) ** p for tok in tokens) / len(tokens)) ** (1 / p)
        else:  # softmax over the real tokens of q·k/√D, then the weighted sum (the head's formula, by hand)
            query = module.head.query.detach()
            scores = torch.stack([tok @ query for tok in tokens]) / 384**0.5
            pooled = sum(w * tok for w, tok in zip(scores.softmax(0), tokens, strict=True))
        expected = module.proj.weight.detach() @ pooled + module.proj.bias.detach()
        torch.testing.assert_close(out[i].detach(), expected, atol=2e-3, rtol=1e-3)  # states are cached in fp16
    assert not torch.allclose(out[1], out[0])  # different titles, different vectors


@pytest.mark.parametrize("pooling", ["attention", "gem", "latent", "multilayer"])
def test_length_groups_and_cached_pooling_give_the_heads_plain_output_and_gradients(pooling: str) -> None:
    """ItemText pools a batch's texts in groups of similar length (GeM from cached logs, multilayer from
    cached layer means, latent from the real tokens alone); the head over the whole padded batch at once
    is the reference, also for a batch whose longest text is shorter than the cache's width."""
    from recsys.text.features import ItemText, TextSpec

    torch.manual_seed(0)
    layers, rows, length, width = 3, 12, 20, 16
    states = torch.randn(layers, rows, length, width).half().float()  # what the module stores (fp16)
    lengths = torch.tensor([9, 2, 20, 4, 16, 7, 1, 15, 3, 17, 5, 8])  # every length group, rows out of order
    mask = (torch.arange(length) < lengths[:, None]).long()
    spec = TextSpec(pooling=pooling, dim=4, max_length=length, encoder_dim=width, encoder_layers=layers)
    module = ItemText(spec, rows, 4, states, mask)
    batch = torch.tensor([11, 0, 5, 3, 5, 8, 1, 9, 2, 10, 4, 6, 7, 0])
    full = states if pooling == "multilayer" else states[-1]
    close = {"atol": 3e-3, "rtol": 1e-3} if pooling == "gem" else {"atol": 1e-5, "rtol": 1e-4}  # GeM: fp16 logs
    short = torch.tensor([0, 5, 3, 1, 5])  # lengths 9, 7, 4, 2: none fills the width of 20
    with torch.no_grad():
        torch.testing.assert_close(module(short), module.proj(module.head(full, mask))[short], **close)
    out = module(batch)
    expected = module.proj(module.head(full, mask))[batch]
    torch.testing.assert_close(out, expected, **close)
    parameters = [p for p in module.parameters() if p.requires_grad]
    weights = torch.randn_like(out)
    got = torch.autograd.grad((out * weights).sum(), parameters)
    want = torch.autograd.grad((expected * weights).sum(), parameters)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=5e-3, rtol=1e-2)


def test_head_dim_keeps_the_top_principal_components_of_the_item_tokens() -> None:
    from recsys.text.features import ItemText, TextSpec

    torch.manual_seed(0)
    rows, length, width = 40, 10, 16
    states = torch.randn(1, rows, length, width) * torch.linspace(3, 0.1, width)  # unequal variances
    mask = (torch.arange(length) < torch.randint(1, length + 1, (rows, 1))).long()
    spec = TextSpec(pooling="latent", dim=4, max_length=length, head_dim=8, encoder_dim=width, encoder_layers=1)
    module = ItemText(spec, rows, 4, states, mask)
    assert module.states.shape == (1, rows, length, 8) and module.head.latents.shape[1] == 8
    tokens = states[0][mask.bool()].double()
    projected = module.states[0][mask.bool()].double()
    eigenvalues = np.linalg.eigvalsh(np.cov(tokens.numpy(), rowvar=False))  # ascending
    # projection onto the top 8 principal directions: centred, and it keeps exactly their variance
    assert projected.mean(0).abs().max() < 1e-2
    np.testing.assert_allclose(projected.var(0).sum().item(), eigenvalues[-8:].sum(), rtol=1e-2)
    assert module(torch.tensor([3, 1, 3])).shape == (3, 4)


@pytest.mark.parametrize("cls", [EmbeddingMLP, DIN, DLRM, TwoTower])
def test_every_model_joins_item_text_to_the_item_and_trains_the_head(dm: CTRDataModule, cls: type) -> None:
    extra = {"user": "user", "item": "item", "history": "hist_item"} if cls is TwoTower else {}
    plain = cls(dm.dataset_info, embedding={"dim": 8}, resources=dm.resources, **extra)
    model = cls(
        dm.dataset_info, embedding={"dim": 8}, text={"pooling": "gem", "dim": 4}, resources=dm.resources, **extra
    )
    widths, plain_widths = model.embedding.output_dims(), plain.embedding.output_dims()
    assert widths["item"] == plain_widths["item"] + 4 and widths["hist_item"] == plain_widths["hist_item"] + 4
    assert widths["user"] == plain_widths["user"]
    batch = next(iter(dm.stream("train")))
    model.train()
    loss = model.training_loss(batch)
    loss.backward()
    text = model.embedding.item_text["item"]
    assert text.proj.weight.grad.abs().sum() > 0 and text.head.p.grad is not None  # GeM's p learns too


def test_sum_and_init_combine(dm: CTRDataModule) -> None:
    summed = DIN(dm.dataset_info, embedding={"dim": 8}, text={"combine": "sum"}, resources=dm.resources)
    assert summed.embedding.output_dims()["item"] == 8 and summed(next(iter(dm.stream("train")))).shape == (64,)
    torch.manual_seed(0)
    init = DIN(dm.dataset_info, embedding={"dim": 8}, text={"combine": "init"}, resources=dm.resources)
    weight = init.embedding.table_weight("t_item").detach()
    # reference: each row's text mean-pooled by the encoder afresh, centred, on its top 8 principal axes
    texts = dm.resources.item_texts("title", "item")
    states, mask = dm.resources.text_encoder(None, 32)([t for t in texts])
    m = mask.unsqueeze(-1).float()
    pooled = ((states[-1].float() * m).sum(1) / m.sum(1).clamp(min=1)).double()
    centered = pooled - pooled.mean(0)
    _, _, vt = torch.linalg.svd(centered, full_matrices=False)
    projected = centered @ vt[:8].T
    assert weight.shape == projected.shape
    # the table is that projection scaled (the sign of each axis is arbitrary): equal up to scale and signs
    signs = torch.sign((weight.double() * projected).sum(0))
    ratio = (weight.double() * signs) / projected
    assert float(ratio.std() / ratio.mean().abs()) < 0.02  # one common scale (fp16 caching makes it ~1e-3)
    assert init.embedding.output_dims()["item"] == 8 and not len(init.embedding.item_text)  # no text at run time


def test_a_width_given_on_the_command_line_is_read_as_a_number() -> None:
    from recsys.text.features import TextSpec

    # --model.init_args.text.dim 16 arrives as the string "16": the block is a free mapping to the CLI
    assert TextSpec.parse({"dim": "16", "head_dim": "64", "pooling": "latent"}).dim == 16
    with pytest.raises(TextConfigError, match="got '1.5'"):
        TextSpec.parse({"dim": "1.5"})


@pytest.mark.parametrize(
    "text, message",
    [
        ({"feature": "title"}, r"text.feature: the text block names no column"),
        ({"dim": 6}, r"text.dim: a positive multiple of 4"),
        ({"pooling": "median"}, r"text.pooling: one of"),
        ({"combine": "sum", "dim": 4}, r"text.dim: combine sum needs the 'item' table width 8, got 4"),
        ({"typo": 1}, r"text.typo: unknown key"),
        ({"pooling": "latent", "head_dim": 30}, r"text.head_dim: a positive multiple of 4"),
        ({"pooling": "mean", "head_dim": 64}, r"text.head_dim: the 'mean' head has no parameters"),
        ({"pooling": "gem", "head_dim": 64}, r"text.head_dim: GeM pools positive values"),
    ],
)
def test_bad_text_blocks_name_their_key(dm: CTRDataModule, text: dict, message: str) -> None:
    with pytest.raises(TextConfigError, match=message):
        EmbeddingMLP(dm.dataset_info, embedding={"dim": 8}, text=text, resources=dm.resources)
    with pytest.raises(TextConfigError, match="init starts a plain item table"):
        EmbeddingMLP(
            dm.dataset_info, embedding={"kind": "hashed", "rows": 20}, text={"combine": "init"}, resources=dm.resources
        )


def test_row_level_text_learns_a_planted_word(tmp_path: Path) -> None:
    """Label = the row's text contains 'bargain'; ids carry nothing. With the text block the model reads
    the word (test AUC ≥ 0.9), without it it cannot (≤ 0.6)."""
    data = write_text_dataset(tmp_path / "words")
    aucs = {}
    for name, text in (("text", {"pooling": "mean", "dim": 8}), ("ids only", None)):
        L.seed_everything(0)
        dm = CTRDataModule(str(data), batch_size=64)
        model = EmbeddingMLP(
            dm.dataset_info,
            embedding={"dim": 8},
            text=text,
            dnn_hidden_units=[32],
            resources=dm.resources,
            optimizer=lambda p: torch.optim.Adam(p, lr=0.01),
        )
        if text:
            assert model.embedding.pooled_features == ["user", "query"] and model.embedding.output_dims()["query"] == 8
        aucs[name] = fit_and_auc(model, dm, epochs=6)
    assert aucs["text"] >= 0.9 and aucs["ids only"] <= 0.6, aucs


@pytest.mark.parametrize("pooling", ["gem", "multilayer"])
def test_a_checkpoint_that_held_token_states_still_loads(pooling: str) -> None:
    """Before GeM cached logs and multilayer cached layer means, item text stored the token states."""
    from recsys.text.features import ItemText, TextSpec

    torch.manual_seed(0)
    layers, rows, length, width = 3, 6, 8, 16
    states = torch.randn(layers, rows, length, width).half()
    mask = (torch.arange(length) < torch.tensor([1, 3, 8, 2, 5, 4])[:, None]).long()
    spec = TextSpec(pooling=pooling, dim=4, max_length=length, encoder_dim=width, encoder_layers=layers)
    current = ItemText(spec, rows, 4, states.float(), mask)
    earlier = {k: v for k, v in current.state_dict().items() if k not in ("log_states", "layer_means")}
    earlier |= {"states": states[-spec.layers :], "mask": mask}
    loaded = ItemText(spec, rows, 4)
    loaded.load_state_dict(earlier)
    torch.testing.assert_close(loaded(torch.arange(rows)), current(torch.arange(rows)), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("pooling, head_dim", [("latent", 8), ("multilayer", 8), ("gem", None), ("attention", None)])
def test_other_texts_are_pooled_as_the_items_are(pooling: str, head_dim: int | None) -> None:
    """Retrieval pools catalogue texts with a trained item-text module: projection (head_dim) then head."""
    from recsys.text.features import ItemText, TextSpec

    torch.manual_seed(0)
    layers, rows, length, width = 3, 12, 10, 16
    states = torch.randn(layers, rows, length, width).half().float()
    mask = (torch.arange(length) < torch.randint(1, length + 1, (rows, 1))).long()
    spec = TextSpec(
        pooling=pooling, dim=4, max_length=length, head_dim=head_dim, encoder_dim=width, encoder_layers=layers
    )
    module = ItemText(spec, rows, 4, states, mask)
    rows_ = torch.tensor([3, 0, 7, 11])
    with torch.no_grad():
        torch.testing.assert_close(
            module.pool_states(states[:, rows_], mask[rows_]), module._pooled(rows_), atol=3e-3, rtol=1e-3
        )
