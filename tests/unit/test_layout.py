"""The package's shape: no module imports itself back through another (an import
cycle), and no module grows past what one job needs."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "dlq_worker"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports at import time (top level, not inside a
    function: a deferred import is how a cycle is broken on purpose)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("dlq_worker"):
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    edges.add(child if child in modules else node.module)
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
        graph[name] = {e for e in edges if e != name}
    return graph


def test_no_import_cycle() -> None:
    graph = _graph()
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycle = [*path[path.index(nxt):], nxt]
                if cycle[0] == min(cycle[:-1]):
                    cycles.append(" -> ".join(cycle))
            elif nxt not in done:
                visit(nxt, [*path, nxt])
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        visit(start, [start])
    assert not cycles, cycles


def test_the_tree_shows_the_roles() -> None:
    roles = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert {"drain", "chain", "watch", "ops", "cli", "throwaway", "config"} <= roles
