"""Gateway <-> SessionFile channels end to end: a real service, real processes, real sockets.

What the channels change for a user: requests skip the actor chain; a gateway that dies
takes its lanes' leases with it (the file sees the channel close) instead of leaving them
held until max_hold; a channel nobody uses is closed so the file can be passivated, and the
next request opens a new one.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest
from driver import ActorDriver
from waiting import eventually

from sessionlane.messages.wire import Acquire, Granted, Queued
from sessionlane.system.client import connect
from sessionlane.system.runtime.service import embedded_service
from tests.test_faults import gone, holders_of

pytestmark = pytest.mark.tcp


def listener_pid(port: int) -> int:
    """The pid of the process listening on 127.0.0.1:``port`` (the gateway)."""
    inodes = set()
    with open("/proc/net/tcp") as fh:
        for line in fh.readlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                inodes.add(f"socket:[{inode}]")
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                        return int(entry)
    raise AssertionError(f"nobody listens on port {port}")


def test_requests_travel_over_the_files_channel(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    with (
        embedded_service([str(tmp_path)], log_file=tmp_path / "actors.log") as service,
        connect(service.address) as client,
    ):
        lane = client.lane("chat")
        for turn in range(3):
            with lane.lease(str(path)) as lease:
                assert lease is not None
                lease.append({"turn": turn})
        (status,) = client.status(str(path)).files
    assert status.counters["channel_calls"] >= 9, status.counters
    assert path.read_text().count("\n") == 3


def test_a_killed_gateway_releases_its_lanes_leases_to_lanes_elsewhere(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    with embedded_service([str(tmp_path)], log_file=tmp_path / "actors.log") as service:
        running = service.running
        assert running is not None
        client = connect(service.address)
        held = client.lane("holder").acquire(str(path))
        assert held is not None
        driver = ActorDriver(running.system.asys)
        driver.registry = running.registry
        waiter = driver.open_lane("in-system")
        rid = driver.send(waiter, Acquire(lane="in-system", path=str(path), purpose="prompt"))
        driver.expect(waiter, lambda r: r.id == rid and isinstance(r, Queued))

        port = int(service.address.rsplit(":", 1)[1])
        pid = listener_pid(port)
        os.kill(pid, signal.SIGKILL)
        eventually(lambda: gone(pid), "the gateway to die", timeout=30.0)

        granted = driver.reply_to(waiter, rid)
        assert isinstance(granted, Granted)
        assert granted.fence > held.fence
        with contextlib.suppress(Exception):
            client.close()


def test_an_idle_channel_is_closed_its_file_passivated_and_the_next_request_reopens(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.jsonl"
    with (
        embedded_service([str(tmp_path)], log_file=tmp_path / "actors.log", idle_ms=300) as service,
        connect(service.address) as client,
    ):
        lane = client.lane("chat")
        with lane.lease(str(path)) as lease:
            assert lease is not None
            lease.append({"turn": 1})
        (pid,) = eventually(lambda: holders_of(str(path)), "the file's actor", timeout=30.0)
        # Nothing forces this: the gateway closes the idle channel by itself, then the
        # file, quiet and with no channel, asks to be passivated.
        eventually(lambda: gone(pid), "the idle file actor to be passivated", timeout=20)
        with lane.lease(str(path)) as lease:
            assert lease is not None
            lease.append({"turn": 2})
        (status,) = client.status(str(path)).files
    assert status.counters["channel_calls"] >= 2
    assert path.read_text().splitlines() == ['{"turn":1}', '{"turn":2}']
