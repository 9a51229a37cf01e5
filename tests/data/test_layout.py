"""The data package has no import cycle: no two modules of ``recsys/data`` import each other, directly
or through others (imports inside functions and under ``if TYPE_CHECKING:`` count)."""

from __future__ import annotations

import ast
from pathlib import Path

import recsys.data

PACKAGE = Path(recsys.data.__file__).parent


def imports_within_package(file: Path) -> set[str]:
    """Modules of ``recsys.data`` that ``file`` imports anywhere in its body (the package itself excluded)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("recsys.data."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.ImportFrom) and node.module == "recsys.data":
            found.update(alias.name for alias in node.names if (PACKAGE / f"{alias.name}.py").exists())
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[2] for a in node.names if a.name.startswith("recsys.data."))
    return found - {file.stem}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of nodes (first == last), or None: a depth-first search."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = "open", path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node], _ = "done", path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle_and_accepts_a_chain() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_two_modules_of_the_data_package_import_each_other() -> None:
    graph = {f.stem: imports_within_package(f) for f in PACKAGE.glob("*.py") if f.stem != "__init__"}
    assert "arrow" in graph and "encode" in graph, sorted(graph)
    assert find_cycle(graph) is None, f"import cycle in recsys/data: {' → '.join(find_cycle(graph))}"
