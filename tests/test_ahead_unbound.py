"""A parked child whose channel listener could not be bound is not handed the ``FileInit`` ahead.

The Registry mints the direct-channel ticket of a new file's first ``direct`` before it knows
whether the parked child that becomes the file has a listener (``registry.direct_ahead``), and
puts it in the ``FileInit`` it hands the zygote for that child (``ahead.first``). Nobody is
offered a listener that could not be bound, so that ticket must not reach the file: the zygote
hands such a child no first message, and the Registry sends it the ``FileInit`` by thespian
without the tickets, as it does to a child forked on request. Before, the child delivered the
ticketed ``FileInit`` to its actor and the file kept a ticket nobody held (until it expired).

The hand-over is tested at the zygote's seam (``_Zygote.spawn``, a parked child faked by a
pipe); a real service whose zygote cannot bind any listener shows the file still activates
from its parked child and serves a direct client.
"""

from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path
from typing import Any

import pytest
from processes import file_processes
from test_activation_ahead import _listening_names, _parked

from sessionlane.actors import ahead
from sessionlane.actors.ahead import BoundAhead
from sessionlane.system.client import connect
from sessionlane.system.runtime import zygote
from sessionlane.system.runtime.service import embedded_service


def hand_to_parked(bound: BoundAhead | None, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    """What ``_Zygote.spawn`` hands a parked child with (``bound``) or without a listener:
    ``(pid, args, name, first)``, and the listener it reports for the Registry."""
    args_r, args_w = os.pipe()
    requests_r, requests_w = os.pipe()
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    z = zygote._Zygote(0, requests_w, mine)
    z.parked = zygote._Handed(4242, args_w, bound)
    monkeypatch.setattr(z, "park_later", lambda: None)  # no zygote to ask for the next one
    try:
        pid = z.spawn(["startChild", "args"], "file actor", "FileInit with a ticket")
        spawned = ahead.take_spawned()
        with os.fdopen(args_r, "rb") as pipe:
            (size,) = zygote._HEADER.unpack(pipe.read(zygote._HEADER.size))
            handed = pickle.loads(pipe.read(size))
    finally:
        for fd in (requests_r, requests_w):
            os.close(fd)
        mine.close()
        theirs.close()
    return (pid, *handed, spawned)


def test_a_parked_child_without_a_listener_is_handed_no_first_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pid, args, name, first, spawned = hand_to_parked(None, monkeypatch)
    assert (pid, args, name) == (4242, ["startChild", "args"], "file actor")
    assert first is None, "the FileInit with the offer's ticket reached a child nobody is offered"
    assert spawned is None  # the Registry sends the FileInit by thespian, without the tickets


def test_a_parked_child_with_a_listener_is_handed_its_first_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bound, _, _ = BoundAhead.fresh()
    pid, _, _, first, spawned = hand_to_parked(bound, monkeypatch)
    assert (pid, first, spawned) == (4242, "FileInit with a ticket", bound)


def _cannot_bind(bound: BoundAhead) -> socket.socket:
    raise OSError(98, "Address already in use (injected by the test)")


@pytest.mark.tcp
@pytest.mark.timeout(120)
def test_a_file_whose_parked_child_has_no_listener_serves_a_direct_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The zygote (forked from this process with the service) binds no listener ahead: the
    parked child becomes the file all the same, from the ``FileInit`` the Registry sends it,
    and the direct client's channel is the file's own offer."""
    monkeypatch.setattr(ahead, "bind", _cannot_bind)
    path = tmp_path / "s.jsonl"
    with embedded_service([str(tmp_path)], idle_ms=60_000) as service:
        parked = _parked(service)
        assert _listening_names(parked) == set()
        with connect(service.address) as sl:
            lease = sl.lane("a").acquire(str(path), purpose="prompt")
            assert lease is not None
            lease.append({"n": 1})
            assert service.running is not None
            assert file_processes(service.running.system) == [parked]
            lease.release()
    assert path.read_bytes() == b'{"n":1}\n'
