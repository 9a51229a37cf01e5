"""The shipped configs' checkpoint callbacks: best.ckpt is the best epoch, last.ckpt the last one.

Lightning 2.6 writes a ModelCheckpoint's ``save_last`` file only at a step where that callback also
saved a top-k checkpoint, so ``save_last: true`` beside ``save_top_k: 1`` and a monitor made
last.ckpt a copy of the best — a run resumed from it went back to its best epoch."""

from importlib import import_module
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs/movielens").glob("*.yaml")) + [ROOT / "configs/stream/base.yaml"]


class PeakFirst(L.LightningModule):
    """Logs every monitored metric at its best in epoch 0 and worse after (val/auc falls, losses rise)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self.weight - batch).pow(2).mean()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        epoch = float(self.current_epoch)
        self.log_dict({"val/auc": 0.9 - 0.1 * epoch, "val/in_batch_loss": 1.0 + epoch, "val/loss": 1.0 + epoch})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.ones(4, 1), batch_size=2)

    val_dataloader = train_dataloader


def _callbacks(config: Path) -> list[L.Callback]:
    specs = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    out = []
    for spec in specs:
        module, name = spec["class_path"].rsplit(".", 1)
        out.append(getattr(import_module(module), name)(**spec.get("init_args", {})))
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=[f"{c.parent.name}/{c.stem}" for c in CONFIGS])
def test_last_ckpt_is_the_last_epoch_and_best_ckpt_the_best(config: Path, tmp_path: Path) -> None:
    trainer = L.Trainer(
        max_epochs=3,
        callbacks=_callbacks(config),
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(PeakFirst())
    saved = {p.name: torch.load(p, weights_only=False)["epoch"] for p in (tmp_path / "checkpoints").glob("*.ckpt")}
    monitored = any(getattr(cb, "monitor", None) for cb in trainer.callbacks)  # the stream config chooses none
    assert saved == ({"best.ckpt": 0} if monitored else {}) | {"last.ckpt": 2}
