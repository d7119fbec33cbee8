"""The package's import graph has no cycle, counting imports inside functions too.

Read from the source with :mod:`ast` (nothing is imported): every ``import`` and ``from ... import`` of every module
of ``vmoe_lib``, at module level or inside a function, except those under ``if TYPE_CHECKING:`` (never executed).
An import of ``a.b.c`` from module ``m`` is an edge to ``a.b.c`` and to each package on the way (``a.b``), unless
that package already encloses ``m`` (then it is being imported already and does not run again).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vmoe_lib"


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[tuple[str, int, str | None, int]]:
    """``(module, level, name, line)`` of every import statement outside ``if TYPE_CHECKING:`` blocks."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, 0, None, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.extend((node.module or "", node.level, alias.name, node.lineno) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """``{module: {imported module of the package: line}}`` for every module of the package under ``root``."""
    modules = _modules(root)
    top = root.name
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for module, level, imported, line in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if level:
                base = package.split(".")
                base = base[: len(base) - (level - 1)]
                target = ".".join(base + ([module] if module else []))
            else:
                target = module
            if target != top and not target.startswith(top + "."):
                continue
            full = f"{target}.{imported}" if imported and f"{target}.{imported}" in modules else target
            for t in [*_ancestors(full), full]:
                if t in modules and t != name and t not in _ancestors(name):
                    edges.setdefault(t, line)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each as a list of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                strong(w)
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
            strong(v)
    return out


def _describe(component: list[str], graph: dict[str, dict[str, int]]) -> str:
    inside = set(component)
    edges = [f"    {a} -> {b} (line {line})" for a in component for b, line in graph[a].items() if b in inside]
    return "  " + ", ".join(component) + ":\n" + "\n".join(edges)


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30, "the walker found too few modules: is PACKAGE right?"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (module-level or inside functions):\n" + "\n".join(_describe(c, graph) for c in cycles)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_walker_finds_a_cycle_through_a_function_level_import(tmp_path):
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from .b import g\n",
        "pkg/b.py": "from . import a\n",
    })
    assert find_cycles(import_graph(pkg)) == [["pkg.a", "pkg.b"]]


def test_the_walker_counts_a_package_init_on_the_way_but_not_an_enclosing_one(tmp_path):
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "from .x import X\n",
        "pkg/low/x.py": "def f():\n    from ..high.y import Y\n",  # runs pkg/high/__init__ first
        "pkg/high/__init__.py": "from ..low import X\n",
        "pkg/high/y.py": "",
        "pkg/sib/__init__.py": "from . import one, two\n",
        "pkg/sib/one.py": "from . import two\n",  # pkg.sib encloses one: not an edge back to it
        "pkg/sib/two.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import one\n",
    })
    graph = import_graph(pkg)
    assert "pkg.sib" not in graph["pkg.sib.one"] and "pkg.sib.one" not in graph["pkg.sib.two"]
    assert find_cycles(graph) == [["pkg.high", "pkg.low", "pkg.low.x"]]


@pytest.mark.parametrize("module", ["vmoe_lib.results", "vmoe_lib.routers.router", "vmoe_lib.sweep"])
def test_known_modules_are_in_the_graph(module):
    assert module in import_graph()
