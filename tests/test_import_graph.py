"""The package's import graph: no cycle, and the library never imports the command line.

Read from the source with ``ast`` (nothing is imported), so a cycle that Python happens to
tolerate at run time (a late import inside a function) still fails here. Issue 17 asked for both
properties: "no import from the CLI in the library" and "the package's import graph has no cycle".
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "longnet_ref"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package modules that ``path`` imports, anywhere in the file (top level or inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # ``from . import x`` names the submodule x (not the package); ``from .m import f`` names m
            submodules = [f"{prefix}.{alias.name}" for alias in node.names if f"{prefix}.{alias.name}" in modules]
            targets = submodules or [prefix]
        else:
            continue
        for target in targets:
            # the longest package module that the target names (a.b.c -> a.b if a.b.c is a function)
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) for p in paths}


def is_cli(module: str) -> bool:
    return module == "longnet_ref.cli" or module.startswith("longnet_ref.cli.")


def test_the_graph_reader_sees_known_edges():
    graph = import_graph()
    assert "longnet_ref.index_sets" in graph["longnet_ref.reference"]
    assert "longnet_ref.attention" in graph["longnet_ref"]


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_library_never_imports_the_command_line():
    offenders = {m: sorted(filter(is_cli, deps)) for m, deps in import_graph().items() if not is_cli(m)}
    assert {m: d for m, d in offenders.items() if d} == {}
