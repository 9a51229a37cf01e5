"""Notes the libraries under recsys print that are not the user's business, silenced in one place: the
``recsys`` command silences them before it imports anything heavy, and ``recsys.train.cli`` on import
(the in-process runs of scripts come through it). Imports only the standard library."""

from __future__ import annotations

import logging
import warnings


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip")


def silence_library_notes() -> None:
    """Idempotent: a filter or setting given twice is kept once."""
    # torch 2.13 deprecates the LeafSpec that Lightning's pytree helper builds mid-run
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
    # Lightning's tips advertise its cloud packages (litlogger, litmodels)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_a_tip)
    # fbgemm_gpu logs at import, which gives the root logger a handler (logging.basicConfig); Lightning's
    # package logger prints with its own handler and, when the root has one, passed each line on to it too
    logging.getLogger("lightning").propagate = False
    # torchrec calls torch.fx.is_fx_tracing (on import and in the first forward)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
