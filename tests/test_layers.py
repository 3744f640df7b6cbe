"""The package's floors run one way: a module imports only modules on its own floor or below.

Every ``import`` counts, including the lazy ones inside functions: a lazy import that reaches up
is still a dependency on the floor above. The floors, bottom to top, are ``FLOORS`` below:
foundations (errors, config, logs, files); data, process groups and onnxruntime sessions; models,
metrics and reference resolution; distillation; exporters and run directories; the benchmark
harness; the orchestrators (runs, bundle); the CLI and the package's public namespace.
Imports spelled as strings (``importlib.import_module``) are not seen; kdedge has none of its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "kdedge"

#: Module-name prefixes per floor, bottom first. A module belongs to the longest prefix it matches.
FLOORS: list[tuple[str, ...]] = [
    ("kdedge._version", "kdedge._fs", "kdedge._modes", "kdedge._quiet", "kdedge._dynamo", "kdedge.errors", "kdedge.config", "kdedge.progress", "kdedge.tblog"),
    ("kdedge.data", "kdedge.distributed", "kdedge.ort"),
    ("kdedge.models", "kdedge.metrics", "kdedge.resolve"),
    ("kdedge.distill",),
    ("kdedge.exporters", "kdedge.rundir"),
    ("kdedge.bench",),
    ("kdedge.runs", "kdedge.search", "kdedge.pruning", "kdedge.qat", "kdedge.sensitivity", "kdedge.bundle"),
    ("kdedge.cli", "kdedge.__main__", "kdedge"),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor_of(module: str) -> int:
    best, floor = -1, None
    for i, prefixes in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, floor = len(p), i
    assert floor is not None, f"{module} is on no floor; add it to FLOORS"
    return floor


def _imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported kdedge module, line, at module level) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top_level = {id(n) for n in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from kdedge.x import y` imports kdedge.x.y when y is a submodule
            names = [f"{base}.{a.name}" if (ROOT.parent / f"{base}.{a.name}".replace(".", "/")).with_suffix(".py").exists()
                     or (ROOT.parent / f"{base}.{a.name}".replace(".", "/")).is_dir() else base for a in node.names]
        for name in names:
            if name == "kdedge" or name.startswith("kdedge."):
                found.append((name, node.lineno, id(node) in top_level))
    return found


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def test_every_module_is_on_a_floor():
    for module in MODULES:
        floor_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_floor(module):
    path = MODULES[module]
    upward = [f"line {line}: {name} (floor {floor_of(name)})" for name, line, _ in _imports(path, module) if floor_of(name) > floor_of(module)]
    assert not upward, f"{module} (floor {floor_of(module)}) imports upward: " + "; ".join(upward)


def test_no_import_cycles_between_modules():
    # Every import, lazy ones and package __init__ modules included (importing kdedge.x.y runs kdedge/x/__init__.py).
    graph = {m: {n for n, _, _ in _imports(p, m) if n in MODULES and n != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
