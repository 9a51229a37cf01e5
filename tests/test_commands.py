"""One commands floor: ``recsys --help`` comes from one table, every command module is in it and has an
example in its ``--help``, and no library module parses argv."""

from __future__ import annotations

import ast
import contextlib
import io
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
