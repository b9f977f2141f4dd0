"""thespian's idle connections stay few (``sessionlane.system.runtime.idle_sockets``).

The policy is a pure function over the transport's idle set, tested on its own with thespian's
own clock values; the real service shows the Registry, which every file's process connects to
as it starts, holding a bounded number of connections however many files are live.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from processes import file_processes
from waiting import eventually

from sessionlane.actors import procfs
from sessionlane.system.client import connect
from sessionlane.system.runtime import idle_sockets
from sessionlane.system.runtime.idle_sockets import KEPT, MIN_IDLE_S, trim
from sessionlane.system.runtime.service import embedded_service

PERIOD_S = 1200.0  # thespian's MAX_IDLE_SOCKET_PERIOD


def _idle(last_used: float) -> Any:
    """An idle socket as the policy reads it: its ``validity`` expires a period after use."""
    return SimpleNamespace(validity=SimpleNamespace(_time_to_quit=last_used + PERIOD_S))


def _opened(last_used: dict[str, float]) -> dict[str, Any]:
    return {key: _idle(at) for key, at in last_used.items()}


def test_at_most_twice_kept_nothing_is_closed() -> None:
    opened = _opened({f"p{n}": 0.0 for n in range(2 * KEPT)})
    closed: list[Any] = []
    assert trim(opened, 1_000.0, PERIOD_S, closed.append) == 0
    assert len(opened) == 2 * KEPT and closed == []


def test_over_twice_kept_the_least_recently_used_are_closed_down_to_kept() -> None:
    now = 5_000.0
    used = {f"p{n}": now - 100.0 + n for n in range(3 * KEPT)}  # p0 the least recently used
    opened = _opened(used)
    closed: list[Any] = []
    assert trim(opened, now, PERIOD_S, closed.append) == 2 * KEPT
    assert sorted(opened) == sorted(f"p{n}" for n in range(2 * KEPT, 3 * KEPT))
    assert [c.validity._time_to_quit - PERIOD_S for c in closed] == [
        used[f"p{n}"] for n in range(2 * KEPT)
    ]


def test_a_socket_used_within_min_idle_is_never_closed() -> None:
    now = 5_000.0
    recent = {f"r{n}": now - MIN_IDLE_S / 2 for n in range(3 * KEPT)}
    old = {"old": now - 10 * MIN_IDLE_S}
    opened = _opened(recent | old)
    closed: list[Any] = []
    assert trim(opened, now, PERIOD_S, closed.append) == 1
    assert "old" not in opened and len(opened) == 3 * KEPT


def test_thespian_forever_timers_are_left_alone() -> None:
    opened = _opened({f"p{n}": 0.0 for n in range(2 * KEPT + 1)})
    opened["forever"] = SimpleNamespace(validity=SimpleNamespace(_time_to_quit=None))
    trim(opened, 1_000.0, PERIOD_S, lambda sock: None)
    assert "forever" in opened


def _tcp_sockets(pid: int) -> int:
    """The TCP connections ``pid`` holds (its thespian connections; channels are Unix)."""
    tcp = set()
    for version in (4, 6):
        table = procfs.tcp_table(version)
        if table:
            tcp |= {line.split()[9] for line in table.decode().splitlines()[1:]}
    return len(procfs.socket_inodes(pid) & tcp)


@pytest.mark.tcp
@pytest.mark.timeout(180)
def test_the_registry_keeps_a_bounded_number_of_connections_to_its_files(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    files = 3 * KEPT
    with embedded_service([str(root)], log_file=tmp_path / "svc.log") as service:
        assert idle_sockets.installed()
        system = service.running.system if service.running else None
        assert system is not None
        with connect(service.address) as sl:
            lane = sl.lane("agent")
            for n in range(files):
                lane.append(str(root / f"f{n}.jsonl"), {"n": n})
            assert len(file_processes(system)) >= files
            titles = {p: procfs.command_line(p) for p in system.members()}
            (registry,) = [
                p for p, title in titles.items() if title.startswith("sessionlane: registry")
            ]
            # Each file's process connected to the Registry as it started: unbounded, the
            # Registry keeps all of them for 20 minutes (96 and more); bounded, it may have
            # closed some already while the files opened (a slow machine: a second between).
            grown = _tcp_sockets(registry)

            def bounded() -> int | None:
                # Registry traffic returns a socket to the idle set, which is when it trims
                lane.append(str(root / "f0.jsonl"), {"n": "again"})
                sl.status(str(root / "f0.jsonl"))
                held = _tcp_sockets(registry)
                return held if held <= 2 * KEPT + 8 else None

            held = eventually(bounded, "the Registry closes connections idle a while", 30, 0.1)
            # every file still answers (a new connection where its idle one was closed)
            for n in range(files):
                (found,) = sl.status(str(root / f"f{n}.jsonl")).files
                assert found.counters["appends"] >= 1
            assert os.path.exists(root / f"f{files - 1}.jsonl")
    print(f"the Registry's TCP connections: {grown} after {files} files, then {held}")
