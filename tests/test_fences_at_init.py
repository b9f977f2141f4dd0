"""A file offered through a listener bound ahead reserves its first fences in its ``FileInit``.

Its first contact's hello and calls are on their way by then (a direct client holds its ticket
from the Registry's offer), so the two fsyncs of the first block overlap their journey instead
of following the turn that reads them (``docs/activation.md``, "The tenth session"). A file
with no listener bound ahead reserves at the end of the first turn that answered a channel, as
before. Either way the fences a grant hands out are durable before the grant goes out.

Driven through the real SessionFile shell (the hand-driven ``Shell`` of ``test_durability``)
with a real listener handed to it as a parked child's is, and real fence files.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_durability import Clock, Shell  # the hand-driven SessionFile harness
from test_session_file_core import acquire

from sessionlane.actors import ahead, session_file
from sessionlane.actors.fencestore import FenceStore
from sessionlane.actors.lease_types import LeasePolicy
from sessionlane.messages.wire import Error, Granted

BLOCK = LeasePolicy().fence_block


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    made = Clock()
    monkeypatch.setattr(session_file, "monotonic_ms", made)
    return made


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A listener bound ahead, handed to the next actor as the zygote's parked child is."""
    bound, _, _ = ahead.BoundAhead.fresh()
    made = ahead.bind(bound)
    ahead.inherit(made, bound)
    try:
        yield made
    finally:
        ahead.close_inherited()  # none left for another test if the FileInit never took it
        made.close()


def replies(shell: Shell, lane: str) -> list[Any]:
    return [message for who, message in shell.events if who == f"lane:{lane}"]


def test_a_file_offered_ahead_has_its_first_block_durable_once_its_file_init_is_done(
    tmp_path: Path, clock: Clock, listener: socket.socket
) -> None:
    path = tmp_path / "t.jsonl"
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # in the backlog, as a gateway's
    peer.connect(listener.getsockname())
    shell = Shell(path, clock)
    try:
        s = shell.serving
        assert s.channels.connections() == 0  # nothing accepted yet
        assert FenceStore(str(path)).load() == BLOCK  # on disk, before any channel is answered
        assert (s.table.fence, s.table.fence_ceiling) == (0, BLOCK)
        assert s.fence_reservations == 1
        shell.call("a", acquire("prompt"))
        [granted] = replies(shell, "a")
        assert isinstance(granted, Granted) and granted.fence == 1
        assert s.fence_reservations == 1  # the grant reserved nothing more
    finally:
        peer.close()
        shell.close()


def test_a_file_without_a_listener_bound_ahead_reserves_at_its_first_answered_channel(
    tmp_path: Path, clock: Clock
) -> None:
    path = tmp_path / "t.jsonl"
    shell = Shell(path, clock)
    try:
        s = shell.serving
        assert FenceStore(str(path)).load() == 0 and s.fence_reservations == 0
        shell.call("a", acquire("prompt"))
        [granted] = replies(shell, "a")
        assert isinstance(granted, Granted) and granted.fence == 1
        assert FenceStore(str(path)).load() >= granted.fence and s.fence_reservations == 1
    finally:
        shell.close()


def test_a_reservation_that_fails_in_file_init_is_left_to_the_first_grant(
    tmp_path: Path, clock: Clock, listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = FenceStore.reserve
    full = [True]

    def reserve(self: FenceStore, ceiling: int) -> None:
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, ceiling)

    monkeypatch.setattr(FenceStore, "reserve", reserve)
    path = tmp_path / "t.jsonl"
    shell = Shell(path, clock)
    try:
        s = shell.serving  # still serving: the activation does not fail on it
        assert (s.table.fence, s.table.fence_ceiling) == (0, 0) and s.fence_reservations == 0
        shell.call("a", acquire("prompt"))
        [error] = replies(shell, "a")  # the grant had to reserve, and could not
        assert isinstance(error, Error) and error.code == "disk_full"
        assert s.table.holder is None and FenceStore(str(path)).load() == 0
        full[0] = False
        shell.call("b", acquire("prompt"))
        [granted] = replies(shell, "b")
        assert isinstance(granted, Granted) and granted.fence == 1
        assert FenceStore(str(path)).load() >= 1 and s.fence_reservations == 1
    finally:
        shell.close()
