"""The package's imports point down its layers (docs/architecture.md): no cycle, no arrow from a lower layer
to a higher one, no library module importing an entry point, and nothing but the toy world importing it.
Lazy (in-function) imports count."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import REPO

# docs/architecture.md, "Layers": a module may import its own layer and those below it
LAYERS = {
    "util": 0,
    "text": 1,
    "runs": 2,
    "models": 3,
    "evaluation": 4,
    "checks": 4,
    "training": 5,
    "reporting": 5,
    "toyworld": 6,
}
ENTRY_POINTS = 7  # dreambooth_pl/{evaluate,report,dashboard,generate,bench}.py and the package's __init__
PLUG_IN_USERS = ("checks", "util", "text", "runs", "models", "evaluation", "training", "reporting")


def _imports() -> dict[str, set[str]]:
    graph = {}
    for path in (REPO / "dreambooth_pl").rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        graph[module] = {name for name in imported if name.split(".")[0] == "dreambooth_pl"}
    return graph


def _role(module: str) -> str:
    """The subpackage (or root module) a module belongs to: dreambooth_pl.models.families.base -> models."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(module: str) -> int:
    return LAYERS.get(_role(module), ENTRY_POINTS)


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} (layer {_layer(module)}) imports {imported} (layer {_layer(imported)})"
        for module, imports in sorted(graph.items())
        for imported in sorted(imports)
        if _layer(imported) > _layer(module)
    ]


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


def test_imports_point_down_the_layers():
    graph = _imports()
    roles = {_role(module) for module in graph}
    assert set(LAYERS) <= roles, f"a layer names no subpackage: {set(LAYERS) - roles}"
    assert not _upward(graph), "\n".join(_upward(graph))


@pytest.mark.parametrize(
    "module, imported",
    [
        ("dreambooth_pl.util.images", "dreambooth_pl.runs.layout"),
        ("dreambooth_pl.models.families.base", "dreambooth_pl.training.losses"),
        ("dreambooth_pl.training.job", "dreambooth_pl.generate"),
        ("dreambooth_pl.evaluation.render", "dreambooth_pl.toyworld.scenes"),
    ],
)
def test_the_layer_check_sees_an_upward_import(module, imported):
    assert _upward({module: {imported}})


def test_the_toy_world_is_imported_by_no_general_module():
    leaks = [
        f"{module} imports {imported}"
        for module, imports in sorted(_imports().items())
        if _role(module) in PLUG_IN_USERS
        for imported in imports
        if _role(imported) == "toyworld"
    ]
    assert not leaks, "\n".join(leaks)
