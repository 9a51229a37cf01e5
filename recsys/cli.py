"""The ``recsys`` command: dispatches to the table of ``recsys.commands.table``."""

from __future__ import annotations

import atexit
import importlib.abc
import logging
import os
import sys
import threading
from importlib import import_module

from recsys.commands.table import BY_NAME, usage
from recsys.library_notes import silence_library_notes
from recsys.train.ranks import is_first_process


class TorchmetricsWithoutOptionalStacks(importlib.abc.MetaPathFinder):
    """Answers "not installed" when torchmetrics imports ``transformers`` or ``matplotlib``, and only then.

    torchmetrics 1.0.3 (torchrec 1.8's pin; 1.9 does the same) imports transformers' model classes for
    its text metrics and matplotlib's pyplot for its ``.plot()`` methods whenever Lightning imports it:
    about 1 s and 0.4 s of every command that builds a model. recsys uses none of those metrics or
    plots; told the packages are absent, torchmetrics leaves them out. Any other importer (recsys' text
    encoder, its evaluation plots) gets them as usual."""

    LEFT_OUT = frozenset({"transformers", "matplotlib"})

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        top = name.partition(".")[0]
        # once a package is loaded (imported first by someone else) there is nothing to save, and
        # torchmetrics, told it is there, then needs its submodules
        if top in self.LEFT_OUT and top not in sys.modules:
            frame = sys._getframe(1)
            while frame is not None:
                if frame.f_globals.get("__name__", "").partition(".")[0] == "torchmetrics":
                    raise ModuleNotFoundError(f"{name} (left out of torchmetrics by recsys.cli)", name=name)
                frame = frame.f_back
        return None  # the other finders decide


def _configure_logging() -> None:
    # recsys' own INFO lines (ignored columns, vocab builds, unused text features) reach the user
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[recsys] %(message)s"))
    logger = logging.getLogger("recsys")
    if not logger.handlers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if is_first_process() else logging.WARNING)  # info once, not once a rank
        logger.propagate = False
    silence_library_notes()  # before torchrec's import, which prints one of them


def _leave_process_group(finished: bool) -> bool:
    """Destroys the process group a multi-rank run left up. True when the process may then end without
    the interpreter's teardown: no group, or a gloo group whose ranks all finished and met at a barrier
    (so none still needs rank 0's rendezvous store). A 2-rank ``recsys fit`` that had finished was
    aborted at interpreter exit with "terminate called without an active exception" (exit -6): a gloo
    thread releasing its last collective's tensors took the GIL while Python finalized
    (pytorch/pytorch#38228; ``tests/test_ranks.py`` shows the race). Other backends, a run that failed
    here and a barrier that failed (a rank that did not finish) end the usual way, as before."""
    from datetime import timedelta

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    alone = dist.get_world_size() == 1
    met = alone
    if finished and not alone and dist.get_backend() == "gloo":
        try:  # monitored: names the rank that did not come instead of waiting out the group's timeout
            dist.monitored_barrier(timeout=timedelta(minutes=10))
            met = True
        except RuntimeError as err:
            logging.getLogger("recsys").warning("not every rank finished: %s", str(err).splitlines()[0])
    dist.destroy_process_group()
    return met


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    _configure_logging()
    if from_command_line and not any(isinstance(f, TorchmetricsWithoutOptionalStacks) for f in sys.meta_path):
        sys.meta_path.insert(0, TorchmetricsWithoutOptionalStacks())  # the process is ours alone
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    command = BY_NAME.get(name)
    if command is None:
        print(f"recsys: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if command.module is None:  # fit, validate, test, predict
        from recsys.train.cli import run

        finished = False
        try:
            run(None if from_command_line else [name, *rest])  # None: LightningCLI reads sys.argv itself
            finished = True
        except SystemExit as done:
            if from_command_line and done.code in (0, None) and ({"-h", "--help"} & set(rest)):
                _exit_without_teardown(0)
            raise
        finally:
            may_exit = _leave_process_group(finished)
        if from_command_line and may_exit:  # (no rank still needs rank 0's rendezvous store)
            _exit_without_teardown(0)  # Lightning finalized the loggers in its teardown hook
        return 0
    code = import_module(f"recsys.commands.{command.module}").main(rest)
    if from_command_line:  # the command returned: its files are written and closed
        _exit_without_teardown(code)
    return code


def _exit_without_teardown(code: int) -> None:
    """Ends the process without the interpreter's teardown of torch, torchrec and Lightning's modules
    (1.3 s of a 5.4 s ``recsys fit --help``, 1.6 s of ``recsys eval``), once what the command wrote
    is out: help text, or the files of a command that returned (closed by then; streams flushed here).
    Exit handlers still run (a logger's or a library's own flushing); while another non-daemon thread
    runs (a server's workers finishing requests) the process ends the usual way instead."""
    if any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        return
    atexit._run_exitfuncs()
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # `recsys fit --help | head`: the reader stopped early
        pass
    os._exit(int(code or 0))


if __name__ == "__main__":
    sys.exit(main())
