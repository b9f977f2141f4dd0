"""The parked child does thespian's start of its actor before it is asked for.

Real services: once a service has started one file, the child parked for the next one already
listens on its actor port (its transport is built), and that port is the actor's address once
it becomes a file; a child parked before any file was started has no template and starts the
ordinary way. A parked child still dies of ``SIGTERM``. The comparison of a template with the
arguments that come is tested without processes.
"""

from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path
from typing import Any

import pytest
from processes import file_processes
from thespian.system.transport.TCPTransport import TCPEndpoint
from waiting import eventually

from sessionlane.actors import procfs
from sessionlane.actors._shell import TITLE_PREFIX
from sessionlane.system.client import connect
from sessionlane.system.runtime import prestart, zygote
from sessionlane.system.runtime.prestart import Prestarted
from sessionlane.system.runtime.service import Service, embedded_service

PARKED = TITLE_PREFIX + zygote.PARKED_TITLE.split()[0]  # a long title keeps its first word


def _args(instance: int, notify: Any = "registry", capabilities: Any = None) -> list[Any]:
    """``startChild``'s arguments as the Registry gives them (stand-ins for the addresses)."""
    endpoint = TCPEndpoint(instance, None, "registry", "admin", False, False)
    caps = {"Thespian Watch Supported": True} if capabilities is None else capabilities
    return [
        "sessionlane.actors.session_file.SessionFile", None, endpoint, object, None, None,
        "registry", "admin", notify, "logger", None, caps, [3, 4], None, {"version": 1},
    ]  # fmt: skip


def _prestarted(args: list[Any]) -> Prestarted:
    return Prestarted(args, manager=None, handlers=None)


def test_a_template_fits_the_next_child_whatever_its_local_address_and_notify_target() -> None:
    built = _args(7)
    assert _prestarted(built).fits(_args(8, notify="admin"))
    assert _prestarted(built).fits(_args(7))


@pytest.mark.parametrize(
    "changed",
    [
        lambda a: a.__setitem__(11, {"Thespian Watch Supported": True, "member": "b"}),
        lambda a: a.__setitem__(0, "sessionlane.system.runtime.frozen_fork.ForkReport"),
        lambda a: a.__setitem__(2, TCPEndpoint(8, None, "other parent", "admin", False, False)),
        lambda a: a.__setitem__(3, dict),
        lambda a: a.__setitem__(9, "another logger"),
        lambda a: a.__setitem__(14, {"version": 1, "root": {"level": 10}}),
        lambda a: a.pop(),
    ],
    ids=["capabilities", "class", "parent", "transport", "logger", "log settings", "arity"],
)
def test_a_template_does_not_fit_a_child_it_was_not_built_for(changed: Any) -> None:
    args = _args(8)
    changed(args)
    assert not _prestarted(_args(7)).fits(args)


def test_a_template_leaves_out_what_names_the_child_it_came_from() -> None:
    kept = pickle.loads(prestart.template(_args(7)))
    assert kept[8] is None and kept[12] == []  # the notify target, the descriptors to close
    assert prestart.template(_args(7)[:-1]) == b""  # not startChild's arguments


def test_nothing_is_built_without_a_template_or_from_a_broken_one() -> None:
    assert Prestarted.build(b"") is None
    assert Prestarted.build(b"not a pickle") is None


def test_thespians_start_child_still_reads_as_it_is_replicated() -> None:
    assert prestart.supported()


def _tcp_listening_ports(pid: int) -> set[int]:
    """The TCP ports ``pid`` listens on."""
    mine = procfs.socket_inodes(pid)
    return {port for inode, (_, port) in procfs.listening_tcp().items() if inode in mine}


def _parked(service: Service, besides: set[int] = frozenset()) -> int:  # type: ignore[assignment]
    """The pid of ``service``'s parked child, other than ``besides``."""
    assert service.running is not None
    system = service.running.system

    def found() -> int | None:
        titled = (
            p
            for p in system.members()
            if p not in besides
            and procfs.command_line(p).startswith(PARKED)
            and (st := procfs.stat(p)) is not None
            and st.live
        )
        return next(titled, None)

    pid: int = eventually(found, "a parked child")
    return pid


@pytest.mark.tcp
@pytest.mark.timeout(120)
def test_once_a_file_started_the_next_child_listens_on_its_actor_port_before_it_is_asked(
    tmp_path: Path,
) -> None:
    with (
        embedded_service([str(tmp_path)], idle_ms=60_000) as service,
        connect(service.address) as sl,
    ):
        first = _parked(service)
        assert _tcp_listening_ports(first) == set()  # nothing started yet: no template
        lane = sl.lane("a")
        one = lane.acquire(str(tmp_path / "one.jsonl"), purpose="prompt")
        assert one is not None
        second = _parked(service, besides={first})
        [port] = eventually(lambda: _tcp_listening_ports(second), "the actor port bound ahead")
        two = lane.acquire(str(tmp_path / "two.jsonl"), purpose="prompt")
        assert two is not None
        two.append({"type": "x"})
        assert service.running is not None
        assert sorted(file_processes(service.running.system)) == sorted([first, second])
        assert _tcp_listening_ports(second) == {port}  # that port is its actor's address
        two.release()
        one.release()
    assert (tmp_path / "two.jsonl").read_bytes().count(b"\n") == 1


@pytest.mark.tcp
@pytest.mark.timeout(120)
def test_a_child_started_ahead_still_dies_of_sigterm_while_parked_and_the_next_file_opens(
    tmp_path: Path,
) -> None:
    with (
        embedded_service([str(tmp_path)], idle_ms=60_000) as service,
        connect(service.address) as sl,
    ):
        first = _parked(service)
        lane = sl.lane("a")
        assert lane.acquire(str(tmp_path / "one.jsonl"), purpose="prompt") is not None
        second = _parked(service, besides={first})
        eventually(lambda: _tcp_listening_ports(second), "the actor port bound ahead")
        os.kill(second, signal.SIGTERM)
        eventually(lambda: not (st := procfs.stat(second)) or not st.live, "the parked child gone")
        lease = lane.acquire(str(tmp_path / "two.jsonl"), purpose="prompt")
        assert lease is not None
        lease.append({"type": "x"})
        lease.release()
    assert (tmp_path / "two.jsonl").read_bytes().count(b"\n") == 1
