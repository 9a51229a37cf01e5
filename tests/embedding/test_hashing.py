import pytest
import torch

from recsys.embedding.hashing import MASK64, feature_salt, hash64, hash64_reference, hash_to_rows

IDS = torch.tensor([0, 1, 2, 3, 12345, 2**40], dtype=torch.int64)


def test_pinned_vectors() -> None:
    """Changing these breaks every exported unified-embedding model: never update them casually."""
    assert hash64(IDS, 0).tolist() == PINNED_HASH64
    assert feature_salt("item_id", 1) == PINNED_SALT
    assert hash_to_rows(IDS, feature_salt("item_id", 1), 1000).tolist() == PINNED_ROWS


@pytest.mark.parametrize("salt", [0, 1, 7, 2**62 + 3, feature_salt("user_id", 0)])
def test_matches_the_unbounded_int_reference(salt: int) -> None:
    ids = torch.cat([IDS, torch.tensor([-5, 2**63 - 1, -(2**63)])])
    expected = []
    for value in ids.tolist():
        h = hash64_reference(value & MASK64, salt)
        expected.append(h - (1 << 64) if h >= 1 << 63 else h)
    assert hash64(ids, salt).tolist() == expected


def test_rows_in_range_and_salts_separate_features() -> None:
    ids = torch.arange(100_000)
    rows = hash_to_rows(ids, feature_salt("a", 0), 997)
    assert int(rows.min()) >= 0 and int(rows.max()) < 997
    counts = torch.bincount(rows, minlength=997).float()
    assert counts.std() / counts.mean() < 0.13  # like a uniform draw: Poisson spread, 1/sqrt(100) = 0.1
    other = hash_to_rows(ids, feature_salt("b", 0), 997)
    assert (rows == other).float().mean() < 0.01  # the same ids, another feature: other rows
    with pytest.raises(ValueError, match="num_rows must be positive"):
        hash_to_rows(ids, 0, 0)


PINNED_HASH64 = [
    0,
    6238072747940578789,
    -2606959012126976886,
    2185194620014831856,
    -906084347102765743,
    48217637115032568,
]
PINNED_SALT = 2757274700104267143
PINNED_ROWS = [635, 971, 135, 145, 354, 978]
