"""The layers hold, inside one namespace.

``messages/`` (the models and codecs) may import neither ``sessionlane.actors`` nor
``sessionlane.system``; ``actors/`` (the thespian shells and their pure state machines) may not
import ``sessionlane.system`` (which starts and serves them). Every ``import`` and ``from``
statement counts, wherever it is: at the top, inside a function, under ``TYPE_CHECKING``.

The folders install as ``sessionlane.actors``, ``sessionlane.messages`` and
``sessionlane.system``: nothing anywhere in the repository may import them by their folder
names (``actors``, ``messages``, ``system``), which would load a second copy of a module in a
source checkout and fail outright in an install.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN = {
    "messages": ("sessionlane.actors", "sessionlane.system"),
    "actors": ("sessionlane.system",),
}
"""For each lower layer, the packages above it that none of its modules may import."""


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in ``source``, relative ones resolved from ``module``."""
    found: list[tuple[int, str]] = []
    package = module.split(".")[:-1] if not module.endswith(".__init__") else module.split(".")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def violations(layer: str, root: Path = ROOT) -> list[str]:
    """Every import in ``layer``'s modules of a package it must not depend on."""
    bad: list[str] = []
    for path in sorted((root / layer).rglob("*.py")):
        module = ".".join(("sessionlane", *path.relative_to(root).with_suffix("").parts))
        for line, name in imported_modules(path.read_text(), module):
            if any(name == above or name.startswith(above + ".") for above in FORBIDDEN[layer]):
                bad.append(f"{path.relative_to(root)}:{line} imports {name}")
    return bad


FOLDER_NAMES = ("actors", "messages", "system")
"""The layers' folder names: top-level modules of these names are the user's, never ours."""


def folder_name_imports(root: Path = ROOT) -> list[str]:
    """Every import, in any Python file of the repository, of a layer by its folder name."""
    bad: list[str] = []
    for folder in ("actors", "messages", "system", "sessionlane", "tests", "examples"):
        for path in sorted((root / folder).rglob("*.py")):
            if path.is_relative_to(root / "sessionlane") and path.parent != root / "sessionlane":
                continue  # sessionlane/actors etc. are links to the folders walked above
            for line, name in imported_modules(path.read_text(), "top.level"):
                if name.split(".")[0] in FOLDER_NAMES:
                    bad.append(f"{path.relative_to(root)}:{line} imports {name}")
    return bad


def test_nothing_imports_a_layer_by_its_folder_name() -> None:
    assert folder_name_imports() == []


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_module_of_a_lower_layer_imports_a_layer_above_it(layer: str) -> None:
    assert violations(layer) == []


def test_the_walk_sees_imports_inside_functions_and_type_checking_blocks(tmp_path: Path) -> None:
    (tmp_path / "actors").mkdir()
    (tmp_path / "actors" / "sneaky.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from sessionlane.system.config import Settings\n"
        "def later():\n"
        "    import sessionlane.system.runtime.launch\n"
        "    from ..system import config\n"
        "from sessionlane.messages.wire import Error\n"
        "import sessionlane.systemic\n"
    )
    assert violations("actors", tmp_path) == [
        "actors/sneaky.py:3 imports sessionlane.system.config",
        "actors/sneaky.py:5 imports sessionlane.system.runtime.launch",
        "actors/sneaky.py:6 imports sessionlane.system",
    ]
    (tmp_path / "messages").mkdir()
    (tmp_path / "messages" / "models.py").write_text(
        "from sessionlane.actors import _shell\nimport os\n"
    )
    assert violations("messages", tmp_path) == ["messages/models.py:1 imports sessionlane.actors"]


def test_the_folder_name_walk_sees_a_bare_layer_import(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "import messages.errors\nfrom sessionlane.messages import errors\nfrom system import x\n"
    )
    assert folder_name_imports(tmp_path) == [
        "tests/test_x.py:1 imports messages.errors",
        "tests/test_x.py:3 imports system",
    ]
