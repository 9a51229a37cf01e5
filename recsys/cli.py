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

        run([name, *rest])
        return 0
    return import_module(f"recsys.commands.{command.module}").main(rest)


if __name__ == "__main__":
    sys.exit(main())
