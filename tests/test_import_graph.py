"""The package's modules import each other without a cycle, lazy (function-level) imports
included; an import under ``if TYPE_CHECKING:`` (for a type hint only) does not count.

A package's ``__init__`` is a module of the graph: ``from sgn_lab.grads import X`` depends on
``sgn_lab/grads/__init__.py`` (and so on everything it re-exports), and so does importing any
module inside ``sgn_lab.grads`` from outside it, since Python runs the package's ``__init__``
first."""

from __future__ import annotations

import ast
from pathlib import Path

import sgn_lab

ROOT = Path(sgn_lab.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imported(tree: ast.Module, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package's modules that the module ``name`` imports, anywhere in its code."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # ``from pkg import module`` imports the module; ``from pkg import name``, pkg.
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    # Importing a.b.c runs a/__init__ and a/b/__init__ first: a real dependency (import
    # sgn_lab.user before sgn_lab.data and a cycle through data/__init__ shows), except on
    # the importer's own packages, which Python has initialised before the importer runs.
    own = set(_ancestors(name))
    found |= {a for m in found for a in _ancestors(m)} - own
    return {m for m in found if m in modules and m != name}


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(paths)
    return {name: imported(ast.parse(path.read_text()), name, path.name == "__init__.py",
                           modules)
            for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_graph_sees_lazy_imports_and_skips_type_checking():
    tree = ast.parse("from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from pkg import a\n"
                     "from pkg import NAME\n"
                     "def f():\n    from pkg import b\n    import pkg.c\n"
                     "    from . import d\n")
    modules = {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.m", "other", "other.e"}
    assert imported(tree, "pkg.m", False, modules) == {"pkg", "pkg.b", "pkg.c", "pkg.d"}
    # A module inside another package depends on that package's __init__ as well.
    tree = ast.parse("from other.e import f\n")
    assert imported(tree, "pkg.m", False, modules) == {"other", "other.e"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
