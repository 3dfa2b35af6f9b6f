"""The package's layout, read from its source (nothing is imported or run): no import circle between hkd's modules,
function-local imports included, and no function over 100 lines."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hkd"
MAX_LINES = 100


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """{dotted name: file} of every module under root (a package's __init__.py under the package's name)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module `name` imports, anywhere in its file. `from a import b` is an edge to a.b
    when that is a module, else to a; relative imports are resolved against the module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])]
                )
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, set(known)) for name, path in known.items()}


def long_functions(limit: int = MAX_LINES, root: Path = PACKAGE) -> dict[str, int]:
    """{module.function (or module.Class.method): lines} of every function longer than `limit` lines."""
    found = {}
    for name, path in modules(root).items():

        def walk(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    qualified = f"{prefix}.{child.name}"
                    lines = child.end_lineno - child.lineno + 1
                    if not isinstance(child, ast.ClassDef) and lines > limit:
                        found[qualified] = lines
                    walk(child, qualified)

        walk(ast.parse(path.read_text(), str(path)), name)
    return found


def test_no_import_circle_in_the_package():
    assert circles(import_graph()) == []


def test_the_circle_finder_finds_a_planted_circle(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def f():\n    from pkg.c import x\n")
    (package / "c.py").write_text("from . import a\nx = 1\n")
    known = modules(package)
    graph = {name: imports(name, path, set(known)) for name, path in known.items()}
    assert circles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_no_function_over_100_lines():
    assert long_functions() == {}


@pytest.mark.parametrize("body, long", [(99, False), (100, True)])
def test_the_length_check_counts_every_line_of_a_function(tmp_path, body, long):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "m.py").write_text("def f():\n" + "    x = 1\n" * body)
    assert ("pkg.m.f" in long_functions(root=package)) == long
