"""``import revtree`` stays light: no adapter targets, no test or plotting tools."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # the fast tier: pytest -m "not slow"


def test_import_revtree_imports_no_optional_package():
    code = (
        "import sys, revtree, revtree.codecs\n"
        "heavy = {'equiformer_pytorch', 'reformer_pytorch', 'hypothesis', 'matplotlib',"
        " 'revtree.adapters'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _module_graph():
    """revtree's modules and what each imports of revtree, anywhere (for typing, deferred)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "revtree"
    paths = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        paths[name] = path
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    found.add(full if full in paths else target)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {d for d in found if d in paths and d != name}
    return graph


def test_no_import_circle_inside_revtree():
    graph = _module_graph()
    state: dict[str, int] = {}
    circles = []

    def visit(name, path):
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                circles.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, circles
