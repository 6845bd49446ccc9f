"""The shape of the house (docs/architecture.md): which way the imports run, and room sizes.

Read from the source with `ast`, every import counted (module level or inside a function; not
those under `if TYPE_CHECKING:`): no cycle among the modules of `agent/` and `bus/`; `bus/`
never imports `agent/`; nothing imports the composition root (`daemon`) but `__main__`, so
the CLI and everything it uses stand without the daemon; no file of the product is much over
400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]
PACKAGES = {"agent": "callerid.agent", "bus": "callerid.bus"}
MAX_LINES = 420  # "about 400"


def modules() -> dict[str, Path]:
    found = {}
    for src, name in PACKAGES.items():
        for path in sorted((TOP / src).rglob("*.py")):
            parts = list(path.relative_to(TOP / src).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([name, *parts])] = path
    return found


def _imported(node: ast.AST, here: str, known: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: resolved against this module's package
        pkg = here.rsplit(".", node.level)[0]
        base = f"{pkg}.{base}" if base else pkg
    # `from pkg import mod` imports the module pkg.mod when there is one
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def imports() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        skipped = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        graph[name] = {
            dep
            for node in ast.walk(tree)
            if id(node) not in skipped
            for dep in _imported(node, name, known)
            if dep in known and dep != name
        }
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo.extend(graph[mod])
    return seen


def test_the_graph_is_read() -> None:
    graph = imports()
    assert "callerid.agent.login" in graph["callerid.agent.daemon"]
    assert "callerid.bus.protocol" in graph["callerid.bus.transport"]


def test_no_import_cycle() -> None:
    graph = imports()
    cycles = sorted(m for m in graph if m in reachable(graph, m))
    assert cycles == [], f"modules on an import cycle: {cycles}"


def test_bus_does_not_import_agent() -> None:
    graph = imports()
    for mod, deps in graph.items():
        if mod.startswith("callerid.bus"):
            assert not {d for d in deps if d.startswith("callerid.agent")}, mod


def test_only_main_imports_the_composition_root() -> None:
    graph = imports()
    importers = sorted(m for m, deps in graph.items() if "callerid.agent.daemon" in deps)
    assert importers == ["callerid.agent.__main__"]
    ctl = [m for m in graph if m.startswith("callerid.agent.ctl")]
    assert len(ctl) >= 4
    for mod in ctl:
        assert "callerid.agent.daemon" not in reachable(graph, mod), mod


@pytest.mark.parametrize("folder", ["agent", "bus", "bench", "scripts"])
def test_no_file_much_over_400_lines(folder: str) -> None:
    sizes = {p: len(p.read_text().splitlines()) for p in (TOP / folder).rglob("*.py")}
    assert sizes, folder
    assert {str(p.relative_to(TOP)): n for p, n in sizes.items() if n > MAX_LINES} == {}
