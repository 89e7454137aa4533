"""The package's shape holds: layers one way (import-linter in `nox -s lint`), no import loops
between modules, and a cell's kind decided in the recipes alone."""

from __future__ import annotations

import re
from pathlib import Path

import grimp

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gpustack_offline"


def _loops(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph("gpustack_offline")
    # a package's __init__ naming its own modules is no loop of code
    for init in [
        m for m in graph.modules if (PACKAGE / m.split(".", 1)[-1].replace(".", "/")).is_dir()
    ]:
        for child in graph.find_children(init):
            if graph.direct_import_exists(importer=init, imported=child):
                graph.remove_import(importer=init, imported=child)
    assert _loops(graph) == []


def test_the_loop_finder_finds_a_loop():
    graph = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=a, imported=b)
    assert _loops(graph) == [["p.a", "p.b", "p.c"]]


KIND_TEST = re.compile(r"\.method\s*[!=]=|\.series\b|method\s*==\s*\"(pip|docker)\"")


def test_only_the_recipes_branch_on_a_cells_kind():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(("recipes/", "payload/")) or rel == "core/matrix.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if KIND_TEST.search(line):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert offenders == []
