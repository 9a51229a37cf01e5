"""Which process of a launched job prints: read from each launcher's environment, by hand-written cases."""

import pytest

from recsys.train.ranks import is_first_process

LAUNCHERS = {
    "a single process": ({}, True),
    "Lightning's launcher, rank 0": ({"NODE_RANK": "0"}, True),
    "Lightning's launcher, rank 1": ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, False),
    "Lightning, rank 0 of node 1": ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),
    "torchrun, rank 1": ({"RANK": "1", "LOCAL_RANK": "1"}, False),
    "torchrun on 2 nodes, global rank 0 with the scheduler's NODE_RANK 1": ({"RANK": "0", "NODE_RANK": "1"}, True),
    "torchrun on 2 nodes, global rank 8 (local 0)": ({"RANK": "8", "LOCAL_RANK": "0", "NODE_RANK": "0"}, False),
    "SLURM srun, task 0": ({"SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, True),
    "SLURM srun, task 3": ({"SLURM_PROCID": "3", "SLURM_LOCALID": "1"}, False),
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_only_global_rank_zero_is_the_first_process(monkeypatch: pytest.MonkeyPatch, launcher: str) -> None:
    env, first = LAUNCHERS[launcher]
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert is_first_process() is first
