"""The package's imports form no cycle: each arrow points down, lazy (in-function) imports included."""

from __future__ import annotations

import ast

from tests.conftest import REPO


def _imports() -> dict[str, set[str]]:
    graph = {}
    for path in (REPO / "dreambooth_pl").rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        graph[module] = {
            node.module
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dreambooth_pl")
        }
    return graph


def _cycle_from(graph: dict[str, set[str]], start: str) -> list[str] | None:
    stack, seen = [(start, [start])], set()
    while stack:
        module, path = stack.pop()
        for imported in graph.get(module, ()):
            if imported == start:
                return [*path, imported]
            if imported not in seen:
                seen.add(imported)
                stack.append((imported, [*path, imported]))
    return None


def test_no_module_imports_itself_through_others():
    graph = _imports()
    assert "dreambooth_pl.models.hub" in graph and graph["dreambooth_pl.models.families.base"]
    cycles = [" -> ".join(cycle) for module in sorted(graph) if (cycle := _cycle_from(graph, module))]
    assert not cycles, "\n".join(cycles)


def test_the_cycle_finder_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle_from(graph, "a") == ["a", "b", "c", "a"] and _cycle_from(graph, "d") is None
