"""``CTRDataModule``: the dataset directory as Lightning dataloaders.

Example::

    dm = CTRDataModule("data/ml100k-ctr", batch_size=2048)
    dm.dataset_info["num_embeddings"]      # table sizes the model builds its tables from
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from recsys.data.arrow import SPLITS, DataError
from recsys.data.days import check_days, day_split, next_day, parse_days
from recsys.data.parquet import ParquetStream, release_freed_memory
from recsys.data.resources import DatasetResources
from recsys.data.vocab import Vocabulary

log = logging.getLogger(__name__)
# ParquetStream.__len__ counts each worker's own row groups, so Lightning's warning does not apply
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


class StreamLoader(DataLoader):
    """The training ``DataLoader``: Lightning saves its ``state_dict`` in every checkpoint and hands
    it back on resume, so a run killed mid-epoch continues with the next unseen batch.

    The state is the epoch and the batches this rank has trained in it (the trainer's progress,
    not the loader's read-ahead). Resuming mid-epoch needs the same batch size and world size
    (the positions would mean other rows otherwise); an end-of-epoch checkpoint resumes anywhere.
    """

    def __init__(self, stream: ParquetStream, progress: Callable[[], tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(stream, batch_size=None, **kwargs)
        self._progress = progress

    def __iter__(self):  # noqa: ANN204
        # the main process frees every batch it trained on; hand the pages back now and then
        for count, batch in enumerate(super().__iter__()):
            if count % 200 == 199:
                release_freed_memory()
            yield batch

    def state_dict(self) -> dict[str, Any]:
        epoch, batches = self._progress()
        stream: ParquetStream = self.dataset
        return {
            "epoch": epoch,
            "batches": batches,
            "batches_per_epoch": len(stream),
            "batch_size": stream.batch_size,
            "world_size": stream._rank_world()[1],
            "num_workers": stream.num_workers,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stream: ParquetStream = self.dataset
        complete = state["batches"] >= state["batches_per_epoch"]
        workers = state.get("num_workers", stream.num_workers)
        if not complete and workers != stream.num_workers:
            # each worker reads its own row groups: another count deals the rows out differently, so
            # "the next batch" of the interrupted pass does not exist in this one
            raise DataError(
                f"{stream.data_dir}: the checkpoint stopped mid-epoch with --data.num_workers {workers}; this run has "
                f"{stream.num_workers}, which deals the rows out in another order. Resume with --data.num_workers "
                f"{workers}, or from an end-of-epoch checkpoint"
            )
        if not complete:
            world = stream._rank_world()[1]
            if (state["batch_size"], state["world_size"], state["batches_per_epoch"]) != (
                stream.batch_size,
                world,
                len(stream),
            ):
                raise DataError(
                    f"{stream.data_dir}: the checkpoint stopped mid-epoch with batch size {state['batch_size']} on "
                    f"{state['world_size']} rank(s) ({state['batches_per_epoch']} "
                    "batches per epoch); resume with the same "
                    f"--data.batch_size and devices (now {stream.batch_size}, {world} rank(s), {len(stream)} batches), "
                    f"or from an end-of-epoch checkpoint"
                )
        # complete: the next epoch starts from its first batch, whatever this run's sizes are
        stream.resume_from(state["epoch"], len(stream) if complete else state["batches"])
        log.info("resuming %s at epoch %d, batch %d", stream.data_dir, state["epoch"], state["batches"])


class CTRDataModule(L.LightningDataModule):
    """Streams ``train``/``val``/``test`` of a dataset directory in the recsys contract.

    Args:
        path: dataset directory (``schema.yaml`` + Parquet splits).
        batch_size: training rows per batch.
        eval_batch_size: rows per batch for validation, test and predict.
        num_workers: dataloader worker processes (each reads its own Parquet row groups).
        shuffle_buffer: rows held to shuffle training data (bounds memory).
        seed: shuffle seed; defaults to the run's ``--seed_everything``.
        predict_split: split that ``predict`` scores.
        days: ``FIRST:LAST`` of a dataset partitioned by day (``recsys.data.days``): epoch k trains day k,
            validation is the next day, test the day after the range; the run has one epoch per day.
    """

    def __init__(
        self,
        path: str = "data/ml100k-ctr",
        batch_size: int = 2048,
        eval_batch_size: int = 8192,
        num_workers: int = 0,
        shuffle_buffer: int = 200_000,
        seed: int | None = None,
        predict_split: str = "test",
        days: str | None = None,
    ) -> None:
        super().__init__()
        if predict_split not in SPLITS:
            raise ValueError(f"predict_split must be one of {SPLITS}, got {predict_split!r}")
        for name, value in {
            "batch_size": batch_size,
            "eval_batch_size": eval_batch_size,
            "shuffle_buffer": shuffle_buffer,
        }.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers must be 0 or more, got {num_workers!r}")
        self.path = Path(path)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.predict_split = predict_split
        self.days = parse_days(days) if days else None
        if self.days:
            check_days(self.path, self.days)
        self.vocab = Vocabulary.load_or_build(self.path)
        self.dataset_info = self.vocab.info().to_dict()
        # train counts, item texts, encoders: what models build from beyond the dataset info
        self.resources = DatasetResources(self.vocab)
        self._streams: dict[tuple[str, bool], ParquetStream] = {}

    def split_path(self, split: str) -> str:
        """The folder ``split`` reads: itself, or under ``days`` the day of the current epoch (train), the
        day after it (val) or the day after the range (test)."""
        if not self.days or split not in SPLITS:
            return split
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        day = self.days[min(epoch, len(self.days) - 1)]
        return {"train": day_split(day), "val": day_split(next_day(day))}.get(split, day_split(next_day(self.days[-1])))

    def setup(self, stage: str) -> None:
        """Under ``days``: one epoch per day, and fresh loaders every epoch (each reads its day)."""
        trainer = self.trainer
        if not self.days or trainer is None:
            return
        trainer.reload_dataloaders_every_n_epochs = 1
        if trainer.fit_loop.max_epochs != len(self.days):
            log.info("--data.days %s:%s: %d epochs, one per day", self.days[0], self.days[-1], len(self.days))
            trainer.fit_loop.max_epochs = len(self.days)

    def stream(self, split: str) -> ParquetStream:
        train = split == "train"
        path = self.split_path(split)
        key = (path, train)  # under days, a day is read for training one epoch and validated on the one before
        if key not in self._streams:
            seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
            self._streams[key] = ParquetStream(
                **self._stream_options(split),
                shuffle=train,
                shuffle_buffer=self.shuffle_buffer,
                seed=seed,
                # evaluation: the whole split, in the same batches on every rank (a sharded model's
                # forward is collective); val/test loaders take each rank's share (_eval_stream)
                **({} if train else {"rank": 0, "world_size": 1}),
            )
        return self._streams[key]

    def _stream_options(self, split: str) -> dict[str, Any]:
        """What every stream of ``split`` shares, whole or a rank's share."""
        return {
            "data_dir": self.path,
            "split": self.split_path(split),
            "vocab": self.vocab,
            "batch_size": self.batch_size if split == "train" else self.eval_batch_size,
            "num_workers": self.num_workers,
            "keep_encoded": not self.days,  # a day is read once for training and once for validation
        }

    def _eval_stream(self, split: str) -> ParquetStream:
        """``split`` for val/test when the trainer has several ranks: each scores an equal share of every
        batch (the module gathers the predictions, so metrics stay exact); otherwise the whole split."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:  # the trainer's ranks, not any process group around
            return self.stream(split)
        share = (trainer.global_rank, trainer.world_size)
        return ParquetStream(**self._stream_options(split), rank=0, world_size=1, share=share)

    def _loader(self, split: str, shared: bool = False) -> DataLoader:
        """``shared``: val/test under several ranks, each scoring its share (predictions: the whole split)."""
        options = {
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "prefetch_factor": 4 if self.num_workers > 0 else None,
        }
        if split == "train":
            return StreamLoader(self.stream(split), self._train_progress, **options)
        return DataLoader(self._eval_stream(split) if shared else self.stream(split), batch_size=None, **options)

    def _train_progress(self) -> tuple[int, int]:
        """(epoch, batches trained in it): at a checkpoint, every batch the loop has processed."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shared=True)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shared=True)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_split)


__all__ = ["CTRDataModule", "DataError"]
