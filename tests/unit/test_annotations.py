"""Every public function and method of the package says its types (issue 15): what the
next engineer reads first, and what mypy checks the bodies against."""

import ast
from pathlib import Path

import nbdcrypt

ROOT = Path(nbdcrypt.__file__).parent


def unannotated(path):
    """``module:function`` for each public function in ``path`` missing an argument or
    return annotation (``__init__`` needs no return annotation)."""
    missing = []

    def walk(node, public):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                walk(child, public and not child.name.startswith("_"))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and public \
                    and (child.name == "__init__" or not child.name.startswith("_")):
                args = child.args.posonlyargs + child.args.args + child.args.kwonlyargs
                bare = [a.arg for a in args if a.annotation is None and a.arg not in ("self", "cls")]
                if bare or (child.returns is None and child.name != "__init__"):
                    missing.append(f"{path.relative_to(ROOT)}:{child.lineno} {child.name}")

    walk(ast.parse(path.read_text()), path.name == "__init__.py" or not path.name.startswith("_"))
    return missing


def test_public_functions_are_annotated():
    missing = [entry for path in sorted(ROOT.rglob("*.py")) for entry in unannotated(path)]
    assert not missing, "public functions without annotations:\n" + "\n".join(missing)
