"""BST's encoder: the padded batch equals each row encoded alone (padding never attends), and the
order of tokens is the target, then the most recent behavior first."""

from __future__ import annotations

import pytest
import torch

from recsys.layers.sequence import SequenceTransformer, jagged_to_padded


def test_jagged_to_padded_puts_the_most_recent_first() -> None:
    values = torch.arange(6, dtype=torch.float32).unsqueeze(1)  # rows: [0, 1, 2] (2 most recent), [], [3, 4, 5]
    padded, mask = jagged_to_padded(values, torch.tensor([3, 0, 3]), 3)
    assert padded[:, :, 0].tolist() == [[2, 1, 0], [0, 0, 0], [5, 4, 3]]
    assert mask.tolist() == [[True] * 3, [False] * 3, [True] * 3]


@pytest.mark.parametrize("norm_first", [False, True])  # post-LN (the paper), pre-LN (bst.yaml)
def test_a_batch_equals_each_row_encoded_alone_without_padding(norm_first: bool) -> None:
    torch.manual_seed(0)
    encoder = SequenceTransformer(
        in_features=6, dim=8, heads=2, layers=2, dropout=0.0, max_len=5, norm_first=norm_first
    ).eval()
    lengths = torch.tensor([3, 0, 5, 1])
    target, behaviors = torch.randn(4, 6), torch.randn(int(lengths.sum()), 6)
    batch = encoder(target, behaviors, lengths)
    assert batch.shape == (4, 16)
    start = 0
    for row, n in enumerate(lengths.tolist()):
        own = behaviors[start : start + n]
        start += n
        tokens = torch.cat([target[row : row + 1], own.flip(0)])  # the target, then the most recent first
        x = encoder.project(tokens) + encoder.position(torch.arange(n + 1))
        encoded = encoder.encoder(x.unsqueeze(0))[0]  # one row, no padding at all
        torch.testing.assert_close(batch[row], torch.cat([encoded[0], encoded.mean(0)]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])  # post-LN (the paper), pre-LN (bst.yaml)
def test_padding_and_other_rows_do_not_change_a_row(norm_first: bool) -> None:
    torch.manual_seed(1)
    encoder = SequenceTransformer(
        in_features=4, dim=8, heads=4, layers=1, dropout=0.0, max_len=9, norm_first=norm_first
    ).eval()
    target, behaviors = torch.randn(1, 4), torch.randn(2, 4)
    alone = encoder(target, behaviors, torch.tensor([2]))
    with_long_row = encoder(
        torch.cat([target, torch.randn(1, 4)]), torch.cat([behaviors, torch.randn(9, 4)]), torch.tensor([2, 9])
    )  # the long row pads this one to 9 behaviors
    torch.testing.assert_close(with_long_row[0], alone[0], atol=1e-5, rtol=1e-5)
    shuffled = encoder(target, behaviors.flip(0), torch.tensor([2]))  # positions: order matters
    assert not torch.allclose(shuffled, alone)


@pytest.mark.parametrize("norm_first", [False, True])  # post-LN (the paper), pre-LN (bst.yaml)
def test_a_batch_without_any_history_encodes_the_target_alone(norm_first: bool) -> None:
    torch.manual_seed(2)
    encoder = SequenceTransformer(
        in_features=4, dim=8, heads=2, layers=1, dropout=0.0, max_len=3, norm_first=norm_first
    ).eval()
    target = torch.randn(5, 4)
    out = encoder(target, torch.zeros(0, 4), torch.zeros(5, dtype=torch.int32))
    encoded = encoder.encoder((encoder.project(target) + encoder.position.weight[0]).unsqueeze(1))[:, 0]
    torch.testing.assert_close(
        out, torch.cat([encoded, encoded], dim=1), atol=1e-5, rtol=1e-5
    )  # one token: mean = itself


def test_pre_norm_encoder_is_the_written_out_pre_ln_block() -> None:
    """``norm_first``: x + MHA(LN₁(x)), then x + FFN(LN₂(x)), then a final LN — written out from the
    layer's own weights, forward and backward, on one row without padding."""
    torch.manual_seed(3)
    encoder = SequenceTransformer(in_features=4, dim=8, heads=2, layers=1, dropout=0.0, max_len=6, norm_first=True)
    target, behaviors = torch.randn(1, 4), torch.randn(3, 4, requires_grad=True)
    out = encoder(target, behaviors, torch.tensor([3]))
    layer, final = encoder.encoder.layers[0], encoder.encoder.norm
    tokens = torch.cat([target, behaviors.flip(0)])
    x = encoder.project(tokens) + encoder.position.weight[:4]  # [4, 8]
    h = layer.norm1(x)
    q, k, v = (h @ layer.self_attn.in_proj_weight.t() + layer.self_attn.in_proj_bias).split(8, dim=1)
    heads = []
    for s in (slice(0, 4), slice(4, 8)):
        weights = torch.softmax(q[:, s] @ k[:, s].t() / 2.0, dim=1)  # √(8 / 2 heads) = 2
        heads.append(weights @ v[:, s])
    x = x + layer.self_attn.out_proj(torch.cat(heads, dim=1))
    x = x + layer.linear2(torch.relu(layer.linear1(layer.norm2(x))))
    x = final(x)
    expected = torch.cat([x[0], x.mean(0)])
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(out.square().sum(), behaviors)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), behaviors)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)
