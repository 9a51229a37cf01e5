import math

import pytest
import torch

from recsys.text.pooling import HEADS, make_pooling

D, L = 8, 3


def _batch(seed: int = 0, left_padding: bool = False):  # noqa: ANN202
    """Three texts of 5, 2 and 4 tokens, padded to 6 with garbage states."""
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 2, 4]
    states = torch.randn(L, 3, 6, D, generator=g) * 3
    mask = torch.zeros(3, 6, dtype=torch.long)
    for b, n in enumerate(lengths):
        if left_padding:
            mask[b, 6 - n :] = 1
        else:
            mask[b, :n] = 1
    return states, mask


def _tokens(states: torch.Tensor, mask: torch.Tensor, b: int) -> torch.Tensor:
    """The real tokens of text b, ``[L, n, D]`` (plain indexing, no masks)."""
    return states[:, b, mask[b].bool()]


def _mha(module: torch.nn.MultiheadAttention, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """Multi-head attention written out from the module's weights: q [n, D], kv [m, D] → [n, D]."""
    wq, wk, wv = module.in_proj_weight.chunk(3)
    bq, bk, bv = module.in_proj_bias.chunk(3)
    heads, dh = module.num_heads, D // module.num_heads
    out = []
    for h in range(heads):
        s = slice(h * dh, (h + 1) * dh)
        qh, kh, vh = (q @ wq.T + bq)[:, s], (kv @ wk.T + bk)[:, s], (kv @ wv.T + bv)[:, s]
        out.append(torch.softmax(qh @ kh.T / math.sqrt(dh), dim=1) @ vh)
    return torch.cat(out, 1) @ module.out_proj.weight.T + module.out_proj.bias


def _reference(name: str, head: torch.nn.Module, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = []
    for b in range(states.shape[1]):
        x = _tokens(states, mask, b)[-1]  # last layer, [n, D]
        if name == "mean":
            rows.append(x.mean(0))
        elif name == "cls":
            rows.append(states[-1, b, 0])
        elif name == "last":
            rows.append(x[-1])
        elif name == "max":
            rows.append(x.max(0).values)
        elif name == "gem":
            p = float(head.p)
            rows.append(x.clamp(min=head.eps).pow(p).mean(0).pow(1 / p))
        elif name == "attention":
            w = torch.softmax(x @ head.query / math.sqrt(D), dim=0)
            rows.append((w.unsqueeze(1) * x).sum(0))
        elif name == "latent":
            o = _mha(head.attention, x, head.latents)
            rows.append(head.mlp(o).mean(0))
        elif name == "multilayer":
            layers = _tokens(states, mask, b).mean(1) + head.layer_embedding  # [L, D]
            rows.append(_mha(head.attention, head.latents, layers).mean(0))
    return torch.stack(rows)


def _head(name: str) -> torch.nn.Module:
    torch.manual_seed(1)
    kwargs = {"num_latents": 5, "heads": 2} if name in ("latent", "multilayer") else {}
    return make_pooling(name, D, num_layers=L, **kwargs).eval()


@pytest.mark.parametrize("name", HEADS)
def test_each_head_matches_a_plain_reference(name: str) -> None:
    head = _head(name)
    states, mask = _batch()  # right padding: [CLS] is position 0
    with torch.no_grad():
        out = head(states, mask)
        expected = _reference(name, head, states, mask)
    assert out.shape == (3, D)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", HEADS)
def test_padding_never_changes_the_result(name: str) -> None:
    head = _head(name)
    states, mask = _batch(seed=2)
    with torch.no_grad():
        out = head(states, mask)
        # more padding, with other garbage in it
        wider = torch.cat([states, torch.randn(L, 3, 4, D) * 100], dim=2)
        wider_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.long)], dim=1)
        torch.testing.assert_close(head(wider, wider_mask), out, atol=1e-5, rtol=1e-5)
        garbage = states.clone()
        garbage[:, ~mask.bool()] = 1e4
        torch.testing.assert_close(head(garbage, mask), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["mean", "last", "max", "gem", "attention", "latent", "multilayer"])
def test_left_padding_gives_what_right_padding_gives(name: str) -> None:
    head = _head(name)
    right, right_mask = _batch(seed=3)
    left = torch.zeros_like(right)
    _, left_mask = _batch(left_padding=True)
    for b in range(3):
        left[:, b, left_mask[b].bool()] = _tokens(right, right_mask, b)
    with torch.no_grad():
        torch.testing.assert_close(head(left, left_mask), head(right, right_mask), atol=1e-5, rtol=1e-5)


def test_trainable_heads_get_gradients_and_bad_input_is_refused() -> None:
    states, mask = _batch()
    for name in ("gem", "attention", "latent", "multilayer"):
        head = make_pooling(name, D, num_layers=L, **({"heads": 2} if name in ("latent", "multilayer") else {}))
        head(states.abs() if name == "gem" else states, mask).sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters()), name
    with pytest.raises(ValueError, match="at least one token"):
        make_pooling("mean", D)(states, torch.zeros(3, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="needs all 3 layers"):
        make_pooling("multilayer", D, num_layers=3, heads=2)(states[-1], mask)
    with pytest.raises(ValueError, match="unknown pooling"):
        make_pooling("median", D)


@pytest.mark.parametrize("name", ["latent", "multilayer"])
def test_the_latent_heads_gradients_equal_the_written_out_attentions(name: str) -> None:
    """The latent heads compute attention from the module's weights (no per-text latent batch): their
    gradients, to every parameter, equal those of the per-text, per-head loop in ``_reference``."""
    head = _head(name).train()  # the module's attention has no dropout, so train mode changes nothing
    states, mask = _batch(seed=3)
    weights = torch.randn(3, D, generator=torch.Generator().manual_seed(4))
    parameters = [p for p in head.parameters() if p.requires_grad]
    got = torch.autograd.grad((head(states, mask) * weights).sum(), parameters)
    want = torch.autograd.grad((_reference(name, head, states, mask) * weights).sum(), parameters)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_cross_attention_equals_torchs_multihead_attention_module() -> None:
    """The written-out attention against ``nn.MultiheadAttention`` called as usual (no dropout), for the
    latent head's shapes (every token a query of the shared latents) and the multilayer head's (shared
    latent queries over each text's layers)."""
    from recsys.text.pooling import cross_attention

    torch.manual_seed(5)
    module = torch.nn.MultiheadAttention(D, 2, batch_first=True).eval()
    tokens, latents, layers = torch.randn(7, D), torch.randn(5, D), torch.randn(3, L, D)
    with torch.no_grad():
        want = module(tokens.unsqueeze(0), latents.unsqueeze(0), latents.unsqueeze(0), need_weights=False)[0][0]
        torch.testing.assert_close(cross_attention(module, tokens, latents), want, atol=1e-6, rtol=1e-5)
        queries = latents.expand(3, -1, -1)
        want = module(queries, layers, layers, need_weights=False)[0]
        torch.testing.assert_close(cross_attention(module, latents, layers), want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="no dropout"):
        cross_attention(torch.nn.MultiheadAttention(D, 2, dropout=0.1), tokens, latents)
