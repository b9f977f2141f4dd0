"""The layers hold: ``messages`` knows no runtime, ``actors`` knows nothing of ``system``.

``messages/`` (the models and codecs) may import neither ``actors`` nor ``system``; ``actors/``
(the thespian shells and their pure state machines) may not import ``system`` (which starts and
serves them). Every ``import`` and ``from`` statement counts, wherever it is: at the top, inside
a function, under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN = {
    "messages": ("actors", "system"),
    "actors": ("system",),
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
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        for line, name in imported_modules(path.read_text(), module):
            top = name.split(".")[0]
            if top in FORBIDDEN[layer]:
                bad.append(f"{path.relative_to(root)}:{line} imports {name}")
    return bad


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_module_of_a_lower_layer_imports_a_layer_above_it(layer: str) -> None:
    assert violations(layer) == []


def test_the_walk_sees_imports_inside_functions_and_type_checking_blocks(tmp_path: Path) -> None:
    (tmp_path / "actors").mkdir()
    (tmp_path / "actors" / "sneaky.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from system.config import Settings\n"
        "def later():\n"
        "    import system.runtime.launch\n"
        "from messages.wire import Error\n"
    )
    assert violations("actors", tmp_path) == [
        "actors/sneaky.py:3 imports system.config",
        "actors/sneaky.py:5 imports system.runtime.launch",
    ]
    (tmp_path / "messages").mkdir()
    (tmp_path / "messages" / "models.py").write_text("from actors import _shell\nimport os\n")
    assert violations("messages", tmp_path) == ["messages/models.py:1 imports actors"]
