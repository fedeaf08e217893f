"""The layout rules of src/ and tests/, read from the source with ``ast``.

The architecture is only as good as the rules that keep it: no import
cycle among the package's modules (imports inside functions count; those
under ``if TYPE_CHECKING:`` do not), no module reaching for another's
private names, nothing importing the command line, imports inside
functions only for start-up time, and a test module for every source
module with logic, which imports shared helpers, never conftest or
another test module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import REPO

PACKAGE = REPO / "src" / "fastpoetry"
TESTS = REPO / "tests"

#: Imports inside functions allowed in src/, each for start-up time.
MAX_FUNCTION_IMPORTS = 3

#: Modules without logic of their own, which need no test module.
NO_LOGIC = {"__init__", "__main__", "exits"}


@dataclass
class Module:
    """What one source module imports from the package."""

    name: str
    #: Package modules imported, outside ``if TYPE_CHECKING:``.
    imports: set[str] = field(default_factory=set)
    #: ``(line, text)`` of each import inside a function.
    in_functions: list[tuple[int, str]] = field(default_factory=list)
    #: ``module._name`` of each private name taken from another package module.
    private: list[str] = field(default_factory=list)


def _under_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _read(path: Path) -> Module:
    module = Module(path.stem)
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    # Names bound to package modules, for attribute access (``app._give_up``).
    aliases: dict[str, str] = {}

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            function = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            checking = type_checking or _under_type_checking(child)
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function:
                module.in_functions.append((child.lineno, ast.unparse(child)))
            if isinstance(child, ast.ImportFrom) and child.level == 1:
                if child.module is None:  # from . import a, b
                    for alias in child.names:
                        if alias.name in modules:
                            aliases[alias.asname or alias.name] = alias.name
                            if not checking:
                                module.imports.add(alias.name)
                else:
                    if not checking:
                        module.imports.add(child.module)
                    module.private.extend(
                        f"{child.module}.{alias.name}" for alias in child.names if alias.name.startswith("_")
                    )
            if (
                isinstance(child, ast.Attribute)
                and isinstance(child.value, ast.Name)
                and child.value.id in aliases
                and child.attr.startswith("_")
            ):
                module.private.append(f"{aliases[child.value.id]}.{child.attr}")
            visit(child, function, checking)

    visit(ast.parse(path.read_text(encoding="utf-8")), False, False)
    module.imports.discard("__init__")
    return module


MODULES = {module.name: module for module in map(_read, sorted(PACKAGE.glob("*.py")))}


def _cycles() -> Iterator[list[str]]:
    """Every import cycle, as the modules along it (each found from its smallest name)."""

    def walk(path: list[str]) -> Iterator[list[str]]:
        for follow in sorted(MODULES[path[-1]].imports & MODULES.keys()):
            if follow == path[0]:
                yield [*path, follow]
            elif follow not in path and follow > path[0]:
                yield from walk([*path, follow])

    for name in sorted(MODULES):
        yield from walk([name])


def test_the_reader_sees_imports_and_cycles() -> None:
    """The checks below would catch what they look for: the reader is checked on known facts."""
    assert "trio" not in MODULES["app"].imports  # only package modules count
    assert {"lifecycle", "listeners", "options"} <= MODULES["app"].imports
    assert MODULES["cli"].in_functions, "cli's imports for start-up time are inside functions"


def test_no_import_cycle_among_the_package_modules() -> None:
    assert list(_cycles()) == []


def test_nothing_imports_the_command_line() -> None:
    importers = sorted(name for name, module in MODULES.items() if "cli" in module.imports)
    assert importers == ["__main__"]


def test_no_module_uses_another_modules_private_names() -> None:
    private = {name: module.private for name, module in MODULES.items() if module.private}
    assert private == {}


def test_imports_inside_functions_are_few_and_say_why() -> None:
    inside = [(name, line, text) for name, module in MODULES.items() for line, text in module.in_functions]
    assert len(inside) <= MAX_FUNCTION_IMPORTS, inside
    for name, line, text in inside:
        source = (PACKAGE / f"{name}.py").read_text(encoding="utf-8").splitlines()[line - 1]
        assert "start-up time" in source, f"{name}.py:{line}: {text} gives no reason"


@pytest.mark.parametrize("name", sorted(set(MODULES) - NO_LOGIC))
def test_every_module_with_logic_has_a_test_module(name: str) -> None:
    assert (TESTS / f"test_{name}.py").is_file()


def _test_modules() -> list[Path]:
    return sorted([*TESTS.glob("*.py"), *(TESTS / "system").glob("*.py")])


@pytest.mark.parametrize("path", _test_modules(), ids=lambda path: str(path.relative_to(TESTS)))
def test_no_test_module_imports_conftest_or_another_test_module(path: Path) -> None:
    imported: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.append(node.module.split(".")[-1])
        elif isinstance(node, ast.ImportFrom):  # from . import x
            imported.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.extend(alias.name.split(".")[-1] for alias in node.names)
    forbidden = [name for name in imported if name == "conftest" or name.startswith("test_")]
    assert forbidden == []


def test_the_readme_layout_table_names_every_module() -> None:
    """README's Layout table has a row for each module of src/fastpoetry (but __init__ and __main__)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    layout = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in sorted(set(MODULES) - {"__init__", "__main__"})
               if f"`src/fastpoetry/{name}.py`" not in layout]
    assert missing == []
