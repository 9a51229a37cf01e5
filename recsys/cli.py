"""The ``recsys`` command: dispatches to the table of ``recsys.commands.table``."""

from __future__ import annotations

import logging
import sys
from importlib import import_module

from recsys.commands.table import BY_NAME, usage


def _configure_logging() -> None:
    # recsys' own INFO lines (ignored columns, vocab builds, unused text features) reach the user
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[recsys] %(message)s"))
    logger = logging.getLogger("recsys")
    if not logger.handlers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    # torchrec calls torch.fx.is_fx_tracing on import; the deprecation note it triggers is not ours
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def _leave_process_group() -> None:
    """Destroys the process group a multi-rank run left up. A 2-rank ``recsys fit`` that had finished
    (best checkpoint printed) was aborted at interpreter exit with "terminate called without an active
    exception" (exit -6) while its gloo group was still alive; the group is left explicitly instead."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _configure_logging()
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

        try:
            run([name, *rest])
        finally:
            _leave_process_group()
        return 0
    return import_module(f"recsys.commands.{command.module}").main(rest)


if __name__ == "__main__":
    sys.exit(main())
