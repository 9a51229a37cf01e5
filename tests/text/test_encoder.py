from pathlib import Path

import pytest
import torch

from recsys.text.encoder import TextEncoder
from recsys.text.pooling import make_pooling


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()  # the real all-MiniLM-L6-v2, offline


def _embed(encoder: TextEncoder, texts: list[str]) -> torch.Tensor:
    states, mask = encoder(texts)
    return torch.nn.functional.normalize(make_pooling("mean", encoder.dim)(states, mask), dim=1)


def test_all_layers_and_mask_and_batching_does_not_change_a_text(encoder: TextEncoder) -> None:
    states, mask = encoder(["Heat (1995)", "a considerably longer movie title, with a subtitle: part two"])
    assert states.shape[0] == encoder.num_layers == 7 and states.shape[-1] == encoder.dim == 384
    assert mask[0].sum() < mask[1].sum() and mask.shape == states.shape[1:3]
    alone = _embed(encoder, ["Heat (1995)"])
    in_batch = _embed(encoder, ["Heat (1995)", "a considerably longer movie title, with a subtitle: part two"])[:1]
    torch.testing.assert_close(alone, in_batch, atol=1e-5, rtol=0)  # padding is masked out end to end


def test_embeddings_carry_meaning(encoder: TextEncoder) -> None:
    v = _embed(
        encoder,
        [
            "a film about a shark attacking swimmers",
            "Jaws: a great white shark terrorizes a beach town",
            "a romantic comedy set in Paris",
        ],
    )
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.2


def test_frozen_by_default(encoder: TextEncoder) -> None:
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.model.training  # no dropout in a frozen encoder


def test_cache_is_keyed_by_texts_and_settings(
    encoder: TextEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [f"movie number {i}" for i in range(10)]
    states, mask = encoder.encode_cached(texts, tmp_path, batch_size=4, progress=False)
    assert states.dtype == torch.float16 and states.shape[:2] == (7, 10) and len(list(tmp_path.iterdir())) == 1
    direct, direct_mask = encoder(texts[:4])
    torch.testing.assert_close(states[:, :4, : direct.shape[2]].float(), direct, atol=2e-2, rtol=1e-2)
    assert torch.equal(mask[:4, : direct.shape[2]], direct_mask)

    def refuse(*args):  # noqa: ANN002, ANN202
        raise AssertionError("the transformer ran although the states were cached")

    monkeypatch.setattr(TextEncoder, "forward", refuse)
    again, _ = encoder.encode_cached(texts, tmp_path, progress=False)
    assert torch.equal(again, states)
    monkeypatch.undo()
    encoder.encode_cached(texts[:9], tmp_path, progress=False)  # other texts → another entry
    assert len(list(tmp_path.iterdir())) == 2


def test_bad_model_path_and_bad_texts(tmp_path: Path, encoder: TextEncoder) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TextEncoder(tmp_path)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        encoder([None])
