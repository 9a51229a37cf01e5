"""BST's encoder: the padded batch equals each row encoded alone (padding never attends), and the
order of tokens is the target, then the most recent behavior first."""

from __future__ import annotations

import torch

from recsys.layers.sequence import SequenceTransformer, jagged_to_padded


def test_jagged_to_padded_puts_the_most_recent_first() -> None:
    values = torch.arange(6, dtype=torch.float32).unsqueeze(1)  # rows: [0, 1, 2] (2 most recent), [], [3, 4, 5]
    padded, mask = jagged_to_padded(values, torch.tensor([3, 0, 3]), 3)
    assert padded[:, :, 0].tolist() == [[2, 1, 0], [0, 0, 0], [5, 4, 3]]
    assert mask.tolist() == [[True] * 3, [False] * 3, [True] * 3]


def test_a_batch_equals_each_row_encoded_alone_without_padding() -> None:
    torch.manual_seed(0)
    encoder = SequenceTransformer(in_features=6, dim=8, heads=2, layers=2, dropout=0.0, max_len=5).eval()
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


def test_padding_and_other_rows_do_not_change_a_row() -> None:
    torch.manual_seed(1)
    encoder = SequenceTransformer(in_features=4, dim=8, heads=4, layers=1, dropout=0.0, max_len=9).eval()
    target, behaviors = torch.randn(1, 4), torch.randn(2, 4)
    alone = encoder(target, behaviors, torch.tensor([2]))
    with_long_row = encoder(
        torch.cat([target, torch.randn(1, 4)]), torch.cat([behaviors, torch.randn(9, 4)]), torch.tensor([2, 9])
    )  # the long row pads this one to 9 behaviors
    torch.testing.assert_close(with_long_row[0], alone[0], atol=1e-5, rtol=1e-5)
    shuffled = encoder(target, behaviors.flip(0), torch.tensor([2]))  # positions: order matters
    assert not torch.allclose(shuffled, alone)


def test_a_batch_without_any_history_encodes_the_target_alone() -> None:
    torch.manual_seed(2)
    encoder = SequenceTransformer(in_features=4, dim=8, heads=2, layers=1, dropout=0.0, max_len=3).eval()
    target = torch.randn(5, 4)
    out = encoder(target, torch.zeros(0, 4), torch.zeros(5, dtype=torch.int32))
    encoded = encoder.encoder((encoder.project(target) + encoder.position.weight[0]).unsqueeze(1))[:, 0]
    torch.testing.assert_close(
        out, torch.cat([encoded, encoded], dim=1), atol=1e-5, rtol=1e-5
    )  # one token: mean = itself
