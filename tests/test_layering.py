"""The package's layering: no import cycle among autobasin's modules (imports
inside functions included; those under ``if TYPE_CHECKING`` are not run), and
no module imports another module's underscore names."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "autobasin"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]):
    """(imported module, imported names) for every run-time ``from ... import``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    type_only = {id(sub) for node in ast.walk(tree)
                 if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for sub in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in type_only or not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            parts = package.split(".")
            target = ".".join(parts[:len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target.startswith("autobasin"):
            yield target, [a.name for a in node.names]


def test_no_import_cycles():
    modules = _modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        for target, names in _imports(name, path, modules):
            for dep in [target, *(f"{target}.{n}" for n in names)]:
                if dep in modules and dep != name:
                    graph.add_edge(name, dep)
    assert list(nx.simple_cycles(graph)) == []


def test_no_module_imports_underscore_names_of_another():
    modules = _modules()
    found = [(name, target, n) for name, path in modules.items()
             for target, names in _imports(name, path, modules) for n in names
             if n.startswith("_") and not n.startswith("__")]
    assert found == []


# The bottom layer: plain data and plumbing that every other module may use.
# None of them may import a module above it (the pipeline, matchers, the CLI).
BOTTOM = {"autobasin.guard", "autobasin.batches", "autobasin.inputs", "autobasin.state",
          "autobasin.spec"}


def test_the_bottom_layer_imports_only_the_bottom_layer():
    modules = _modules()
    found = [(name, target) for name in sorted(BOTTOM)
             for target, names in _imports(name, modules[name], modules)
             if target not in BOTTOM]
    assert found == []


def test_matchers_do_not_import_the_layers_above_them():
    # matching may use the bottom layer, permute and the captured graph, never
    # barrier/merge/repair/api/cli (which use matching)
    above = {"autobasin.barrier", "autobasin.merge", "autobasin.repair", "autobasin.api",
             "autobasin.cli", "autobasin.calibration", "autobasin.data", "autobasin.demo"}
    modules = _modules()
    found = [(name, target) for name in modules if name.startswith("autobasin.match")
             for target, names in _imports(name, modules[name], modules)
             if target in above or any(f"{target}.{n}" in above for n in names)]
    assert found == []
