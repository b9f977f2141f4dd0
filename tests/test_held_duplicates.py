"""An append delivered again while its first answer is still held by group commit.

Found by the model of the whole core (``tests/test_file_core_model.py``): the copy was answered
at once from the de-duplication memory with a plain ``appended``, queued behind the held ack
but not waiting for the sync itself, so a failed fdatasync turned the first answer into the
disk error and let the copy's ``appended`` through. Now the copy waits for the same sync: both
are acknowledged by it, or both get its error (and a retry writes again).
Driven through the real SessionFile shell (the hand-driven ``Shell`` of ``test_durability``).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_durability import Clock, Shell  # the hand-driven SessionFile harness

from sessionlane.actors import session_file
from sessionlane.messages.carried import CarriedCalls
from sessionlane.messages.channel import call_frame, hello_frame
from sessionlane.messages.wire import Append, Appended, Error


@pytest.fixture
def shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shell]:
    clock = Clock()
    monkeypatch.setattr(session_file, "monotonic_ms", clock)
    made = Shell(tmp_path / "t.jsonl", clock)
    try:
        yield made
    finally:
        made.close()


def twice_in_one_pass(shell: Shell) -> None:
    """Lane ``w`` appends (fsync, no lease), and the same call arrives again in the same
    message, so before the pass ends (a client resending on a new connection, say)."""
    request = Append(id=7, lane="w", path=shell.path, records=[{"n": 1}])
    frame = call_frame("w", "w", "interactive", request)
    token = shell.serving.channels.carried.token
    shell.deliver(CarriedCalls(shell.path, hello_frame(token) + frame + frame), sender="lane:w")


def answers(shell: Shell) -> list[Any]:
    return [message for who, message in shell.events if who == "lane:w"]


def test_a_copy_of_an_append_whose_ack_is_held_is_acknowledged_by_the_same_sync(
    shell: Shell,
) -> None:
    twice_in_one_pass(shell)
    assert answers(shell) == []  # both wait for the sync
    shell.settle()
    first, second = answers(shell)
    assert isinstance(first, Appended) and first == second
    assert Path(shell.path).read_bytes().count(b"\n") == 1


def test_a_failed_sync_turns_the_held_ack_and_its_copy_into_its_error(shell: Shell) -> None:
    def failing(durability: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    shell.serving.transcript.sync = failing  # type: ignore[method-assign]
    twice_in_one_pass(shell)
    shell.settle()
    first, second = answers(shell)
    assert isinstance(first, Error) and first.code == "disk_full"
    assert isinstance(second, Error) and second.code == "disk_full"  # not a stale "appended"
