"""The package's import structure: one direction of dependencies, no cycles, a light ``import dipid``.

The module-level import graph is read from the source with ``ast`` (no module is imported), so
the test sees exactly what a reader of the files sees. See docs/architecture.md for the layers.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dipid"

#: Layers, bottom first. A module may import (at module level) only modules of its own layer or
#: below; the first matching prefix gives a module's layer.
LAYERS: list[tuple[str, ...]] = [
    ("dipid", "dipid._compat", "dipid._lazy", "dipid.errors", "dipid.files", "dipid.tables"),
    ("dipid.results",),
    ("dipid.io",),
    ("dipid.synth",),
    ("dipid.models",),
    ("dipid.metrics", "dipid.postprocess", "dipid.decode", "dipid.volume", "dipid.classical", "dipid.tiling"),
    ("dipid.predict",),
    ("dipid.train",),
    ("dipid.viz",),
    ("dipid.evaluate", "dipid.pipeline", "dipid.cluster", "dipid.demo", "dipid.cli"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    assert best is not None, f"{module} is in no layer of LAYERS: add it"
    return best[0]


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The dipid modules an import statement loads (``from pkg import name`` -> pkg.name if a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    found = []
    for alias in node.names:
        full = f"{base}.{alias.name}"
        found.append(full if full in MODULES else base)
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str) -> tuple[set[str], list[tuple[int, list[str]]]]:
    """(dipid modules imported at module level, [(line, modules) of imports inside functions])."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    top: set[str] = set()
    inner: list[tuple[int, list[str]]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # annotations only: never executed
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                targets = _targets(child, module)
                if in_function:
                    inner.append((child.lineno, targets))
                else:
                    top.update(t for t in targets if t == "dipid" or t.startswith("dipid."))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, inner


IMPORTS = {module: _imports(module) for module in MODULES}  # each file parsed once
GRAPH = {module: top - {module} for module, (top, _) in IMPORTS.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := dfs(start)):
            return cycle
    return None


def test_graph_is_read_from_the_source():
    # The reader must see real edges, or every other test here passes vacuously.
    assert "dipid.errors" in GRAPH["dipid.io.scan"]
    assert "dipid.results" in GRAPH["dipid.predict"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_dependencies_point_down_the_layers():
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
              for m, targets in GRAPH.items() for t in targets if t in MODULES and _layer(t) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_results_and_errors_import_nothing_above_them():
    for leaf in ("dipid.errors", "dipid.files", "dipid.tables", "dipid.results"):
        assert GRAPH[leaf] <= {"dipid", "dipid.errors", "dipid.files"}, (leaf, GRAPH[leaf])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_inside_functions_say_why(module):
    """An import of a dipid module inside a function (one that pulls in a heavy or optional
    dependency, or a documented delegation) carries a comment on its line or just above it."""
    lines = MODULES[module].read_text(encoding="utf-8").splitlines()
    _, inner = IMPORTS[module]
    silent = []
    for lineno, targets in inner:
        if not any(t == "dipid" or t.startswith("dipid.") for t in targets):
            continue  # third-party optional dependencies (scipy, tifffile, plotly) are imported where used
        k = lineno - 1
        explained = "#" in lines[k]
        j = k - 1
        while not explained and j >= 0:
            text = lines[j].strip()
            if text.startswith("#") or "  # " in text:
                explained = True
            elif text.startswith(("import ", "from ")) or not text:
                j -= 1
                continue
            break
        if not explained:
            silent.append(f"{MODULES[module].name}:{lineno} imports {', '.join(targets)}")
    assert not silent, "imports inside functions without a reason:\n" + "\n".join(silent)


def test_io_and_results_do_not_import_torch():
    for module, path in MODULES.items():
        if module == "dipid.results" or module.startswith("dipid.io"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            names = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
            names |= {(n.module or "").split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
            assert not names & {"torch", "torchvision"}, module


def test_import_dipid_is_light():
    code = ("import sys, dipid, dipid.cli, dipid.results; "
            "print(sorted(m for m in ('torch', 'torchvision', 'plotly', 'dask', 'h5py') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
