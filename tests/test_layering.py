"""The package's floors: its import graph, read with ``ast`` (nothing is imported), has no circles and no arrows up.

Module-level imports define the layering; imports inside functions (kept lazy so the CLI starts light) may reach
up, but never into a module that imports the importer back at module level.  ``python tests/test_layering.py``
prints the floors: each module's level and what it imports at module level.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vqdeploy"
GROUND = ("vqdeploy.checks", "vqdeploy.returns", "vqdeploy.registry")  # import nothing of vqdeploy
# above export: the facade's ``load``, the command line, the runtime and the audio codec on top of it
EXPORT_USERS = {"vqdeploy", "vqdeploy.cli", "vqdeploy.runtime", "vqdeploy.audio", "vqdeploy.export"}


def _modules() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("vqdeploy",) + path.relative_to(PACKAGE).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, names) -> list[str]:
    """The vqdeploy modules an import statement loads (a ``from`` import of a submodule names the submodule)."""
    if isinstance(node, ast.Import):
        found = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".")[:len(module.split(".")) - node.level + is_package]
            base = ".".join(package + ([node.module] if node.module else []))
        found = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in names else base for alias in node.names]
    targets = []
    for target in found:
        while target and target not in names:
            target = target.rpartition(".")[0]
        if target and target != module:
            targets.append(target)
    return targets


def import_graph() -> dict[str, dict[str, bool]]:
    """module -> {imported module: True if at module level, False if only inside functions}."""
    names = _modules()
    graph: dict[str, dict[str, bool]] = {name: {} for name in names}

    def walk(nodes, module, is_package, top):
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, module, is_package, names):
                    graph[module][target] = graph[module].get(target, False) or top
            inner = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            walk(ast.iter_child_nodes(node), module, is_package, inner)

    for module, path in names.items():
        walk(ast.parse(path.read_text()).body, module, path.name == "__init__.py", True)
    return graph


def _module_level(graph) -> dict[str, set[str]]:
    return {module: {t for t, top in targets.items() if top} for module, targets in graph.items()}


def _reach(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for target in edges[stack.pop()] - seen:
            seen.add(target)
            stack.append(target)
    return seen


def floors() -> str:
    """The modules by level (0: imports nothing of vqdeploy at module level), each with what it imports."""
    edges, level = _module_level(import_graph()), {}

    def depth(module):
        if module not in level:
            level[module] = 0  # a circle (test_no_circles) would otherwise recurse forever
            level[module] = 1 + max((depth(t) for t in edges[module]), default=-1)
        return level[module]

    lines = []
    for floor in range(max(map(depth, edges)) + 1):
        lines.append(f"floor {floor}:")
        lines += [f"  {m}: {', '.join(sorted(edges[m])) or '-'}" for m in sorted(edges) if level[m] == floor]
    return "\n".join(lines)


def test_no_circles():
    """No module-level circle, and no function-level import of a module that imports the importer back."""
    graph = import_graph()
    edges = _module_level(graph)
    circles = [f"{m} -> {t}" for m in edges for t in edges[m] if m in _reach(edges, t)]
    assert not circles, f"module-level import circles through: {sorted(circles)}"
    lazy = [f"{m} -> {t} (inside a function)" for m, targets in graph.items() for t, top in targets.items()
            if not top and m in _reach(edges, t)]
    assert not lazy, f"function-level imports that close a circle with module-level ones: {sorted(lazy)}"


def test_only_the_layers_above_export_import_it():
    def part(module):  # the module or subpackage of vqdeploy that a module belongs to
        return ".".join(module.split(".")[:2])

    offending = [f"{m} -> {t}" for m, targets in import_graph().items() for t in targets
                 if part(t) == "vqdeploy.export" and part(m) not in EXPORT_USERS]
    assert not offending, f"imports of vqdeploy.export from below it: {sorted(offending)}"


def test_the_ground_floor_imports_nothing_of_vqdeploy():
    graph = import_graph()
    offending = [f"{m} -> {t}" for m in GROUND for t in graph[m]]
    assert not offending, f"ground-floor modules importing vqdeploy: {offending}"


if __name__ == "__main__":
    print(floors())
