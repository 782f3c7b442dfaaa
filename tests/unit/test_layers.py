"""The layers import only downward, and no package imports itself in a circle.

Lowest first: errors and control, crypto, storage, datapath, formats, plugin, daemon
(README.md, "Layout").  Imports inside functions count too: hiding one there does
not make the arrow point the other way.
"""

import ast
from pathlib import Path

import pytest

import nbdcrypt

ROOT = Path(nbdcrypt.__file__).parent
LAYERS = ["errors", "control", "crypto", "storage", "datapath", "formats", "plugin", "daemon"]
# errors and control are one layer: neither imports anything above errors.
RANK = {name: max(0, i - 1) for i, name in enumerate(LAYERS)}


def module_name(path):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path):
    """The nbdcrypt modules ``path`` imports, as dotted names."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("nbdcrypt.")}


def known_modules():
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def graph():
    modules = known_modules()
    return {name: {m for m in imported_modules(path) if m in modules and m != name}
            for name, path in modules.items()}


def layer(module):
    return module.split(".")[1]


def test_every_package_is_a_known_layer():
    tops = {layer(name) for name in known_modules() if name.count(".") >= 1}
    assert tops <= set(RANK), f"packages outside the layer list: {tops - set(RANK)}"


@pytest.mark.parametrize("module", sorted(graph()))
def test_imports_run_downward(module):
    upward = [m for m in graph()[module] if RANK[layer(m)] > RANK[layer(module)]]
    assert not upward, f"{module} imports a higher layer: {upward}"


def test_no_import_cycles():
    edges = graph()
    # A package's __init__ re-exporting its own modules is not a cycle of behaviour.
    edges = {m: {d for d in deps if not (m.startswith(d + ".") and known_modules()[d].name == "__init__.py")}
             for m, deps in edges.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(edges[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
