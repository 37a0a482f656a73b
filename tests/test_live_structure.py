"""The live engine's shape (issue 15): small modules whose imports run one way."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lifecycle" / "live"
MAX_LINES = 400


def _imports_within_package() -> dict[str, set[str]]:
    """module -> the modules of lifecycle.live it imports (at any level of the file)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = path.stem
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lifecycle.live."):
                found.add(node.module.removeprefix("lifecycle.live."))
            elif isinstance(node, ast.ImportFrom) and node.level == 1:
                found.add(node.module or "__init__")
        graph[name] = found
    return graph


def test_no_module_of_the_live_engine_is_longer_than_400_lines() -> None:
    long = {p.name: n for p in PACKAGE.glob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules above {MAX_LINES} lines: {long}"


def test_the_imports_inside_the_live_package_form_no_cycle() -> None:
    graph = _imports_within_package()
    assert graph and "context" in graph and "engine" in graph
    unknown = {m: deps - set(graph) for m, deps in graph.items() if deps - set(graph)}
    assert not unknown, f"imports of modules that do not exist: {unknown}"
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(module):], module]))
        if module in done:
            return
        for dep in sorted(graph.get(module, ())):
            if dep != "__init__":
                visit(dep, [*path, module])
        done.add(module)

    for module in sorted(graph):
        if module != "__init__":
            visit(module, [])


def test_the_context_is_the_leaf_and_stops_know_nothing_of_closes() -> None:
    graph = _imports_within_package()
    assert graph["context"] <= {"config"}, graph["context"]
    assert not graph["stops"] & {"closing", "opening", "protection", "recovery", "engine", "trailing_watch"}, \
        graph["stops"]
