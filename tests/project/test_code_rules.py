"""The code rules (docs/development.md): functions a person can hold in their head and no module reaching
into another's private names, checked on every module of both packages."""

import ast

from _extract_util import REPO


def test_code_shape_short_functions_and_no_private_imports_across_modules():
    """Functions a person can hold in their head (at most 80 lines unless the docstring says why), and no
    module reaching into another's private names."""
    long, private = [], []
    for pkg in ("cmdcl_cache", "cmdcl_heads"):
        for path in (REPO / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node) or ""
                    if node.end_lineno - node.lineno + 1 > 80 and "longer than 80 lines because" not in doc:
                        long.append(f"{path.name}:{node.lineno} {node.name}")
                if isinstance(node, ast.ImportFrom) and node.level + bool(node.module) > 0:
                    private += [f"{path.name}:{node.lineno} {a.name}" for a in node.names
                                if a.name.startswith("_") and not a.name.startswith("__")]
    assert long == [] and private == []
