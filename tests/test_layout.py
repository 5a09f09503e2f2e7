"""The shape of the house (issue 23): stages as sub-packages, imports only downward, modules and classes a newcomer
reads at once. Static: reads the source, runs nothing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "wikipulse"
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 150
# What each part may import: core is pure and shared; store is Redis; the stages do not import each other; the dev
# tools may use the SSE codec and the fold (the reference fold checks it); the dashboard reads what every stage wrote;
# cli, supervisor and queries wire it all.
MAY_IMPORT: dict[str, set[str]] = {
    "core": set(),
    "store": {"core"},
    "ingest": {"core", "store"},
    "fold": {"core", "store"},
    "archive": {"core", "store"},
    "devtools": {"core", "store", "ingest", "fold"},
    "dashboard": {"core", "store", "ingest", "fold", "archive"},
}


def modules() -> dict[str, Path]:
    return {".".join(("wikipulse", *path.relative_to(PACKAGE).with_suffix("").parts)): path for path in sorted(PACKAGE.rglob("*.py"))}


def part_of(module: str) -> str:
    """core, store, …; "top" for cli, supervisor, queries and the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "top"


def imports_of(path: Path) -> set[str]:
    """Every wikipulse module `path` imports, at the top or inside a function."""
    found: set[str] = set()
    known = modules()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wikipulse"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("wikipulse"))
    return found


def test_no_module_is_longer_than_a_newcomer_reads_at_once() -> None:
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_class_is_longer_than_a_newcomer_reads_at_once() -> None:
    long = {}
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and (n := (node.end_lineno or node.lineno) - node.lineno + 1) > MAX_CLASS_LINES:
                long[f"{name}.{node.name}"] = n
    assert long == {}


def test_each_stage_imports_only_what_lies_below_it() -> None:
    upward = []
    for name, path in modules().items():
        part = part_of(name)
        if part == "top":
            continue
        for imported in imports_of(path):
            target = part_of(imported)
            if imported != "wikipulse" and target != part and target not in MAY_IMPORT[part]:
                upward.append(f"{name} imports {imported}")
    assert upward == []


def test_the_import_graph_has_no_cycles() -> None:
    graph = {name: {m for m in imports_of(path) if m != name and m in modules()} for name, path in modules().items()}
    graph = {name: {m for m in targets if not name.startswith(m + ".") and m != "wikipulse"} for name, targets in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target] if target in path else [node, target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


@pytest.mark.parametrize("part", sorted(MAY_IMPORT))
def test_every_stage_is_a_package_that_says_what_it_is(part: str) -> None:
    init = PACKAGE / part / "__init__.py"
    assert ast.get_docstring(ast.parse(init.read_text())), f"{init} says nothing"
