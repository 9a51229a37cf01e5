import pytest
import torch

from recsys.layers.attention import TargetAttention, padded_to_jagged, segment_softmax


def reference_attention(
    module: TargetAttention, query: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """The paper's activation unit, one row at a time, with the plain first layer on [q, k, q−k, q⊙k]."""
    out = []
    start = 0
    for row, n in enumerate(lengths.tolist()):
        k = keys[start : start + n]
        start += n
        if n == 0:
            out.append(torch.zeros(query.shape[1]))
            continue
        q = query[row].expand(n, -1)
        hidden = module.first(torch.cat([q, k, q - k, q * k], dim=1))
        scores = module.rest(module.first_activation(hidden)).squeeze(-1)
        if module.softmax:
            scores = torch.softmax(scores, dim=0)
        out.append((scores.unsqueeze(-1) * k).sum(0))
    return torch.stack(out)


def _inputs(seed: int = 0, batch: int = 6, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, 0, 5, 1, 7, 2][:batch])
    return torch.randn(batch, dim, generator=g), torch.randn(int(lengths.sum()), dim, generator=g), lengths


@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("activation", ["dice", "prelu", "sigmoid"])
def test_matches_plain_per_row_reference(softmax: bool, activation: str) -> None:
    torch.manual_seed(0)
    module = TargetAttention(8, [12, 6], activation=activation, softmax=softmax).eval()  # Dice: running stats
    query, keys, lengths = _inputs()
    assert torch.allclose(module(query, keys, lengths), reference_attention(module, query, keys, lengths), atol=1e-5)


def test_gradients_match_reference() -> None:
    torch.manual_seed(1)
    module = TargetAttention(8, [12], activation="prelu").eval()
    query, keys, lengths = _inputs(1)
    query.requires_grad_(True)
    module(query, keys, lengths).pow(2).sum().backward()
    fast = query.grad.clone()
    query.grad = None
    reference_attention(module, query, keys, lengths).pow(2).sum().backward()
    assert torch.allclose(fast, query.grad, atol=1e-5)


def test_padding_never_attends() -> None:
    torch.manual_seed(2)
    module = TargetAttention(8, [12], softmax=True).eval()
    query, keys, lengths = _inputs(2)
    expected = module(query, keys, lengths)
    # the same rows as a padded [B, L, D] tensor with garbage in the padding, then the mask
    longest = int(lengths.max()) + 4
    padded = torch.full((len(lengths), longest, 8), 1e3)
    mask = torch.zeros(len(lengths), longest, dtype=torch.bool)
    start = 0
    for row, n in enumerate(lengths.tolist()):
        padded[row, :n] = keys[start : start + n]
        mask[row, :n] = True
        start += n
    values, padded_lengths = padded_to_jagged(padded, mask)
    assert torch.allclose(module(query, values, padded_lengths), expected, atol=1e-6)


def test_order_of_behaviors_does_not_matter_and_empty_history_is_zero() -> None:
    torch.manual_seed(3)
    module = TargetAttention(8, [12]).eval()
    query, keys, lengths = _inputs(3)
    out = module(query, keys, lengths)
    assert torch.equal(out[1], torch.zeros(8))  # the row with no behaviors
    shuffled = keys.clone()
    shuffled[3:8] = keys[3:8].flip(0)  # reverse row 2's behaviors (rows 0 and 1 hold 3 and 0)
    assert torch.allclose(module(query, shuffled, lengths), out, atol=1e-5)
    # an all-empty batch works too
    empty = module(query, keys[:0], torch.zeros(6, dtype=torch.long))
    assert torch.equal(empty, torch.zeros(6, 8))


def test_segment_softmax_sums_to_one_per_row() -> None:
    scores = torch.tensor([1.0, 2.0, 3.0, 100.0, -5.0])
    rows = torch.tensor([0, 0, 0, 2, 2])
    weights = segment_softmax(scores, rows, 3)
    assert torch.allclose(weights[:3], torch.softmax(scores[:3], 0))
    assert torch.allclose(weights[3:], torch.softmax(scores[3:], 0))
