"""One commands floor: ``recsys --help`` comes from one table, every command module is in it and has an
example in its ``--help``, and no library module parses argv."""

from __future__ import annotations

import ast
import contextlib
import io
import os
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest

import recsys
from recsys.cli import main
from recsys.commands.table import COMMANDS, usage

PACKAGE = Path(recsys.__file__).parent
HELP = {"data": ["data", "check", "--help"], "optembed": ["optembed", "search", "--help"]}


def test_every_command_module_is_in_the_table_and_the_help_lists_every_command(capsys: pytest.CaptureFixture) -> None:
    modules = {p.stem for p in (PACKAGE / "commands").glob("*.py")} - {"__init__", "table"}
    assert modules == {c.module for c in COMMANDS if c.module}
    assert main(["--help"]) == 0
    printed = capsys.readouterr().out
    assert printed == usage() + "\n"
    for command in COMMANDS:
        assert f"  {command.name} " in printed, command.name


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.module], ids=lambda c: c.name)
def test_every_command_help_ends_with_its_example(command) -> None:  # noqa: ANN001
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        main(HELP.get(command.name, [command.name, "--help"]))
    assert stop.value.code == 0
    assert f"example:\n  {command.example.splitlines()[0]}" in out.getvalue()
    assert callable(import_module(f"recsys.commands.{command.module}").main)


def test_no_library_module_builds_an_argument_parser() -> None:
    parsers = []
    for file in PACKAGE.rglob("*.py"):
        if "commands" in file.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "ArgumentParser":
                parsers.append(str(file.relative_to(PACKAGE)))
    assert parsers == []


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "100"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("package, use", [("transformers", "AutoTokenizer"), ("matplotlib", "pyplot")])
def test_torchmetrics_is_told_its_optional_stacks_are_absent_and_others_get_them(package: str, use: str) -> None:
    # torchmetrics 1.0.3 imports transformers' model classes and matplotlib's pyplot whenever lightning
    # imports it (~1 s and ~0.4 s a command)
    finder = "import sys; from recsys.cli import TorchmetricsWithoutOptionalStacks as T; sys.meta_path.insert(0, T()); "
    done = _python(
        finder + f"import lightning.pytorch; print({package!r} in sys.modules); "
        f"from {package} import {use}; print({use}.__name__.rpartition('.')[2])"
    )
    assert done.stdout.split() == ["False", use], done.stderr[-2000:]
    # imported before lightning: torchmetrics is told it is there and gets its submodules
    done = _python(finder + f"import {package}; import lightning.pytorch; print('ok')")
    assert done.stdout.split() == ["ok"], done.stderr[-2000:]


def test_a_lightning_commands_help_from_the_command_line_is_whole_and_quiet() -> None:
    # the console script's path leaves the process right after the help (no teardown): the same text as
    # a fresh process that prints the help and ends the usual way (main given argv), and no argv warning;
    # the help imports none of pandas, matplotlib, transformers (printed by an exit handler)
    argv = "import sys; from recsys.cli import main; sys.argv = ['recsys', 'fit', '--help']; "
    stacks = "[m for m in ('pandas', 'matplotlib', 'transformers') if m in sys.modules]"
    done = _python(argv + f"import atexit; atexit.register(lambda: print({stacks})); main()")
    reference = _python(argv + "main(['fit', '--help'])")
    assert done.returncode == 0 and reference.returncode == 0, done.stderr[-2000:] + reference.stderr[-2000:]
    assert "args parameter" not in done.stderr
    help_text, _, imported = done.stdout.rstrip("\n").rpartition("\n")
    assert imported == "[]"
    assert help_text + "\n" == reference.stdout and "--trainer.max_epochs" in help_text


def _leaving_worker(rank: int, world: int, rendezvous: str, finished: str, out: str) -> None:
    import torch.distributed as dist

    from recsys.cli import _leave_process_group

    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    may_exit = _leave_process_group(finished[rank] == "1")
    (Path(out) / f"rank{rank}").write_text(f"{may_exit} {dist.is_initialized()}")


@pytest.mark.parametrize(("finished", "expected"), [("11", ["True", "True"]), ("10", ["False", "False"])])
def test_finished_ranks_meet_before_leaving_and_a_rank_that_failed_is_not_waited_for(
    tmp_path: Path, finished: str, expected: list[str]
) -> None:
    """Ranks that all finished may end without teardown; when rank 1's run failed (it leaves without
    the barrier), rank 0's barrier fails at once — not after its 10 minutes — and rank 0 ends the usual
    way. Every rank has left its group either way."""
    from tests.ranks import spawn_ranks

    spawn_ranks(_leaving_worker, 2, finished, str(tmp_path))
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == [f"{e} False" for e in expected]
