"""Durability: acknowledged means durable, group commit shares fdatasyncs, SIGKILL loses nothing.

Three layers: ``CommitPolicy`` alone with a fake clock; the SessionFile shell driven by hand
(its thespian ``send`` and ``wakeupAfter`` replaced by recorders, the transport's end of pass
delivered as a ``WatchMessage``), so the order of syncs and acknowledgements is observed
exactly; and a real service with concurrent client connections, counting fdatasyncs through
``status``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from driver import file_settings
from thespian.actors import ThespianWatch, WakeupMessage, WatchMessage

from sessionlane.actors import session_file
from sessionlane.actors.carried import split_frames
from sessionlane.actors.group_commit import CommitPolicy
from sessionlane.actors.session_file import SessionFile
from sessionlane.actors.session_file_serving import Serving
from sessionlane.actors.timers import CommitDue
from sessionlane.messages.carried import CarriedCalls, CarriedReplies
from sessionlane.messages.channel import ChannelReply, call_frame, decode_from_file, hello_frame
from sessionlane.messages.internal import FileInit
from sessionlane.messages.wire import Acquire, Append, Error, Granted, Release, Released
from sessionlane.system.client import connect
from sessionlane.system.runtime.service import embedded_service

# The pure policy ---------------------------------------------------------------------------


def test_a_lone_writer_is_synced_at_the_end_of_its_pass() -> None:
    policy = CommitPolicy()
    policy.wrote("a", 0.0)
    policy.begin_pass()
    assert policy.decide(0.1, others_may_write=True) == "sync"


def test_a_batch_that_grew_during_the_pass_gets_another_pass() -> None:
    policy = CommitPolicy()
    policy.wrote("a", 0.0)
    policy.begin_pass()
    policy.wrote("b", 0.2)
    assert policy.decide(0.3, others_may_write=True) == "pass"


def test_a_batch_waits_for_a_recently_active_sibling_until_its_deadline() -> None:
    policy = CommitPolicy(min_wait_ms=1.0, max_wait_ms=25.0)
    for t, lane in [(0.0, "a"), (2.0, "b")]:  # both active; gap 2 ms
        policy.wrote(lane, t)
    policy.committed()
    policy.wrote("a", 10.0)
    policy.begin_pass()
    assert policy.decide(10.1, others_may_write=True) == "wait"
    assert 10.0 + 1.0 <= policy.deadline() <= 10.0 + 25.0
    assert policy.decide(policy.deadline(), others_may_write=True) == "sync"
    # ... and a sibling that joins ends the wait: nobody else is expected.
    policy.wrote("b", 10.5)
    policy.begin_pass()
    assert policy.decide(10.6, others_may_write=True) == "sync"


def test_no_wait_when_only_the_holder_can_write_or_siblings_went_quiet() -> None:
    policy = CommitPolicy(sibling_ms=100.0)
    policy.wrote("b", 0.0)
    policy.committed()
    policy.wrote("a", 50.0)
    policy.begin_pass()
    assert policy.decide(50.1, others_may_write=False) == "sync"
    policy.committed()
    policy.wrote("a", 150.0)
    policy.begin_pass()
    assert policy.decide(150.1, others_may_write=True) == "sync"  # b last wrote 150 ms ago


def test_a_batch_never_waits_longer_than_a_sync_takes() -> None:
    policy = CommitPolicy(sibling_ms=100.0)
    policy.wrote("b", 0.0)
    policy.committed()
    for _ in range(20):
        policy.synced(4.0)  # a disk that syncs in 4 ms
    policy.wrote("a", 10.0)
    policy.begin_pass()
    assert policy.decide(10.1, others_may_write=True) == "wait"
    assert policy.deadline() <= 10.0 + 4.0 + 0.1
    policy.committed()
    for _ in range(20):
        policy.synced(0.2)  # a disk that syncs faster than the shortest wait: never wait
    policy.wrote("a", 20.0)
    policy.begin_pass()
    assert policy.decide(20.1, others_may_write=True) == "sync"


def test_a_batch_is_bounded_in_age_and_size() -> None:
    policy = CommitPolicy(max_batch_ms=50.0, max_writes=3)
    policy.wrote("x", 0.0)
    policy.committed()
    policy.wrote("a", 0.0)
    policy.wrote("b", 1.0)
    policy.begin_pass()
    policy.wrote("c", 2.0)
    assert policy.decide(2.1, others_may_write=True) == "sync"  # three writes
    policy.committed()
    policy.wrote("a", 100.0)
    policy.begin_pass()
    policy.wrote("b", 149.0)
    assert policy.decide(150.0, others_may_write=True) == "sync"  # 50 ms old


# The SessionFile shell, driven by hand -----------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class Shell:
    """One SessionFile instance outside any actor system; records what it does, in order."""

    def __init__(self, path: Path, clock: Clock, **settings: Any) -> None:
        self.path = str(path)
        self.clock = clock
        self.events: list[tuple[str, Any]] = []
        self.wakeups: list[tuple[float, Any]] = []
        self.actor = SessionFile({"Thespian Watch Supported": True})
        self.actor.send = self._send
        self.actor.wakeupAfter = lambda delay, payload=None: self.wakeups.append((delay, payload))
        init = FileInit(path=self.path, settings=file_settings(**settings), incarnation=1)
        self.deliver(init, sender="registry")
        real_sync = self.serving.transcript.sync

        def sync(durability: Any) -> None:
            real_sync(durability)
            if durability == "fsync":
                self.events.append(("sync", None))

        self.serving.transcript.sync = sync  # type: ignore[method-assign]
        self.ids = 0
        self.greeted: set[str] = set()

    @property
    def serving(self) -> Serving:
        """The actor's state once its file is open (what ``FileInit`` built)."""
        state = self.actor.state
        assert isinstance(state, Serving)
        return state

    def _send(self, address: Any, message: Any) -> None:
        if isinstance(message, CarriedReplies):
            for body in split_frames(message.frames):
                frame = decode_from_file(body)
                if isinstance(frame, ChannelReply):
                    self.events.append((address, frame.message))

    def deliver(self, message: Any, sender: Any = "registry") -> ThespianWatch | None:
        result: ThespianWatch | None = self.actor.receiveMessage(message, sender)
        return result

    def call(self, lane: str, request: Any) -> ThespianWatch | None:
        """``request`` from ``lane``, over a carried channel of its own (hello first)."""
        self.ids += 1
        request = request.model_copy(update={"id": self.ids})
        frames = call_frame(lane, lane, "interactive", request)
        if lane not in self.greeted:
            self.greeted.add(lane)
            frames = hello_frame(self.serving.channels.carried.token) + frames
        return self.deliver(CarriedCalls(self.path, frames), sender=f"lane:{lane}")

    def append(self, lane: str, n: int = 1, **kw: Any) -> ThespianWatch | None:
        records = [{"lane": lane, "n": i} for i in range(n)]
        return self.call(lane, Append(lane=lane, path=self.path, records=records, **kw))

    def end_of_pass(self) -> ThespianWatch | None:
        return self.deliver(WatchMessage([self.serving.ready_fd]), sender=None)

    def settle(self) -> None:
        """Passes with nothing new until the batch is synced (or waits for a sibling)."""
        for _ in range(10):
            if self.end_of_pass() is None:
                return
        raise AssertionError("the batch never settled")

    def sent(self) -> list[tuple[str, str]]:
        """What happened, as (who, what): ("sync", "") or (lane address, reply type)."""
        return [(who, "" if what is None else what.type) for who, what in self.events]

    def close(self) -> None:
        from thespian.actors import ActorExitRequest

        self.actor.receiveMessage(ActorExitRequest(), "registry")


@pytest.fixture
def shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shell]:
    clock = Clock()
    monkeypatch.setattr(session_file, "monotonic_ms", clock)
    made = Shell(tmp_path / "t.jsonl", clock)
    try:
        yield made
    finally:
        made.close()


def test_an_append_is_acknowledged_only_after_the_fdatasync_that_covers_it(shell: Shell) -> None:
    watch = shell.append("a")
    assert isinstance(watch, ThespianWatch) and watch.filenos == [shell.serving.ready_fd]
    assert shell.sent() == []  # written, not acknowledged: the reply waits for the pass end
    assert Path(shell.path).read_bytes().count(b"\n") == 1
    assert shell.end_of_pass() is None
    assert shell.sent() == [("sync", ""), ("lane:a", "appended")]


def test_appends_that_arrive_together_share_one_fdatasync(shell: Shell) -> None:
    shell.append("a")
    shell.append("b")
    assert isinstance(shell.end_of_pass(), ThespianWatch)  # it grew: one more pass...
    shell.append("c")
    assert isinstance(shell.end_of_pass(), ThespianWatch)  # ... and another...
    assert shell.end_of_pass() is None  # ... until a pass brings nothing new
    assert shell.sent() == [
        ("sync", ""),
        ("lane:a", "appended"),
        ("lane:b", "appended"),
        ("lane:c", "appended"),
    ]


def test_a_batch_waits_for_an_active_sibling_and_commits_when_it_joins(shell: Shell) -> None:
    shell.append("a")
    shell.append("b")
    shell.settle()
    shell.events.clear()
    shell.clock.now += 5.0
    shell.append("a")
    assert shell.end_of_pass() is None  # b is expected: no watch, a timer instead
    assert shell.sent() == []
    assert isinstance(shell.wakeups[-1][1], CommitDue)
    shell.clock.now += 1.0
    assert isinstance(shell.append("b"), ThespianWatch)  # b joined: one more pass...
    assert shell.end_of_pass() is None  # ... then one sync for both
    assert shell.sent() == [("sync", ""), ("lane:a", "appended"), ("lane:b", "appended")]


def test_a_waiting_batch_is_synced_when_its_commit_timer_fires(shell: Shell) -> None:
    shell.append("a")
    shell.append("b")
    shell.settle()
    shell.events.clear()
    shell.append("a")
    assert shell.end_of_pass() is None
    delay, payload = shell.wakeups[-1]
    assert isinstance(payload, CommitDue) and shell.sent() == []
    shell.clock.now += delay * 1000.0
    shell.deliver(WakeupMessage(delay, payload), sender=None)
    assert shell.sent() == [("sync", ""), ("lane:a", "appended")]


def test_a_batch_under_a_held_write_lease_never_waits_for_lanes_queued_behind_it(
    shell: Shell,
) -> None:
    # a and b both wrote recently: each is the other's expected sibling...
    shell.append("a")
    shell.append("b")
    shell.settle()
    shell.events.clear()
    # ... but now a holds a write lease it asked for: b can only queue until a releases,
    # and a releases only once its append is acknowledged. Waiting for b would stall both.
    shell.call("a", Acquire(lane="a", path=shell.path, purpose="write"))
    granted = shell.events[-1][1]
    assert isinstance(granted, Granted)
    shell.call("a", Append(lease=granted.lease, fence=granted.fence, records=[{"x": 1}]))
    assert shell.end_of_pass() is None
    assert shell.sent()[-2:] == [("sync", ""), ("lane:a", "appended")]
    assert not [w for w in shell.wakeups if isinstance(w[1], CommitDue)]


def test_every_message_to_a_lane_queues_behind_its_held_acknowledgement(shell: Shell) -> None:
    shell.call("a", Acquire(lane="a", path=shell.path, purpose="prompt"))
    granted = shell.events[-1][1]
    assert isinstance(granted, Granted)
    shell.call("a", Append(lease=granted.lease, fence=granted.fence, records=[{"x": 1}]))
    shell.call("a", Release(lease=granted.lease))
    shell.call("b", Acquire(lane="b", path=shell.path, purpose="prompt"))
    # b has nothing held: its grant goes out at once; a's release waits behind its append.
    assert shell.sent()[-1] == ("lane:b", "granted")
    assert ("lane:a", "released") not in shell.sent()
    shell.end_of_pass()
    assert shell.sent()[-3:] == [("sync", ""), ("lane:a", "appended"), ("lane:a", "released")]
    held_after = [m for who, m in shell.events if who == "lane:a"]
    assert isinstance(held_after[-1], Released)


def test_a_flush_append_is_acknowledged_at_once_without_fdatasync(shell: Shell) -> None:
    assert shell.append("a", durability="flush") is None
    assert shell.sent() == [("lane:a", "appended")]
    assert shell.serving.transcript.sync_count == 0


def test_a_failed_fdatasync_turns_the_held_acknowledgements_into_errors(shell: Shell) -> None:
    def broken(durability: Any) -> None:
        raise OSError(5, "Input/output error")

    shell.serving.transcript.sync = broken  # type: ignore[method-assign]
    shell.append("a")
    shell.end_of_pass()
    (who, reply), *_ = shell.events
    assert who == "lane:a" and isinstance(reply, Error) and reply.code == "io_error"
    assert "fdatasync failed" in reply.detail


# The real service --------------------------------------------------------------------------


def stream_appends(address: str, path: str, writers: int, per_writer: int) -> list[Any]:
    """``writers`` connections append concurrently, lease-less; returns every acknowledgement."""
    acks: list[Any] = []
    lock = threading.Lock()
    start = threading.Barrier(writers)
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            with connect(address) as sl:
                lane = sl.lane(f"writer-{w}")
                start.wait(timeout=60)
                for i in range(per_writer):
                    result = lane.append(path, {"w": w, "i": i, "pad": "x" * 64})
                    with lock:
                        acks.append((w, i, result))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return acks


def counters(address: str, path: str) -> dict[str, int]:
    with connect(address) as sl:
        (status,) = sl.status(path).files
    return dict(status.counters)


@pytest.mark.tcp
@pytest.mark.slow
@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "sync-per-append"])
def test_eight_concurrent_writers_share_fdatasyncs(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group_commit: bool
) -> None:
    # The actor processes are forked from this one when the service starts: they inherit it.
    monkeypatch.setattr(SessionFile, "group_commit", group_commit)
    path = str(root / "eight.jsonl")
    writers, per_writer = 8, 40
    with embedded_service([str(root)], log_file=tmp_path / "svc.log") as svc:
        began = time.monotonic()
        acks = stream_appends(svc.address, path, writers, per_writer)
        elapsed = time.monotonic() - began
        c = counters(svc.address, path)
    appends = writers * per_writer
    assert len(acks) == appends and c["appends"] == appends
    print(
        f"\n{'group commit' if group_commit else 'sync per append'}: {writers} writers, "
        f"{appends} appends, {appends / elapsed:.0f} records/s, "
        f"{c['syncs'] / appends:.2f} fdatasyncs per append"
    )
    if group_commit:
        assert c["syncs"] <= appends // 2, c
    else:
        assert c["syncs"] == appends, c
    lines = Path(path).read_bytes().splitlines(keepends=True)
    assert all(line.endswith(b"\n") for line in lines)
    found = {(r["w"], r["i"]) for r in map(json.loads, lines)}
    assert found == {(w, i) for w, i, _ in acks} and len(lines) == appends


@pytest.mark.tcp
def test_durability_flush_makes_no_fdatasync(root: Path, tmp_path: Path) -> None:
    flushed = str(root / "flush.jsonl")
    per_request = str(root / "per-request.jsonl")
    with embedded_service([str(root)], log_file=tmp_path / "a.log", durability="flush") as svc:
        with connect(svc.address) as sl:
            lane = sl.lane("flush")
            for i in range(10):
                lane.append(flushed, {"i": i})
        c = counters(svc.address, flushed)
    assert (c["appends"], c["syncs"]) == (10, 0)
    with embedded_service([str(root)], log_file=tmp_path / "b.log") as svc:
        with connect(svc.address) as sl:
            lane = sl.lane("flush")
            for i in range(10):
                lane.append(per_request, {"i": i}, durability="flush")
            lane.append(per_request, {"i": 10})
        c = counters(svc.address, per_request)
    assert (c["appends"], c["syncs"]) == (11, 1)


@pytest.mark.tcp
def test_an_acknowledged_append_survives_sigkill_of_the_whole_service(
    root: Path, tmp_path: Path
) -> None:
    path = str(root / "killed.jsonl")
    with embedded_service([str(root)], log_file=tmp_path / "svc.log") as svc:
        acks = stream_appends(svc.address, path, writers=3, per_writer=10)
        with connect(svc.address) as sl:
            lease = sl.lane("last").acquire(path, purpose="prompt")
            assert lease is not None
            last = lease.append({"w": "last", "i": 0})
            running = svc.running
            assert running is not None
            os.killpg(running.system.pgid, signal.SIGKILL)  # a crash, holding the lease
            deadline = time.monotonic() + 10
            while running.system.members() and time.monotonic() < deadline:
                time.sleep(0.01)  # dead before the service's own stop looks at it
    data = Path(path).read_bytes()
    offsets = {result.offset: (w, i) for w, i, result in acks}
    offsets[last.offset] = ("last", 0)
    for offset, (w, i) in offsets.items():
        line = data[offset : data.index(b"\n", offset)]
        assert json.loads(line)["w"] == w and json.loads(line)["i"] == i
