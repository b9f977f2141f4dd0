"""The SessionFile's write path alone: ``WritePath`` on a real transcript, without an actor.

Each test drives the part the way the actor does (accept, then drain one write at a time) and
checks the effects it returns, in order, and the file on disk. The write path holds no lease
table: the rig performs its table requests on one (``CheckLease``, ``AskWriteLease``,
``ReleaseWriteLease``) as the core does. Time is a plain number, the table's only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sessionlane.actors.group_commit import CommitPolicy
from sessionlane.actors.histogram import FileMetrics
from sessionlane.actors.lease_table import (
    Effect,
    Grant,
    LeasePolicy,
    LeaseTable,
    Released,
    ReserveFences,
)
from sessionlane.actors.legacy_lock import LegacyLock
from sessionlane.actors.openclaw_lock import encode_lock_payload, lock_path
from sessionlane.actors.session_file_commit import TranscriptSync
from sessionlane.actors.session_file_disk import FileDisk
from sessionlane.actors.session_file_writes import (
    AskWriteLease,
    CheckLease,
    Commit,
    Notify,
    ReleaseLegacyLock,
    ReleaseWriteLease,
    Reply,
    Sync,
    WriteEffect,
    WriteOut,
    WritePath,
    Wrote,
    call_key,
)
from sessionlane.actors.transcript import Transcript
from sessionlane.messages.internal import LaneCall, LaneRef
from sessionlane.messages.wire import Append, Appended, Error, ExternalChange, Rewrite, Rewritten


class Rig:
    """A write path over a real transcript, the lease table it asks, a clock that stands still."""

    def __init__(self, path: Path, *, legacy: bool = False, tail_unchecked: bool = False):
        self.path = str(path)
        self.now = 1000.0
        self.transcript = Transcript(self.path)
        self.transcript.open(repair=not tail_unchecked)
        self.table = LeaseTable(self.path, LeasePolicy(), fence_floor=0)
        self.sync = TranscriptSync(self.path, CommitPolicy(), FileMetrics())
        lock = LegacyLock(self.path) if legacy else None
        self.disk = FileDisk(self.path, self.transcript, self.sync, lock, lambda: self.now)
        self.writes = WritePath(
            self.path,
            legacy=legacy,
            tail_unchecked=tail_unchecked,
            durability="fsync",
            max_record_bytes=200,
            unsynced=lambda: self.sync.unsynced,
        )
        self.ids = 0
        self.told: dict[Any, list[Effect]] = {}
        """The table's answer to each ``AskWriteLease`` and ``ReleaseWriteLease`` performed."""

    def call(self, lane: str, request: Any) -> LaneCall:
        self.ids += 1
        ref = LaneRef(uid=lane, name=lane, address=f"lane:{lane}")
        request = request.model_copy(update={"id": self.ids})
        return LaneCall(lane=ref, path=self.path, canonical=True, request=request)

    def grant(self, lane: str, purpose: Any = "write") -> Grant:
        effects = self.table.acquire((lane, "acquire"), lane, purpose, self.now)
        grant = effects[-1]
        assert isinstance(grant, Grant)
        return grant

    def accept(self, call: LaneCall) -> list[WriteEffect]:
        """Hand ``call`` (an append or a rewrite) to the write path, its lease checked."""
        request = call.request
        if isinstance(request, Rewrite):
            return self.perform(self.writes.rewrite(call, request))
        if request.lease is None:
            return self.perform(self.writes.append_without_lease(call, request))
        return self.perform(self.writes.append_under_lease(call, request))

    def drain(self) -> list[WriteEffect]:
        """Perform the queue as the actor does; a grant of a queued lease-less append joins.

        The disk effects are performed here, as the actor's ``FileDisk`` does, and the table
        requests as the core does; the others are returned, in order."""
        lease = self.writes.lock_for()
        lock = self.disk.take_legacy(lease) if lease is not None else True
        not_now = self.writes.begin_drain(lock)
        if not_now is not None:
            return self.perform(not_now)
        done: list[WriteEffect] = []
        while (effects := self.writes.next_write()) is not None:
            done += self.perform(effects)
        return done + self.perform(self.writes.end_drain())

    def perform(self, effects: list[WriteEffect]) -> list[WriteEffect]:
        """Do the disk effects and the checks; the rest (and what the writes led to) in order.

        A short write lease asked for or released stays in the list (the table's answer in
        ``told``); a check is answered with the table's verdict and leaves what that led to."""
        left: list[WriteEffect] = []
        for fx in effects:
            if isinstance(fx, WriteOut):
                fsync = fx.op.kind == "append" and fx.op.durability == "fsync"
                outcome = self.disk.write(fx.op.kind, fx.data, fsync, fx.repair_tail)
                left += self.perform(self.writes.written(fx.op, outcome, fx.rest))
            elif isinstance(fx, Sync):
                self.disk.sync_now()
            elif isinstance(fx, ReleaseLegacyLock):
                self.disk.release_legacy()
            elif isinstance(fx, CheckLease):
                lane = fx.call.lane.uid
                verdict = self.table.check_write(lane, fx.lease, fx.fence, purpose=fx.purpose)
                left += self.perform(self.writes.checked(fx, verdict))
            else:
                if isinstance(fx, AskWriteLease | ReleaseWriteLease):
                    self.grant_pending(self.table_request(fx))
                left.append(fx)
        return left

    def table_request(self, fx: AskWriteLease | ReleaseWriteLease) -> list[Effect]:
        """A short write lease asked for or released, on the table (as the core does)."""
        if isinstance(fx, AskWriteLease):
            answer = self.table.acquire(fx.req, fx.lane, "write", self.now, priority=fx.priority)
        else:
            answer = self.table.release(fx.req, fx.lane, fx.lease, self.now)
        self.told[fx] = answer
        return answer

    def grant_pending(self, effects: list[Any]) -> None:
        for fx in effects:
            if isinstance(fx, Grant) and self.writes.is_pending(fx.req):
                self.writes.granted(fx.req, fx.lease, fx.fence)

    def lines(self) -> list[Any]:
        return [json.loads(line) for line in Path(self.path).read_bytes().splitlines()]

    def close(self) -> None:
        self.transcript.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path / "t.jsonl")
    try:
        yield made
    finally:
        made.close()


def replies(effects: list[WriteEffect]) -> list[Any]:
    return [fx.message for fx in effects if isinstance(fx, Reply)]


def test_an_append_under_the_current_lease_is_written_then_acknowledged_once_synced(
    rig: Rig,
) -> None:
    grant = rig.grant("a")
    call = rig.call("a", Append(lease=grant.lease, fence=grant.fence, records=[{"n": 1}]))
    assert rig.accept(call) == []  # queued, not yet written
    assert rig.lines() == []
    effects = rig.drain()
    assert effects[0] == Wrote("a")
    [reply] = [fx for fx in effects if isinstance(fx, Reply)]
    assert isinstance(reply.message, Appended) and reply.needs_sync
    assert rig.lines() == [{"n": 1}]
    assert rig.sync.unsynced  # the actor's commit syncs it before the ack leaves


def test_an_append_with_a_stale_fence_is_refused_and_writes_nothing(rig: Rig) -> None:
    grant = rig.grant("a")
    call = rig.call("a", Append(lease=grant.lease, fence=grant.fence + 1, records=[{"n": 1}]))
    [refusal] = rig.accept(call)
    assert isinstance(refusal, Reply) and isinstance(refusal.message, Error)
    assert refusal.message.code == "stale_fence"
    assert not rig.writes.may_drain() and rig.lines() == []


def test_a_queued_write_whose_lease_was_released_meanwhile_is_refused_when_performed(
    rig: Rig,
) -> None:
    grant = rig.grant("a")
    call = rig.call("a", Append(lease=grant.lease, fence=grant.fence, records=[{"n": 1}]))
    rig.accept(call)
    rig.table.release(("a", "release"), "a", grant.lease, rig.now)
    [error] = replies(rig.drain())
    assert isinstance(error, Error) and error.code == "stale_fence"
    assert rig.lines() == []


def test_a_redelivered_append_is_answered_with_its_first_reply_and_written_once(
    rig: Rig,
) -> None:
    grant = rig.grant("a")
    call = rig.call("a", Append(lease=grant.lease, fence=grant.fence, records=[{"n": 1}]))
    rig.accept(call)
    [first] = replies(rig.drain())
    [again] = rig.accept(call)
    assert again == Reply(call, first)
    assert not rig.writes.may_drain()
    assert rig.lines() == [{"n": 1}] and rig.writes.counters["duplicates"] == 1


def test_a_forgotten_acknowledgement_makes_a_redelivered_append_write_again(rig: Rig) -> None:
    grant = rig.grant("a")
    call = rig.call("a", Append(lease=grant.lease, fence=grant.fence, records=[{"n": 1}]))
    rig.accept(call)
    rig.drain()
    rig.writes.forget(call_key(call))  # its sync failed: the ack became an error
    assert rig.accept(call) == []
    rig.drain()
    assert rig.lines() == [{"n": 1}, {"n": 1}]


def test_records_too_large_are_refused_before_anything_is_queued(rig: Rig) -> None:
    grant = rig.grant("a")
    records = [{"pad": "x" * 300}]
    call = rig.call("a", Append(lease=grant.lease, fence=grant.fence, records=records))
    [refusal] = rig.accept(call)
    assert isinstance(refusal, Reply) and isinstance(refusal.message, Error)
    assert rig.writes.counters["invalid_records"] == 1 and not rig.writes.may_drain()


def test_a_lease_less_append_takes_a_short_write_lease_and_releases_it_silently_once_written(
    rig: Rig,
) -> None:
    call = rig.call("a", Append(lane="a", path=rig.path, records=[{"n": 1}, {"n": 2}]))
    [asked] = rig.writes.append_without_lease(call, call.request)
    assert asked == AskWriteLease(call_key(call), "a", call.lane.priority)
    assert rig.writes.is_pending(call_key(call))
    assert rig.perform([asked]) == [asked]  # the table answers it (``told``)
    assert [type(fx) for fx in rig.told[asked]] == [ReserveFences, Grant]
    effects = rig.drain()
    assert [type(fx) for fx in effects] == [Wrote, ReleaseWriteLease, Reply]
    release = effects[1]
    assert isinstance(release, ReleaseWriteLease) and release.lease == rig.told[asked][-1].lease
    [released] = rig.told[release]
    assert isinstance(released, Released) and rig.writes.released_silently(released.req)
    assert rig.table.holder is None
    assert isinstance(replies(effects)[0], Appended) and rig.lines() == [{"n": 1}, {"n": 2}]


def test_a_lease_less_append_waits_behind_a_held_lease_and_joins_the_drain_that_frees_it(
    rig: Rig,
) -> None:
    first = rig.call("a", Append(lane="a", path=rig.path, records=[{"lane": "a"}]))
    second = rig.call("b", Append(lane="b", path=rig.path, records=[{"lane": "b"}]))
    [asked_a] = rig.accept(first)
    assert isinstance(asked_a, AskWriteLease) and isinstance(rig.told[asked_a][-1], Grant)
    [asked_b] = rig.accept(second)
    assert isinstance(asked_b, AskWriteLease) and not any(
        isinstance(fx, Grant) for fx in rig.told[asked_b]
    )  # b waits for a's short lease
    effects = rig.drain()  # a's release grants b, which is written in the same drain
    assert rig.lines() == [{"lane": "a"}, {"lane": "b"}]
    assert [type(m) for m in replies(effects)] == [Appended, Appended]


def test_a_rewrite_syncs_what_was_appended_before_it_replaces_the_file(rig: Rig) -> None:
    grant = rig.grant("a", "compaction")
    call = rig.call("a", Append(lease=grant.lease, fence=grant.fence, records=[{"n": 1}]))
    rig.accept(call)
    rig.drain()
    assert rig.sync.unsynced and rig.transcript.sync_count == 0
    rewrite = Rewrite(lease=grant.lease, fence=grant.fence, records=[{"compacted": True}])
    call = rig.call("a", rewrite)
    assert rig.accept(call) == []
    [done] = replies(rig.drain())
    assert isinstance(done, Rewritten) and rig.transcript.sync_count >= 1
    assert not rig.sync.unsynced and rig.lines() == [{"compacted": True}]


def test_an_append_outside_sessionlane_is_adopted_and_the_holder_told(rig: Rig) -> None:
    grant = rig.grant("a")
    with open(rig.path, "a") as f:
        f.write(json.dumps({"outside": 1}) + "\n")
    call = rig.call("a", Append(lease=grant.lease, fence=grant.fence, records=[{"n": 1}]))
    rig.accept(call)
    effects = rig.drain()
    [notify] = [fx for fx in effects if isinstance(fx, Notify)]
    event = notify.message.message
    assert notify.lane == "a" and isinstance(event, ExternalChange) and event.kind == "append"
    assert rig.lines() == [{"outside": 1}, {"n": 1}]
    assert rig.writes.counters["external_changes"] == 1


def test_writes_failed_on_exit_are_answered_and_their_short_leases_released(rig: Rig) -> None:
    call = rig.call("a", Append(lane="a", path=rig.path, records=[{"n": 1}]))
    [asked] = rig.accept(call)
    assert isinstance(asked, AskWriteLease) and rig.writes.queue  # granted: queued
    effects = rig.perform(rig.writes.fail_queued("unavailable", "the file's actor is exiting"))
    assert [type(fx) for fx in effects] == [ReleaseWriteLease, Reply]
    [error] = replies(effects)
    assert isinstance(error, Error) and error.code == "unavailable"
    assert rig.table.holder is None and rig.lines() == []


# Legacy interop -----------------------------------------------------------------------------


def hold_legacy_lock(transcript: str) -> Path:
    """A live legacy writer (this process) holds ``<file>.lock``."""
    lock = Path(lock_path(transcript))
    lock.write_text(encode_lock_payload(os.getpid(), int(time.time() * 1000)))
    return lock


def test_a_live_legacy_holder_keeps_writes_queued_and_retries_back_off(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "t.jsonl", legacy=True)
    try:
        lock = hold_legacy_lock(rig.path)
        grant = rig.grant("a")
        call = rig.call("a", Append(lease=grant.lease, fence=grant.fence, records=[{"n": 1}]))
        rig.accept(call)
        assert rig.drain() == [] and rig.lines() == []
        assert rig.writes.retry_after() == pytest.approx(0.002)
        assert rig.writes.retry_after() is None  # one retry armed at a time
        rig.writes.retry_due()
        assert rig.drain() == [] and rig.writes.retry_after() == pytest.approx(0.004)
        assert rig.writes.counters["legacy_lock_waits"] == 2
        lock.unlink()
        rig.writes.retry_due()
        effects = rig.drain()
        assert effects[-1] == Commit()  # synced under the lock: the actor commits at once
        assert rig.lines() == [{"n": 1}] and not rig.sync.unsynced and not lock.exists()
    finally:
        rig.close()


def test_an_append_delivered_again_while_it_waits_for_a_legacy_writer_is_written_once(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path / "t.jsonl", legacy=True)
    try:
        lock = hold_legacy_lock(rig.path)
        grant = rig.grant("a")
        call = rig.call("a", Append(lease=grant.lease, fence=grant.fence, records=[{"n": 1}]))
        rig.accept(call)
        assert rig.drain() == []  # the legacy writer holds the lock: queued
        again = call.model_copy(update={"lane": call.lane.model_copy(update={"address": "x"})})
        assert rig.accept(again) == []  # waits for the first
        assert len(rig.writes.queue) == 1 and rig.writes.counters["duplicates"] == 1
        lock.unlink()
        rig.writes.retry_due()
        effects = rig.drain()
        first, second = (fx for fx in effects if isinstance(fx, Reply))
        assert first.call == call and second.call == again  # each delivery answered, in order
        assert first.message == second.message and isinstance(first.message, Appended)
        assert first.needs_sync and second.needs_sync
        assert rig.lines() == [{"n": 1}]
        [third] = rig.accept(call)  # and after it: its reply
        assert third == Reply(call, first.message)
    finally:
        rig.close()


def test_a_lease_less_append_delivered_again_while_it_waits_for_its_lease_is_written_once(
    rig: Rig,
) -> None:
    grant = rig.grant("a")
    call = rig.call("w", Append(lane="w", path=rig.path, records=[{"n": 1}]))
    [queued] = rig.accept(call)
    assert isinstance(queued, AskWriteLease) and rig.writes.is_pending(call_key(call))
    assert rig.accept(call) == []
    release = rig.table.release(("a", "release"), "a", grant.lease, rig.now)
    rig.grant_pending(release)
    effects = rig.drain()
    assert [fx.call for fx in effects if isinstance(fx, Reply)] == [call, call]
    assert rig.lines() == [{"n": 1}]


def test_a_torn_tail_left_at_activation_is_repaired_by_the_first_write_under_the_lock(
    tmp_path: Path,
) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"whole": 1}\n{"torn"')
    rig = Rig(path, legacy=True, tail_unchecked=True)
    try:
        grant = rig.grant("a")
        call = rig.call("a", Append(lease=grant.lease, fence=grant.fence, records=[{"n": 1}]))
        rig.accept(call)
        rig.drain()
        assert rig.lines() == [{"whole": 1}, {"n": 1}]
        assert Path(f"{path}.torn").read_bytes().startswith(b'{"torn"')
    finally:
        rig.close()
