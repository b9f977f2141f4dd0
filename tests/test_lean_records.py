"""A ``lean_record`` is frozen to mypy (strict) and behaves as a frozen dataclass otherwise.

It is mutable at run time (that is what makes it cheap: ``sessionlane.messages.lean_records``),
so immutability is checked here where it is enforced, by running mypy on code that assigns a
field. The rest (equality, hashing, ``replace``, ``match``, pickling) is compared with the
``@dataclass(frozen=True)`` it replaced.
"""

from __future__ import annotations

import dataclasses
import pickle
import textwrap
from pathlib import Path

import pytest
from mypy import api as mypy_api

from sessionlane.actors import session_file_effects, session_file_write_effects, timers
from sessionlane.actors.lease_types import Grant, Released
from sessionlane.actors.reclaim import FREE, LeaseRecord
from sessionlane.messages.lean_records import lean_record


@lean_record
class Lean:
    a: int
    b: tuple[str, ...] = ()
    c: float | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass(frozen=True)
class Frozen:
    a: int
    b: tuple[str, ...] = ()
    c: float | None = dataclasses.field(default=None, compare=False)


def _mypy(tmp_path: Path, body: str) -> tuple[str, int]:
    source = tmp_path / "probe.py"
    source.write_text(
        "from dataclasses import field\n"
        "from sessionlane.messages.lean_records import lean_record\n\n"
        "@lean_record\n"
        "class Probe:\n"
        "    a: int\n"
        "    b: list[int] = field(default_factory=list)\n\n" + textwrap.dedent(body)
    )
    out, err, status = mypy_api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(source)]
    )
    return out + err, status


def test_mypy_strict_rejects_an_assignment_to_a_field_as_for_a_frozen_dataclass(
    tmp_path: Path,
) -> None:
    out, status = _mypy(tmp_path, "probe = Probe(1)\nprobe.a = 2\n")
    assert status == 1, out
    assert 'Property "a" defined in "Probe" is read-only' in out, out


def test_mypy_strict_accepts_building_reading_and_replacing_a_lean_record(tmp_path: Path) -> None:
    out, status = _mypy(
        tmp_path,
        """
        from dataclasses import replace

        probe = Probe(1, [2])
        total: int = probe.a + sum(probe.b)
        changed: Probe = replace(probe, a=total)
        """,
    )
    assert status == 0, out


def test_equality_hash_and_repr_are_those_of_the_frozen_dataclass() -> None:
    lean, frozen = Lean(1, ("x",), 2.5), Frozen(1, ("x",), 2.5)
    assert lean == Lean(1, ("x",), None)  # ``compare=False`` is honoured
    assert lean != Lean(2, ("x",))
    assert hash(lean) == hash(frozen) == hash(Lean(1, ("x",)))
    assert repr(lean) == repr(frozen).replace("Frozen", "Lean")
    assert len({lean, Lean(1, ("x",))}) == 1
    assert dataclasses.replace(lean, a=3) == Lean(3, ("x",), 2.5)
    match lean:
        case Lean(1, b):
            assert b == ("x",)
        case _:
            pytest.fail("positional match did not bind")


def test_a_class_with_its_own_hash_keeps_it() -> None:
    @lean_record
    class Keyed:
        key: str
        note: str

        def __hash__(self) -> int:
            return hash(self.key)

    assert hash(Keyed("k", "one")) == hash("k")


def test_lean_records_are_slotted_and_survive_pickling() -> None:
    grant = Grant(req=("lane-uid", "r1"), lane="lane", lease="L1", fence=7, purpose="write")
    for value in (grant, Released(("u", "r2"), "lane", "L1", True), FREE, Lean(1, ("x",), 2.0)):
        assert not hasattr(value, "__dict__"), type(value)
        assert pickle.loads(pickle.dumps(value)) == value
    assert isinstance(FREE, LeaseRecord)


def test_the_file_effects_and_timers_are_all_lean_records() -> None:
    modules = (session_file_effects, session_file_write_effects, timers)
    classes = [
        value
        for module in modules
        for name in module.__all__
        if dataclasses.is_dataclass(value := getattr(module, name)) and isinstance(value, type)
    ]
    assert len(classes) >= 30
    for cls in classes:
        params = cls.__dataclass_params__  # type: ignore[attr-defined]
        assert not params.frozen and "__slots__" in cls.__dict__, cls
        assert cls.__hash__ is not None, cls
