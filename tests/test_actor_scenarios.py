"""The actor scenarios of issue 2, each on ``simpleSystemBase`` and on ``multiprocTCPBase``.

The test plays the agent through ``ActorDriver``: it sends wire requests to Lane actors and
reads their replies and events. Order is forced by message sequence only (a ``queued`` reply
proves the file saw a request; a reply on one lane proves what the file did before it), never
by sleeping. Timers that must fire inside an actor (max hold, recovery grace) are waited for
with a bounded ``expect``. Every assertion is on a real reply, a real event or the real file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from driver import ActorDriver, LaneHandle
from waiting import eventually

from sessionlane.actors import procfs
from sessionlane.messages.wire import (
    Abandon,
    Abandoned,
    AbortRequested,
    Acquire,
    Append,
    Appended,
    Error,
    Granted,
    Queued,
    Recover,
    Release,
    Released,
    Reply,
    Revoked,
)
from sessionlane.system.runtime import launch

Base = tuple[str, Any]
MakeDriver = Callable[..., ActorDriver]

EVENT_TIMEOUT_S = 5.0
"""Bound on waiting for a timer inside an actor (max hold, grace) to have its effect."""


# Helpers ----------------------------------------------------------------------------------


def acquire(d: ActorDriver, lane: LaneHandle, path: str | Path, **kw: Any) -> Reply:
    kw.setdefault("purpose", "prompt")
    return d.call(lane, Acquire(lane=lane.name, path=str(path), **kw))


def grant(d: ActorDriver, lane: LaneHandle, path: str | Path, **kw: Any) -> Granted:
    reply = acquire(d, lane, path, **kw)
    assert isinstance(reply, Granted), reply
    return reply


def queue(d: ActorDriver, lane: LaneHandle, path: str | Path, position: int, **kw: Any) -> Any:
    """Send an acquire that must be queued at ``position``; returns its request id."""
    kw.setdefault("purpose", "prompt")
    rid = d.send(lane, Acquire(lane=lane.name, path=str(path), **kw))
    note = d.expect(lane, lambda r: r.id == rid, what=f"the first answer to {rid}")
    assert isinstance(note, Queued), note
    assert note.position == position
    return rid


def granted_later(d: ActorDriver, lane: LaneHandle, rid: Any) -> Granted:
    reply = d.reply_to(lane, rid, timeout=EVENT_TIMEOUT_S)
    assert isinstance(reply, Granted), reply
    return reply


def append(d: ActorDriver, lane: LaneHandle, lease: Granted, *records: Any) -> Reply:
    return d.call(lane, Append(lease=lease.lease, fence=lease.fence, records=list(records)))


def appended(d: ActorDriver, lane: LaneHandle, lease: Granted, *records: Any) -> Appended:
    reply = append(d, lane, lease, *records)
    assert isinstance(reply, Appended), reply
    assert reply.fence == lease.fence
    assert reply.lines == len(records)
    return reply


def release(d: ActorDriver, lane: LaneHandle, lease: Granted) -> None:
    reply = d.call(lane, Release(lease=lease.lease))
    assert isinstance(reply, Released), reply
    assert reply.lease == lease.lease


def refused(reply: Reply, code: str) -> Error:
    assert isinstance(reply, Error), reply
    assert reply.code == code, reply
    return reply


def event(d: ActorDriver, lane: LaneHandle, kind: str, lease: Granted) -> Reply:
    return d.expect(
        lane,
        lambda r: r.type == kind and getattr(r, "lease", None) == lease.lease,
        EVENT_TIMEOUT_S,
        what=f"a {kind} event for {lease.lease}",
    )


def records(path: str | Path) -> list[Any]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def canonical(path: Path) -> str:
    return os.path.realpath(path)


def actor_gone(base: Base, lane: LaneHandle) -> Callable[[], bool]:
    """A probe: has the actor at ``lane.address`` exited?

    simple base: the actor is dropped from the in-process registry (thespian internals; there
    is no public probe). TCP base: the process that owns the actor's listening port is gone.
    """
    name, asys = base
    if name == "simple":
        registry = asys._systemBase.actorRegistry
        key = lane.address.actorAddressString
        return lambda: registry.get(key) is None
    port = lane.address.addressDetails.sockname[1]
    pid = listener_pid(port)
    assert pid is not None, f"no process listens on lane port {port}"
    return lambda: not process_running(pid)


def listener_pid(port: int) -> int | None:
    sockets = procfs.listening_tcp()
    inodes = {inode for inode, (_, p) in sockets.items() if p == port}
    holders = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and procfs.socket_inodes(int(entry)) & inodes:
            holders.append(int(entry))
    return min(holders) if holders else None


def process_running(pid: int) -> bool:
    stat = procfs.stat(pid)
    return stat is not None and stat.live


# 1. Contention ----------------------------------------------------------------------------


def test_a_second_lane_is_queued_then_granted_and_the_turns_do_not_interleave(
    base: Base, driver_factory: MakeDriver, root: Path
) -> None:
    d = driver_factory(base[1])
    a, b = d.open_lane("a"), d.open_lane("b")
    path = root / "s.jsonl"

    first = grant(d, a, path)
    assert first.path == canonical(path)
    waiting = queue(d, b, path, position=1)

    status = d.status(str(path)).files
    assert [f.path for f in status] == [canonical(path)]
    assert status[0].holder is not None and status[0].holder.lane == "a"
    assert [(q.lane, q.purpose) for q in status[0].queue] == [("b", "prompt")]

    turn_a = [{"turn": "a", "n": 1}, {"turn": "a", "n": 2}, {"turn": "a", "n": 3}]
    appended(d, a, first, *turn_a[:2])
    appended(d, a, first, turn_a[2])
    assert d.events(b, "granted") == []
    release(d, a, first)

    second = granted_later(d, b, waiting)
    assert second.fence > first.fence
    assert second.path == first.path
    turn_b = [{"turn": "b", "n": 1}, {"turn": "b", "n": 2}]
    at = appended(d, b, second, *turn_b)
    release(d, b, second)

    assert records(path) == turn_a + turn_b
    assert at.offset == len(b"".join(b'{"turn":"a","n":%d}\n' % n for n in (1, 2, 3)))


# 2. One actor per canonical path ----------------------------------------------------------


def test_symlinked_and_relative_spellings_of_a_path_reach_the_same_actor(
    base: Base, driver_factory: MakeDriver, root: Path, tmp_path: Path
) -> None:
    d = driver_factory(base[1])
    path = root / "s.jsonl"
    lanes = [d.open_lane(name) for name in ("plain", "dirlink", "filelink", "relative")]

    holder = grant(d, lanes[0], path)
    assert path.is_file()
    dir_link = tmp_path / "via-link"
    dir_link.symlink_to(root, target_is_directory=True)
    (root / "alias.jsonl").symlink_to("s.jsonl")
    spellings = [dir_link / "s.jsonl", root / "alias.jsonl", "s.jsonl"]

    # Mutual exclusion across spellings: each is queued behind the same holder.
    waiting = [
        queue(d, lane, spelling, position=i + 1)
        for i, (lane, spelling) in enumerate(zip(lanes[1:], spellings, strict=True))
    ]
    grants = [holder]
    for lane, rid in zip(lanes[1:], waiting, strict=True):
        release(d, lanes[lanes.index(lane) - 1], grants[-1])
        grants.append(granted_later(d, lane, rid))
    release(d, lanes[-1], grants[-1])

    assert {g.path for g in grants} == {canonical(path)}
    assert [g.fence for g in grants] == [holder.fence + i for i in range(4)]
    assert len({g.lease.split("-")[0] for g in grants}) == 1  # one actor's lease prefix
    files = d.status().files
    assert [(f.path, f.fence) for f in files] == [(canonical(path), grants[-1].fence)]
    assert files[0].counters["grants"] == 4


# 3. Max hold ------------------------------------------------------------------------------


def test_a_lease_held_past_max_hold_is_revoked_and_its_late_append_changes_nothing(
    base: Base, driver_factory: MakeDriver, root: Path
) -> None:
    d = driver_factory(base[1], max_hold_ms=300)
    a, b = d.open_lane("a"), d.open_lane("b")
    path = root / "s.jsonl"

    started = time.monotonic()  # the hold deadline counts from a later instant
    held = grant(d, a, path)
    appended(d, a, held, {"turn": "a"})
    waiting = queue(d, b, path, position=1)
    before = path.read_bytes()

    revoked = event(d, a, "revoked", held)
    assert isinstance(revoked, Revoked)
    assert (revoked.reason, revoked.path) == ("max_hold", canonical(path))
    assert time.monotonic() - started >= 0.299

    successor = granted_later(d, b, waiting)
    assert successor.fence > held.fence
    late = append(d, a, held, {"turn": "a", "late": True})
    assert refused(late, "stale_fence").id is not None
    assert path.read_bytes() == before
    refused(d.call(a, Release(lease=held.lease)), "not_holder")
    assert records(path) == [{"turn": "a"}]  # (b's lease runs out too: not waited for)


# 4. Recovery ------------------------------------------------------------------------------


def test_recovery_asks_the_holder_to_abort_revokes_it_after_the_grace_then_is_granted(
    base: Base, driver_factory: MakeDriver, root: Path
) -> None:
    d = driver_factory(base[1])
    a, fixer, again = d.open_lane("a"), d.open_lane("fixer"), d.open_lane("again")
    path = root / "s.jsonl"
    held = grant(d, a, path)

    started = time.monotonic()
    rid = d.send(fixer, Recover(lane="fixer", path=str(path), reason="stuck", grace_ms=300))
    abort = event(d, a, "abort_requested", held)
    assert isinstance(abort, AbortRequested)
    assert (abort.grace_ms, abort.path) == (300, canonical(path))

    coalesced = d.call(again, Recover(lane="again", path=str(path), reason="stuck", grace_ms=0))
    assert "already" in refused(coalesced, "contended").detail

    revoked = event(d, a, "revoked", held)
    assert isinstance(revoked, Revoked) and revoked.reason == "recovery"
    recovery = granted_later(d, fixer, rid)
    assert time.monotonic() - started >= 0.299
    assert recovery.purpose == "recovery"
    assert recovery.fence > held.fence
    refused(append(d, a, held, {"too": "late"}), "stale_fence")
    appended(d, fixer, recovery, {"recovered": True})
    release(d, fixer, recovery)
    assert records(path) == [{"recovered": True}]
    counters = d.status(str(path)).files[0].counters
    assert (counters["recoveries"], counters["recoveries_coalesced"]) == (1, 1)


def test_a_holder_that_releases_within_the_grace_hands_straight_to_the_recovery(
    base: Base, driver_factory: MakeDriver, root: Path
) -> None:
    d = driver_factory(base[1])
    a, fixer = d.open_lane("a"), d.open_lane("fixer")
    path = root / "s.jsonl"
    held = grant(d, a, path)

    started = time.monotonic()
    rid = d.send(fixer, Recover(lane="fixer", path=str(path), reason="stuck", grace_ms=60_000))
    event(d, a, "abort_requested", held)
    appended(d, a, held, {"finished": "turn"})
    release(d, a, held)

    recovery = granted_later(d, fixer, rid)
    assert time.monotonic() - started < 10.0  # long before the 60 s grace
    assert recovery.fence > held.fence
    assert d.events(a, "revoked") == []
    release(d, fixer, recovery)
    assert records(path) == [{"finished": "turn"}]


# 5. Abandon -------------------------------------------------------------------------------


def abandon_scenario(d: ActorDriver, root: Path, logged: Callable[[], list[str]] | None) -> None:
    """A lane abandons its lease while another waits: freed at once, one diagnostic line.

    ``logged`` returns the ``sessionlane.actors.session_file`` WARNING messages logged so far
    (None: do not check the log).
    """
    a, b = d.open_lane("a"), d.open_lane("b")
    path = root / "s.jsonl"
    held = grant(d, a, path, purpose="compaction")
    waiting = queue(d, b, path, position=1)

    reply = d.call(a, Abandon(lane="a", path=str(path), reason="hung compaction"))
    assert isinstance(reply, Abandoned)
    assert reply.leases == [held.lease]

    successor = granted_later(d, b, waiting)
    assert successor.fence > held.fence
    refused(append(d, a, held, {"after": "abandon"}), "stale_fence")
    assert path.read_bytes() == b""
    reply = d.call(a, Abandon(lane="a"))  # nothing left: an empty list, no second line
    assert isinstance(reply, Abandoned) and reply.leases == []
    release(d, b, successor)
    if logged is None:
        return

    def lines() -> list[str]:
        return [m for m in logged() if m.startswith("abandon ") and f"lease={held.lease} " in m]

    eventually(lambda: len(lines()) >= 1, "no abandon diagnostic was logged", timeout=3.0)
    [line] = lines()
    assert f"path={canonical(path)} " in line
    assert f"lane={a.uid} " in line
    assert re.search(r" held_ms=\d+ ", line)
    assert line.endswith(" reason=hung compaction")


def test_an_abandoning_lane_frees_the_file_at_once_and_logs_one_diagnostic_line(
    base: Base, driver_factory: MakeDriver, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sessionlane.actors.session_file")

    def logged() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "sessionlane.actors.session_file" and r.levelno == logging.WARNING
        ]

    # On TCP the line is checked in the system's log file, by the test below.
    abandon_scenario(driver_factory(base[1]), root, logged if base[0] == "simple" else None)


def test_an_abandon_of_every_path_gets_one_reply_listing_every_lease_even_without_an_id(
    base: Base, driver_factory: MakeDriver, root: Path
) -> None:
    d = driver_factory(base[1])
    a, b = d.open_lane("a"), d.open_lane("b")
    one, two = root / "one.jsonl", root / "two.jsonl"
    leases = sorted([grant(d, a, one).lease, grant(d, a, two).lease])
    waiting = queue(d, b, two, position=1)

    d.asys.tell(a.address, Abandon(lane="a", reason="no id"))  # ids are optional on the wire
    granted_later(d, b, waiting)
    sentinel = d.call(a, Abandon(lane="a"))  # answered after every reply to the first
    assert isinstance(sentinel, Abandoned) and sentinel.leases == []
    answers = [m for m in a.inbox if m.type == "abandoned"]
    assert answers == [Abandoned(id=None, leases=leases)]


@pytest.mark.tcp
def test_on_tcp_the_abandon_diagnostic_line_reaches_the_system_log_file(
    tcp_system: launch.TcpSystem, driver_factory: MakeDriver, root: Path
) -> None:
    def logged() -> list[str]:
        if not tcp_system.log_file.exists():
            return []
        text = tcp_system.log_file.read_text("utf-8")
        # Tolerant of the line format: "WARNING sessionlane.actors.session_file: msg"
        # (launch.log_config) or "WARNING:sessionlane.actors.session_file:msg"
        # (logging.BASIC_FORMAT).
        found = (_LOG_LINE.search(line) for line in text.splitlines())
        return [m.group(1) for m in found if m is not None]

    abandon_scenario(driver_factory(tcp_system.asys), root, logged)


_LOG_LINE = re.compile(r"\bWARNING\W+sessionlane\.actors\.session_file:\s?(.*)$")


# 6. Agent gone ----------------------------------------------------------------------------


def test_when_its_agent_is_gone_a_lane_drops_everything_and_exits(
    base: Base, driver_factory: MakeDriver, root: Path
) -> None:
    d = driver_factory(base[1])
    a, b, c = d.open_lane("a"), d.open_lane("b"), d.open_lane("c")
    one, two = root / "one.jsonl", root / "two.jsonl"
    held = grant(d, a, one)
    other = grant(d, c, two)
    queue(d, a, two, position=1)
    waiting = queue(d, b, one, position=1)
    exited = actor_gone(base, a)

    d.gone(a, "connection closed")

    successor = granted_later(d, b, waiting)
    assert successor.fence > held.fence
    eventually(exited, "the lane actor did not exit", timeout=EVENT_TIMEOUT_S)
    [two_status] = d.status(str(two)).files
    assert two_status.holder is not None and two_status.holder.lane == "c"
    assert two_status.queue == []
    release(d, c, other)
    [two_status] = d.status(str(two)).files
    assert two_status.holder is None
    assert two_status.fence == other.fence  # a's dropped request was never granted
    [one_status] = d.status(str(one)).files
    assert one_status.holder is not None and one_status.holder.lane == "b"
    assert one_status.counters["abandons"] == 1


# 7. Lease-less appends ---------------------------------------------------------------------


def test_lease_less_appends_wait_for_the_prompt_turn_and_land_after_it(
    base: Base, driver_factory: MakeDriver, root: Path
) -> None:
    d = driver_factory(base[1])
    turn, x, y = d.open_lane("turn"), d.open_lane("x"), d.open_lane("y")
    path = root / "s.jsonl"
    held = grant(d, turn, path)
    appended(d, turn, held, {"who": "turn", "n": 1})

    rx = d.send(x, Append(lane="x", path=str(path), records=[{"who": "x"}]))
    eventually(
        lambda: len(d.status(str(path)).files[0].queue) == 1,
        "x's write to queue",
        timeout=EVENT_TIMEOUT_S,
    )
    ry = d.send(y, Append(lane="y", path=str(path), records=[{"who": "y", "n": 1}, {"n": 2}]))
    eventually(
        lambda: len(d.status(str(path)).files[0].queue) == 2,
        "y's write to queue behind it",
        timeout=EVENT_TIMEOUT_S,
    )
    queued = d.status(str(path)).files[0].queue
    assert [(q.lane, q.purpose) for q in queued] == [("x", "write"), ("y", "write")]

    # The holder's own lease-less append writes under its lease at once (reentrancy).
    own = d.call(turn, Append(lane="turn", path=str(path), records=[{"who": "turn", "n": 2}]))
    assert isinstance(own, Appended) and own.fence == held.fence
    appended(d, turn, held, {"who": "turn", "n": 3})
    assert d.events(x, "appended") == [] and d.events(y, "appended") == []
    assert d.events(x, "queued") == [] and d.events(y, "queued") == []  # one answer each
    release(d, turn, held)  # still held once after the nested write: this frees it

    after_x = d.reply_to(x, rx, EVENT_TIMEOUT_S)
    after_y = d.reply_to(y, ry, EVENT_TIMEOUT_S)
    assert isinstance(after_x, Appended) and isinstance(after_y, Appended)
    assert held.fence < after_x.fence < after_y.fence
    assert records(path) == [
        {"who": "turn", "n": 1},
        {"who": "turn", "n": 2},
        {"who": "turn", "n": 3},
        {"who": "x"},
        {"who": "y", "n": 1},
        {"n": 2},
    ]
    [status] = d.status(str(path)).files
    assert status.holder is None and status.queue == []


def test_a_lane_that_asks_again_for_a_path_it_holds_gets_the_same_lease_nested(
    base: Base, driver_factory: MakeDriver, root: Path
) -> None:
    d = driver_factory(base[1])
    a, b = d.open_lane("a"), d.open_lane("b")
    path = root / "s.jsonl"
    outer = grant(d, a, path)
    inner = grant(d, a, path, purpose="write")
    assert (inner.lease, inner.fence) == (outer.lease, outer.fence)
    waiting = queue(d, b, path, position=1)

    release(d, a, inner)  # one level: still held
    appended(d, a, outer, {"still": "held"})
    assert d.events(b, "granted") == []
    release(d, a, outer)
    assert granted_later(d, b, waiting).fence > outer.fence


# 8. Refusals ------------------------------------------------------------------------------


def test_an_invalid_record_refuses_the_whole_batch_and_writes_nothing(
    base: Base, driver_factory: MakeDriver, root: Path
) -> None:
    d = driver_factory(base[1], max_record_bytes=64)
    a, b = d.open_lane("a"), d.open_lane("b")
    path = root / "s.jsonl"
    held = grant(d, a, path)
    appended(d, a, held, {"ok": 0})
    before = path.read_bytes()

    ok = {"ok": 1}
    not_an_object = Append.model_construct(
        v=1, type="append", id=None, lease=held.lease, fence=held.fence, records=[ok, "text"]
    )
    batches: list[Any] = [
        not_an_object,
        Append(lease=held.lease, fence=held.fence, records=[ok, {"x": math.nan}]),
        Append(lease=held.lease, fence=held.fence, records=[ok, {"big": "x" * 64}]),
        Append(lease=held.lease, fence=held.fence, records=[]),
    ]
    for batch in batches:
        error = refused(d.call(a, batch), "invalid_record")
        assert error.path == canonical(path)
    # Lease-less: refused up front, even though the path is held (no wait, no queue entry).
    lease_less = Append(lane="b", path=str(path), records=[ok, ok, {"x": math.inf}])
    refused(d.call(b, lease_less), "invalid_record")

    assert path.read_bytes() == before
    [status] = d.status(str(path)).files
    # The record that is no object never reached the file: the lane refused the unvalidated
    # model as the gateway refuses such a frame; the file counted the other four.
    assert status.queue == [] and status.counters["invalid_records"] == 4
    appended(d, a, held, ok)  # the lease is unharmed
    assert records(path) == [{"ok": 0}, ok]


def test_paths_outside_the_root_or_not_naming_a_transcript_are_refused_and_nothing_is_created(
    base: Base, driver_factory: MakeDriver, root: Path, tmp_path: Path
) -> None:
    d = driver_factory(base[1])
    a = d.open_lane("a")
    outside = tmp_path / "outside.jsonl"
    outside.write_bytes(b'{"mine": true}\n')
    (root / "dir.jsonl").mkdir()
    (root / "escape.jsonl").symlink_to(outside)
    bad = [
        str(tmp_path / "elsewhere.jsonl"),  # outside the root
        f"{root}/../escaped.jsonl",  # .. escape, absolute
        "../escaped.jsonl",  # .. escape, relative to the root
        str(root / "notes.txt"),  # wrong suffix
        str(root / "dir.jsonl"),  # a directory
        str(root / "escape.jsonl"),  # a symlink out of the root
        str(root / "missing" / "s.jsonl"),  # no such directory
    ]

    def snapshot() -> dict[str, bytes | None]:
        return {
            str(p): None if p.is_dir() else p.read_bytes()
            for p in sorted(tmp_path.rglob("*"))
            if not p.name.endswith(".log")
        }

    before = snapshot()
    for path in bad:
        for request in (
            Acquire(lane="a", path=path, purpose="prompt"),
            Append(lane="a", path=path, records=[{"x": 1}]),
            Recover(lane="a", path=path, reason="stuck", grace_ms=0),
        ):
            error = refused(d.call(a, request), "path_not_allowed")
            assert error.path == path
    assert snapshot() == before
    assert d.status().files == []
