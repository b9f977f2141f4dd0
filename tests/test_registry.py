"""The Registry: crash restarts and idle passivation on real processes, and status.

The restart and passivation tests run on ``multiprocTCPBase`` only: they kill or watch the
SessionFile's own process, found as the member of the system's process group that has the
transcript open.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from processes import file_processes
from test_actor_scenarios import (
    EVENT_TIMEOUT_S,
    Base,
    MakeDriver,
    append,
    appended,
    canonical,
    event,
    grant,
    granted_later,
    process_running,
    queue,
    records,
    refused,
    release,
)
from waiting import eventually

from sessionlane.actors.fencestore import fence_path, parse_fence_record
from sessionlane.messages.errors import PathNotAllowed
from sessionlane.messages.wire import Revoked
from sessionlane.system.runtime.launch import TcpSystem


def file_actor_pid(system: TcpSystem, path: Path) -> int | None:
    """The member of ``system`` that has the transcript ``path`` open, if exactly one does."""
    target = canonical(path)
    holders = []
    for pid in system.members():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    holders.append(pid)
                    break
            except OSError:
                continue
    return holders[0] if len(holders) == 1 else None


def fence_ceiling(path: Path) -> int:
    with open(fence_path(canonical(path)), "rb") as fh:
        return parse_fence_record(fh.read()).ceiling


@pytest.mark.tcp
def test_a_killed_session_file_is_restarted_its_leases_are_revoked_and_fences_keep_rising(
    tcp_system: TcpSystem, driver_factory: MakeDriver, root: Path
) -> None:
    d = driver_factory(tcp_system.asys)
    a, b = d.open_lane("a"), d.open_lane("b")
    path = root / "s.jsonl"
    held = grant(d, a, path)
    appended(d, a, held, {"before": "crash"})
    waiting = queue(d, b, path, position=1)
    ceiling = fence_ceiling(path)
    assert ceiling >= held.fence
    before = path.read_bytes()
    victim = file_actor_pid(tcp_system, path)
    assert victim is not None

    os.kill(victim, signal.SIGKILL)

    revoked = event(d, a, "revoked", held)
    assert isinstance(revoked, Revoked) and revoked.reason == "actor_restart"
    # b's queued request is re-sent to the new actor, which starts above the persisted ceiling.
    successor = granted_later(d, b, waiting)
    assert successor.fence > ceiling
    refused(append(d, a, held, {"after": "crash"}), "stale_fence")
    assert path.read_bytes() == before
    eventually(
        lambda: file_actor_pid(tcp_system, path) not in (None, victim),
        "a new file actor after the crash",
        timeout=EVENT_TIMEOUT_S,
    )
    assert not process_running(victim)

    appended(d, b, successor, {"after": "restart"})
    release(d, b, successor)
    again = grant(d, a, path)
    assert again.fence > successor.fence
    [status] = d.status().files
    assert (status.path, status.fence) == (canonical(path), again.fence)
    assert status.holder is not None and status.holder.lane == "a"
    release(d, a, again)
    assert records(path) == [{"before": "crash"}, {"after": "restart"}]


@pytest.mark.tcp
def test_an_in_system_lanes_requests_reach_the_file_over_its_channel_not_the_registry(
    tcp_system: TcpSystem, driver_factory: MakeDriver, root: Path
) -> None:
    d = driver_factory(tcp_system.asys)
    a = d.open_lane("a")
    path = root / "s.jsonl"
    held = grant(d, a, path)
    appended(d, a, held, {"n": 1})
    release(d, a, held)
    [status] = d.status(str(path)).files
    assert status.counters["channel_calls"] == 3, "acquire, append and release"
    assert status.counters["channels"] == 1, "the lane's one channel to the file"


@pytest.mark.tcp
def test_an_idle_session_file_is_passivated_and_reactivated_on_the_next_request(
    tcp_system: TcpSystem, driver_factory: MakeDriver, root: Path
) -> None:
    d = driver_factory(tcp_system.asys, idle_ms=200)
    a = d.open_lane("a")
    path = root / "s.jsonl"
    held = grant(d, a, path)
    appended(d, a, held, {"n": 1})
    release(d, a, held)
    actor = file_actor_pid(tcp_system, path)
    assert actor is not None
    assert file_processes(tcp_system) == [actor]

    eventually(
        lambda: not process_running(actor),
        "the idle file actor to exit",
        timeout=EVENT_TIMEOUT_S,
    )
    # No file's process is left. (The group's process count is not compared: the zygote forks
    # the next file actor ahead, briefly through a short-lived first child.)
    assert file_processes(tcp_system) == []
    assert d.status().files == []
    assert d.status(str(path)).files == []

    again = grant(d, a, path)
    assert again.fence > held.fence
    assert file_actor_pid(tcp_system, path) not in (None, actor)
    appended(d, a, again, {"n": 2})
    [status] = d.status(str(path)).files
    assert status.fence == again.fence
    release(d, a, again)
    assert records(path) == [{"n": 1}, {"n": 2}]


def test_status_reports_one_path_or_every_active_one(
    base: Base, driver_factory: MakeDriver, root: Path
) -> None:
    d = driver_factory(base[1])
    a, b = d.open_lane("a"), d.open_lane("b")
    one, two = root / "one.jsonl", root / "two.jsonl"
    assert d.status().files == []
    held = grant(d, a, one)
    waiting = queue(d, b, one, position=1)
    grant(d, b, two, purpose="write")

    everything = d.status().files
    assert [f.path for f in everything] == [canonical(one), canonical(two)]
    [first] = d.status("one.jsonl").files  # any spelling of the path
    assert first.path == canonical(one) and first.fence == held.fence
    assert first.holder is not None
    assert (first.holder.lane, first.holder.lease, first.holder.purpose) == (
        "a",
        held.lease,
        "prompt",
    )
    assert [(q.lane, q.purpose, q.priority) for q in first.queue] == [
        ("b", "prompt", "interactive")
    ]
    assert first.counters["grants"] == 1 and first.counters["queued"] == 1
    [second] = d.status(str(two)).files
    assert second.holder is not None and second.holder.purpose == "write"
    assert second.queue == []
    assert d.status(str(root / "never-used.jsonl")).files == []
    assert not (root / "never-used.jsonl").exists()

    with pytest.raises(PathNotAllowed):
        d.status("/etc/passwd")

    release(d, a, held)
    granted_later(d, b, waiting)
