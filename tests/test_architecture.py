"""The package's shape: imports go one way. Read from the source with `ast`, imports inside functions included
(only `if TYPE_CHECKING:` blocks are left out: they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "gpt2cli"


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(tree: ast.AST) -> set[str]:
    """Every module name an import statement in `tree` names (for `from a import b`: `a` and `a.b`), wherever it
    stands, except under `if TYPE_CHECKING:`."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                names.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names.add(child.module)
                names.update(f"{child.module}.{alias.name}" for alias in child.names)
            visit(child)

    visit(tree)
    return names


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    paths = {module_name(path, package.parent): path for path in package.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        imported = imported_names(ast.parse(path.read_text(), filename=str(path)))
        graph[name] = {other for other in imported if other in paths and other != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for other in sorted(graph[node]):
            if state.get(other) == 1:
                return [*path[path.index(other) :], other]
            if other not in state and (cycle := visit(other)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    package = tmp_path / "gpt2cli"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from gpt2cli.b import thing\n")
    (package / "b.py").write_text("def thing():\n    from gpt2cli import a\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gpt2cli import a\n")
    graph = import_graph(package)
    assert find_cycle(graph) in (["gpt2cli.a", "gpt2cli.b", "gpt2cli.a"], ["gpt2cli.b", "gpt2cli.a", "gpt2cli.b"])
    assert graph["gpt2cli.c"] == set()  # TYPE_CHECKING imports never run


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("gpt2cli.model", ("gpt2cli.training", "gpt2cli.generation", "gpt2cli.data", "gpt2cli.formats")),
        ("gpt2cli.runtime", ("gpt2cli.model", "gpt2cli.data", "gpt2cli.training", "gpt2cli.generation")),
        # settings read the model's named shapes and the shard format's numbers (both import nothing), no more
        ("gpt2cli.settings", ("gpt2cli.training", "gpt2cli.generation", "gpt2cli.formats", "gpt2cli.cli")),
        ("gpt2cli.data", ("gpt2cli.training", "gpt2cli.generation", "gpt2cli.cli")),
        ("gpt2cli.generation", ("gpt2cli.training", "gpt2cli.cli", "gpt2cli.serving")),
        ("gpt2cli.training", ("gpt2cli.generation", "gpt2cli.cli", "gpt2cli.serving")),
    ],
)
def test_imports_go_one_way(layer: str, forbidden: tuple[str, ...]) -> None:
    wrong = [
        f"{module} imports {other}"
        for module, imports in import_graph().items()
        if module == layer or module.startswith(layer + ".")
        for other in imports
        if other.startswith(forbidden)
    ]
    assert not wrong


def test_the_core_imports_no_typer_or_rich() -> None:
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if name.startswith("gpt2cli.cli") or name == "gpt2cli.__main__":
            continue
        imported = imported_names(ast.parse(path.read_text()))
        wrong += [f"{name} imports {other}" for other in imported if other.split(".")[0] in ("typer", "rich")]
    assert not wrong


def test_subpackage_inits_hold_only_a_docstring() -> None:
    """Importing a subpackage costs nothing (`gpt2 --help` imports no torch)."""
    for init in PACKAGE.glob("*/__init__.py"):
        body = ast.parse(init.read_text()).body
        assert len(body) <= 1 and all(isinstance(node, ast.Expr) for node in body), init
