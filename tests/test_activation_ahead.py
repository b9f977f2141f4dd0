"""A new file's actor is given its channel listener and its ``FileInit`` ahead of thespian.

Real services: the zygote's parked child already listens on the abstract socket that becomes
its file's channel, and that listener accepts nobody before the file holds its ownership lock.
The pure parts (names, tokens, the hand-over) are tested without processes.
"""

from __future__ import annotations

import base64
import socket
from pathlib import Path

import pytest
from processes import file_processes
from waiting import eventually

from sessionlane.actors import ahead, procfs
from sessionlane.actors._shell import TITLE_PREFIX
from sessionlane.actors.ahead import BoundAhead
from sessionlane.messages.channel import hello_frame
from sessionlane.messages.errors import Unavailable
from sessionlane.system.client import connect
from sessionlane.system.runtime import zygote
from sessionlane.system.runtime.service import Service, embedded_service

PARKED = TITLE_PREFIX + zygote.PARKED_TITLE.split()[0]  # a long title keeps its first word


def test_a_name_and_token_are_written_from_their_bytes_as_a_file_names_its_own() -> None:
    bound, name, token = BoundAhead.fresh()
    assert bound == BoundAhead.from_bytes(name, token)
    assert bound.name == ahead.NAME_PREFIX + name.hex() and len(bound.name) == 12 + 16
    assert base64.urlsafe_b64decode(bound.token + "=" * (-len(bound.token) % 4)) == token
    assert len(bound.token) == 32  # as secrets.token_urlsafe(24)


def test_each_hand_over_is_taken_once() -> None:
    bound, _, _ = BoundAhead.fresh()
    listener = ahead.bind(bound)
    try:
        assert not listener.getblocking()
        ahead.inherit(listener, bound)
        assert ahead.take_inherited() == (listener, bound)
        assert ahead.take_inherited() is None
        ahead.spawned(bound)
        assert ahead.take_spawned() == bound and ahead.take_spawned() is None
        ahead.first("init")
        assert ahead.take_first() == "init" and ahead.take_first() is None
    finally:
        listener.close()


def test_closing_an_inherited_listener_refuses_what_waits_in_it() -> None:
    bound, _, _ = BoundAhead.fresh()
    ahead.inherit(ahead.bind(bound), bound)
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        peer.connect("\0" + bound.name)
        peer.sendall(hello_frame(bound.token))
        ahead.close_inherited()
        assert ahead.take_inherited() is None
        peer.settimeout(5.0)
        with pytest.raises(ConnectionResetError):
            assert peer.recv(1) == b""  # an EOF would do too: never a welcome
            raise ConnectionResetError
    finally:
        peer.close()
    with pytest.raises(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as late:
        late.connect("\0" + bound.name)  # the name is gone with its last holder


def _listening_names(pid: int) -> set[str]:
    """The abstract names ``pid`` listens on (``/proc/net/unix``: flags ``__SO_ACCEPTCON``)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    names = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 8 and parts[6] in inodes and parts[3] == "00010000":
            names.add(parts[7].lstrip("@"))
    return names


def _parked(service: Service) -> int:
    """The pid of ``service``'s parked child (the next file's actor)."""
    assert service.running is not None
    system = service.running.system

    def found() -> int | None:
        titled = (p for p in system.members() if procfs.command_line(p).startswith(PARKED))
        return next(titled, None)

    pid: int = eventually(found, "a parked child")
    return pid


@pytest.mark.tcp
@pytest.mark.timeout(120)
def test_the_parked_child_listens_ahead_and_that_listener_becomes_its_files_channel(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.jsonl"
    with embedded_service([str(tmp_path)], idle_ms=60_000) as service:
        parked = _parked(service)
        [bound] = _listening_names(parked)
        assert bound.startswith(ahead.NAME_PREFIX)
        with connect(service.address) as sl:
            lease = sl.lane("a").acquire(str(path), purpose="prompt")
            assert lease is not None
            lease.append({"type": "x"})
            assert service.running is not None
            assert file_processes(service.running.system) == [parked]
            assert _listening_names(parked) == {bound}  # served, not bound again
            lease.release()
    assert path.read_bytes().count(b"\n") == 1


@pytest.mark.tcp
@pytest.mark.timeout(120)
def test_a_listener_bound_ahead_serves_nobody_while_another_service_owns_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.jsonl"
    with (
        embedded_service([str(tmp_path)], idle_ms=60_000) as one,
        embedded_service([str(tmp_path)], idle_ms=60_000) as two,
        connect(one.address) as first,
    ):
        held = first.lane("a").acquire(str(path), purpose="prompt")
        assert held is not None
        parked = _parked(two)
        [bound] = _listening_names(parked)
        stranger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stranger.connect("\0" + bound)  # waits in the backlog, as the gateway's hello would
        try:
            with connect(two.address) as second, pytest.raises(Unavailable) as refused:
                second.lane("b").acquire(str(path), purpose="prompt", wait_timeout=5.0)
            assert "served by another sessionlane service" in str(refused.value)
            stranger.settimeout(10.0)
            try:
                got = stranger.recv(1)
            except ConnectionResetError:
                got = b""
            assert got == b""  # closed unanswered: the file never served its listener
        finally:
            stranger.close()
        held.append({"by": "one"})
        held.release()
    assert path.read_bytes().count(b"\n") == 1


def test_a_transcript_created_at_activation_is_durable_before_anything_is_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_durability import Clock, Shell

    from sessionlane.actors import confined, session_file
    from sessionlane.messages.wire import Acquire, Granted

    synced: list[str] = []
    granted_before: list[bool] = []
    real = confined.ConfinedDir.fsync

    def fsync(self: confined.ConfinedDir) -> None:
        synced.append(self.path)
        granted_before.append(any(isinstance(m, Granted) for _, m in shell.events))
        real(self)

    monkeypatch.setattr(confined.ConfinedDir, "fsync", fsync)
    clock = Clock()
    monkeypatch.setattr(session_file, "monotonic_ms", clock)
    shell = Shell(tmp_path / "t.jsonl", clock)
    try:
        assert synced == [] and shell.serving.directory.unsynced  # not on the way to a welcome
        shell.call("a", Acquire(lane="a", path=shell.path, purpose="prompt"))
        assert synced and synced[0] == str(tmp_path) and granted_before[0] is False
        assert not shell.serving.directory.unsynced
        assert any(isinstance(m, Granted) for _, m in shell.events)
    finally:
        shell.close()


@pytest.mark.tcp
@pytest.mark.timeout(120)
def test_a_file_that_cannot_activate_answers_every_ask_with_its_reason_not_a_loop(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.jsonl"
    with (
        embedded_service([str(tmp_path)], idle_ms=60_000) as one,
        embedded_service([str(tmp_path)], idle_ms=60_000) as two,
        connect(one.address) as first,
        connect(two.address) as second,
    ):
        held = first.lane("a").acquire(str(path), purpose="prompt")
        assert held is not None
        for attempt in range(3):  # each ask is answered, and starts at most one actor
            with pytest.raises(Unavailable) as refused:
                second.lane(f"b{attempt}").acquire(str(path), purpose="prompt", wait_timeout=5)
            assert "served by another sessionlane service" in str(refused.value)
        assert two.running is not None
        assert len(file_processes(two.running.system)) <= 1
        held.release()
