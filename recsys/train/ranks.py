"""Which process of a launched job this is, read from the launcher's environment before any process
group exists (no torch import: the ``recsys`` command asks it before choosing what to import)."""

from __future__ import annotations

import os


def is_first_process() -> bool:
    """Global rank 0: torchrun's ``RANK``, SLURM's ``SLURM_PROCID``, or else Lightning's launcher's
    ``NODE_RANK`` and ``LOCAL_RANK`` (each 0 or unset on rank 0); True in a single process."""
    for variable in ("RANK", "SLURM_PROCID"):
        if variable in os.environ:
            return os.environ[variable] == "0"
    return os.environ.get("NODE_RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"
