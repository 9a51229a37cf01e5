"""Callbacks every recsys run has: predictions to Parquet, and a summary of where things went."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info


class PredictionWriter(BasePredictionWriter):
    """Writes ``recsys predict`` output to ``<log_dir>/predictions.parquet`` (prob, label, group)."""

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        log_dir = trainer.log_dir  # a collective (broadcast): every rank must ask
        if not predictions or trainer.global_rank != 0:  # every rank scored the whole split
            return
        cat = {k: torch.cat([p[k] for p in predictions]).numpy() for k in predictions[0]}
        out = Path(log_dir or ".") / "predictions.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cat), out)
        rank_zero_info(f"[recsys] wrote {len(cat['prob']):,} predictions to {out}")


class RunSummary(L.Callback):
    """Prints, at the end of fit, where the best checkpoint, the config and TensorBoard logs are."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        lines = []
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.monitor is not None and cb.best_model_path:  # (not "last")
                score = "" if cb.best_model_score is None else f" ({cb.monitor}={float(cb.best_model_score):.4f})"
                lines.append(f"best checkpoint: {cb.best_model_path}{score}")
        if trainer.logger is not None and trainer.log_dir:  # without a logger, log_dir is just the working dir
            lines.append(f"config + TensorBoard logs: {trainer.log_dir}  (tensorboard --logdir {trainer.log_dir})")
        for line in lines:
            rank_zero_info(f"[recsys] {line}")


class Throughput(L.Callback):
    """Logs and prints training samples/s over all ranks each epoch: rows over the time from the
    epoch's start to its last step, data loading included (a shuffle buffer fills in the first
    steps, so skipping them would hide the loader's cost)."""

    def __init__(self) -> None:
        self.rates: list[float] = []  # per epoch, for benchmarks

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows, self._start, self._last = 0, time.perf_counter(), None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a run resumed mid-epoch starts without on_train_epoch_start
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._rows += len(batch)
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last is None or self._rows == 0:
            return
        rate = self._rows * trainer.world_size / (self._last - self._start)
        self.rates.append(rate)
        pl_module.log("train/samples_per_s", rate, rank_zero_only=True)
        rank_zero_info(
            f"[recsys] epoch {trainer.current_epoch}: {rate:,.0f} training samples/s over {trainer.world_size} rank(s)"
        )


class RowLedger(L.Callback):
    """Appends, for every training step, which rows it trained on to ``<dir>/ledger.rank<r>.tsv``:
    ``global_step  epoch  batch_idx  positions`` (positions: ``file_index << 40 | row``, see
    ``Batch.positions``). An audit trail of what a model saw, and the proof that a resumed run
    trains every row once: the steps a killed run logged after its last checkpoint are the ones
    the resumed run trains again.

    YAML: ``trainer.callbacks: [{class_path: recsys.train.callbacks.RowLedger, init_args: {dirpath: DIR}}]``
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        positions = getattr(batch, "positions", None)
        if positions is None:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        line = (
            f"{trainer.global_step}\t{trainer.current_epoch}\t{batch_idx}\t{','.join(map(str, positions.tolist()))}\n"
        )
        with open(self.dirpath / f"ledger.rank{trainer.global_rank}.tsv", "a") as f:
            f.write(line)


def read_ledger(path: str | Path) -> list[tuple[int, int, int, list[int]]]:
    """``RowLedger`` lines as (global_step, epoch, batch_idx, positions)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        step, epoch, batch_idx, positions = line.split("\t")
        rows.append((int(step), int(epoch), int(batch_idx), [int(p) for p in positions.split(",") if p]))
    return rows
