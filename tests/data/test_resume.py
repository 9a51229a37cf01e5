from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from recsys.data.parquet import ParquetStream
from recsys.data.vocab import Vocabulary


def _positions(stream: ParquetStream, workers: int) -> list[list[int]]:
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return [b.positions.tolist() for b in loader]


@pytest.mark.parametrize("workers", [0, 3])
def test_a_resumed_pass_yields_exactly_the_unseen_batches(tiny_dataset: Path, workers: int) -> None:
    vocab = Vocabulary.load_or_build(tiny_dataset)

    def stream() -> ParquetStream:
        s = ParquetStream(
            tiny_dataset,
            "train",
            vocab,
            batch_size=64,
            shuffle=True,
            shuffle_buffer=300,
            seed=5,
            num_workers=workers,
            rank=0,
            world_size=1,
        )
        s.set_epoch(1)
        return s

    full = _positions(stream(), workers)
    assert len(full) == len(stream())
    flat = np.concatenate(full)
    assert len(flat) == len(set(flat.tolist())) == 3000  # every row once
    for done in (1, 7, len(full) - 1):
        resumed = stream()
        resumed.resume_from(1, done)
        assert _positions(resumed, workers) == full[done:]
    finished = stream()
    finished.resume_from(1, len(full))  # an epoch-end checkpoint: the next pass is epoch 2, from its start
    epoch2 = stream()
    epoch2.set_epoch(2)
    assert _positions(finished, workers) == _positions(epoch2, workers)


def test_a_mid_epoch_resume_with_another_worker_count_is_refused_naming_both(tiny_dataset: Path) -> None:
    from recsys.data.arrow import DataError
    from recsys.data.datamodule import CTRDataModule

    def loader(workers: int):  # noqa: ANN202
        dm = CTRDataModule(str(tiny_dataset), batch_size=64, num_workers=workers)
        return dm.train_dataloader()

    state = loader(2).state_dict() | {"batches": 5}  # stopped after 5 batches with 2 workers
    with pytest.raises(DataError, match="mid-epoch with --data.num_workers 2; this run has 0"):
        loader(0).load_state_dict(state)
    loader(0).load_state_dict(state | {"batches": state["batches_per_epoch"]})  # end of epoch: any count
    for bad in ({"batch_size": 0}, {"batch_size": -5}, {"num_workers": -1}, {"eval_batch_size": 0}):
        with pytest.raises(ValueError, match=f"data.{next(iter(bad))} must be"):
            CTRDataModule(str(tiny_dataset), **bad)
