"""The layers stack one way (bench → flows → stages → store) and no two modules of the
project import each other, directly or around a loop, at the top or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

from store.hashing import imports_in

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["store", "stages", "flows", "bench"]  # each may import only those before it


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")}


def imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``name`` imports anywhere in its code (the reader code versions use)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = imports_in(ast.parse(path.read_text()), package,
                       lambda _base, module: module in modules)
    return {m for m in found if m in modules and m != name}


def test_nothing_imports_a_layer_above_its_own():
    modules = project_modules()
    upward = [(name, other) for name, path in modules.items()
              for other in imports(name, path, modules)
              if LAYERS.index(other.split(".")[0]) > LAYERS.index(name.split(".")[0])]
    assert upward == []


def test_no_import_cycles_between_modules():
    modules = project_modules()
    graph = {name: imports(name, path, modules) for name, path in modules.items()}
    # a package importing its own submodules (registration, re-exports) is not a cycle
    graph = {name: {m for m in deps if not m.startswith(name + ".")}
             for name, deps in graph.items()}
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []
