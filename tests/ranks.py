"""Multi-rank tests: ``spawn_ranks`` runs a worker on fresh processes over gloo; ``share`` cuts a rank's
rows out of a global batch. Imports only torch at the top: every spawned rank imports this module."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist
import torch.multiprocessing as mp

if TYPE_CHECKING:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recsys.data.batch import Batch


def file_rendezvous(folder: str) -> str:
    """A file rendezvous for one process group in ``folder``: no TCP port to collide with another test's."""
    return f"file://{folder}/store"


def _marking_start_up(rank: int, world: int, rendezvous: str, markers: str, worker, *args) -> None:  # noqa: ANN001
    """Runs ``worker`` in a rank, leaving ``<markers>/rank<r>.up`` once its process group is up.

    A rank whose worker returned ends without the interpreter's finalization (exit handlers run, then
    ``os._exit(0)``; ``recsys.cli._exit_without_teardown``, as a finished ``recsys fit`` rank does); else a
    gloo worker thread still releasing its last collective's tensors then takes the GIL while Python
    finalizes, is ended by ``pthread_exit`` inside a destructor, and aborts the process ("terminate
    called without an active exception", pytorch/pytorch#38228). Seen in about one run in ten to fifteen
    of a 2-rank test on these 2 cores, after its results were written; a core dump put the aborting
    thread in ``ProcessGroupGloo::runLoop`` → ``~AsyncAllreduceWork`` and the main thread in
    ``Py_FinalizeEx``. Garbage is not collected at exit, so a worker closes what it writes before it
    returns. A worker that raises leaves the usual way (spawn reports its traceback)."""
    init = dist.init_process_group

    def init_and_mark(*a, **k) -> None:  # noqa: ANN002, ANN003
        init(*a, **k)
        (Path(markers) / f"rank{rank}.up").touch()

    dist.init_process_group = init_and_mark
    worker(rank, world, rendezvous, *args)
    from recsys.cli import _exit_without_teardown  # what a finished `recsys fit` rank does too

    _exit_without_teardown(0)


def spawn_ranks(worker, world: int, *args) -> None:  # noqa: ANN001
    """Runs ``worker(rank, world, rendezvous, *args)`` on ``world`` fresh processes.

    One retry, with a new rendezvous and a warning, only when a rank dies by SIGABRT before its
    process group is up: on these 2-core machines gloo's start-up has aborted ("terminate called
    without an active exception") in about one suite run of five, before any code under test ran.
    An abort after start-up, assertion failures and Python exceptions in a rank are never retried.
    """
    for attempt in range(2):
        with tempfile.TemporaryDirectory(prefix="recsys-ranks-") as folder:  # the store and the markers, removed after
            try:
                args_ = (world, file_rendezvous(folder), folder, worker, *args)
                mp.spawn(_marking_start_up, args=args_, nprocs=world, join=True)
                return
            except mp.ProcessExitedException as err:
                started = (Path(folder) / f"rank{err.error_index}.up").exists()
                if err.signal_name != "SIGABRT" or started or attempt == 1:
                    raise
                warnings.warn(f"rank {err.error_index} aborted before its process group was up; retrying", stacklevel=2)


def share(batch: Batch, rank: int, world: int) -> Batch:
    """One rank's rows of a global batch (positions included: they seed OptEmbed's widths)."""
    from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

    from recsys.data.batch import Batch

    size = len(batch) // world
    lo, hi = rank * size, (rank + 1) * size

    def part(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        out = {}
        for key, jt in kjt.to_dict().items():
            offsets = jt.offsets()
            out[key] = JaggedTensor(
                values=jt.values()[int(offsets[lo]) : int(offsets[hi])], lengths=jt.lengths()[lo:hi]
            )
        return KeyedJaggedTensor.from_jt_dict(out)

    return Batch(
        batch.dense[lo:hi],
        part(batch.sparse),
        part(batch.sequences),
        batch.labels[lo:hi],
        batch.groups[lo:hi],
        positions=batch.positions[lo:hi],
    )
