"""A Hypothesis stateful model of ``WritePath`` alone: no actor, no disk, a clock that is a number.

``WritePath`` decides and returns effects; here nothing performs them but this model: a
``WriteOut`` is answered with a drawn ``WriteOutcome`` (written, a disk error, moved, an
outside change adopted first), a ``Sync`` clears the model's "unsynced" flag, the legacy lock's
outcome is drawn too. The lease table is the real one: the model performs the write path's
table requests on it (``CheckLease``: the verdict goes back through ``checked``;
``AskWriteLease``, ``ReleaseWriteLease``: the short write lease of a lease-less append), as
the core does.
What is asserted, against a simple model of the requests and of the lease:

- every call is answered exactly once (a redelivery is a call of its own), and only through a
  ``Reply`` (its short lease's release is no answer);
- bytes go out (``WriteOut``) only under the holder's current lease and fence, and a rewrite
  only after a ``Sync`` whenever an fsync append is not synced yet;
- an append whose reply was ``Appended`` is never written again when it is delivered again (it
  gets its first reply), unless that acknowledgement was forgotten (its sync failed); a copy
  delivered while the first still waits (queued behind a legacy writer, or for its short write
  lease) is answered with the first's reply;
- an fsync ``Appended`` waits for a sync (``needs_sync``) and follows its ``Wrote``;
- with the legacy lock busy nothing is written; a drain that took it ends with ``Sync``,
  ``ReleaseLegacyLock``, ``Commit``; an unusable lock answers every queued write with its error;
- a lease-less append's short write lease is released once it is written or refused: after a
  drain no short lease is held.
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sessionlane.actors.lease_table import (
    Grant,
    LeasePolicy,
    LeaseTable,
    Reject,
    Released,
)
from sessionlane.actors.session_file_disk import WriteOutcome
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
from sessionlane.messages.internal import LaneCall, LaneRef
from sessionlane.messages.wire import Append, Appended, Error, Rewrite, Rewritten

_CI = os.environ.get("HYPOTHESIS_PROFILE") == "ci"
PATH = "/sessions/t.jsonl"
HOLDERS = ("a", "b")
WRITERS = ("c", "d")  # lease-less appends

OUTCOMES = st.sampled_from(["ok", "ok", "ok", "disk_full", "moved", "external"])


def outcome_of(kind: str, offset: int) -> WriteOutcome:
    if kind == "disk_full":
        return WriteOutcome(error=OSError(errno.ENOSPC, "No space left on device"))
    if kind == "moved":
        return WriteOutcome(offset=offset, moved=True)
    if kind == "external":
        return WriteOutcome(external="append", offset=offset)
    return WriteOutcome(offset=offset)


class WritePathModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1_000.0
        self.legacy = False
        self.table = LeaseTable(PATH, LeasePolicy(), fence_floor=0)
        self.unsynced = False
        self.writes = self.make_writes()
        self.ids = 0
        self.calls: dict[int, LaneCall] = {}  # request id -> the call (the latest delivery)
        self.answers: Counter[int] = Counter()  # delivery number -> replies
        self.deliveries = 0
        self.pending: dict[int, int] = {}  # delivery number -> request id, not answered yet
        self.by_delivery: dict[int, LaneCall] = {}
        self.acked: set[Any] = set()  # call keys answered Appended and not forgotten
        self.written: Counter[Any] = Counter()  # call key -> WriteOuts performed
        self.leases: dict[str, tuple[str, int]] = {}  # holder lane -> (lease, fence)
        self.outcomes: list[str] = []

    def make_writes(self) -> WritePath:
        return WritePath(
            PATH,
            legacy=self.legacy,
            tail_unchecked=False,
            durability="fsync",
            max_record_bytes=100,
            unsynced=lambda: self.unsynced,
        )

    # The lease, as lanes use it ------------------------------------------------------------

    @rule(lane=st.sampled_from(HOLDERS), compaction=st.sampled_from([True, True, False]))
    def acquire(self, lane: str, compaction: bool) -> None:
        purpose = "compaction" if compaction else "prompt"
        self.ids += 1
        effects = self.table.acquire(
            (lane, self.ids), lane, purpose, self.now, on_contention="skip"
        )
        self.table_effects(effects)

    @rule(lane=st.sampled_from(HOLDERS))
    def release(self, lane: str) -> None:
        if lane not in self.leases:
            return
        lease, _ = self.leases[lane]
        self.ids += 1
        self.table_effects(self.table.release((lane, self.ids), lane, lease, self.now))

    @rule(ms=st.integers(1, 50))
    def tick(self, ms: int) -> None:
        self.now += ms

    # Writes --------------------------------------------------------------------------------

    @rule(
        lane=st.sampled_from(HOLDERS),
        stale=st.sampled_from([False, False, True]),
        fsync=st.booleans(),
    )
    def append_under_lease(self, lane: str, stale: bool, fsync: bool) -> None:
        lease, fence = self.leases.get(lane, ("none-1", 1))
        request = Append(
            lease=lease,
            fence=fence + 1 if stale else fence,
            records=[{"n": self.ids}],
            durability="fsync" if fsync else "flush",
        )
        call = self.deliver(lane, request)
        self.answer(self.writes.append_under_lease(call, request))

    @rule(lane=st.sampled_from(WRITERS), too_big=st.booleans())
    def append_without_lease(self, lane: str, too_big: bool) -> None:
        records: list[Any] = [{"pad": "x" * 200}] if too_big else [{"n": self.ids}]
        request = Append(lane=lane, path=PATH, records=records)
        call = self.deliver(lane, request)
        self.answer(self.writes.append_without_lease(call, request))

    @rule(lane=st.sampled_from(HOLDERS))
    def rewrite(self, lane: str) -> None:
        lease, fence = self.leases.get(lane, ("none-1", 1))
        request = Rewrite(lease=lease, fence=fence, records=[{"compacted": True}])
        call = self.deliver(lane, request)
        self.answer(self.writes.rewrite(call, request))

    def redeliverable(self) -> list[int]:
        """Appends delivered before: answered, queued, or waiting for a short write lease."""
        return [rid for rid, call in self.calls.items() if isinstance(call.request, Append)]

    @precondition(lambda self: bool(self.redeliverable()))
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        """An append delivered again, with the same lane and request id: answered with its
        first reply if it was acknowledged, with its first copy's if that still waits (in the
        write queue behind a legacy writer, or for its short write lease)."""
        rid = data.draw(st.sampled_from(self.redeliverable()))
        call = self.calls[rid]
        key = call_key(call)
        was_acked = key in self.acked
        still_waiting = key in self.writes.pending or any(
            call_key(op.call) == key for op in self.writes.queue
        )
        call = self.deliver(call.lane.uid, call.request, rid=rid)
        if call.request.lease is not None:
            effects = self.writes.append_under_lease(call, call.request)
        else:
            effects = self.writes.append_without_lease(call, call.request)
        if was_acked:
            [reply] = effects
            assert isinstance(reply, Reply) and isinstance(reply.message, Appended)
        if still_waiting:
            assert effects == [], "a copy of a waiting append was not held for its answer"
        self.answer(effects)

    @precondition(lambda self: bool(self.acked))
    @rule(data=st.data())
    def sync_failed(self, data: st.DataObject) -> None:
        """A sync failed: the actor turned the ack into an error and forgets it."""
        key = data.draw(st.sampled_from(sorted(self.acked, key=str)))
        self.acked.discard(key)
        self.writes.forget(key)

    @rule(
        outcomes=st.lists(OUTCOMES, min_size=1, max_size=6),
        lock=st.sampled_from([True, True, False, "unusable"]),
    )
    def drain(self, outcomes: list[str], lock: Any) -> None:
        if not self.writes.may_drain():
            return
        self.outcomes = list(outcomes)
        outcome: Any = True
        if self.writes.lock_for() is not None:
            outcome = (
                ("path_not_allowed", "the lock file cannot be used") if lock == "unusable" else lock
            )
        queued = len(self.writes.queue)
        not_now = self.writes.begin_drain(outcome)
        if not_now is not None:
            if outcome is False:
                assert not_now == [] and len(self.writes.queue) == queued  # waits, writes nothing
            else:
                assert not self.writes.queue
            self.perform(not_now)
            return
        while (effects := self.writes.next_write()) is not None:
            self.perform(effects)
        done = self.writes.end_drain()
        if self.legacy:
            assert done == [Sync(), ReleaseLegacyLock(), Commit()]
        else:
            assert done == []
        self.perform(done)
        held = self.table.holder
        assert held is None or held.lane in HOLDERS, "a short write lease outlived its drain"

    @rule()
    def fail_queued(self) -> None:
        """The actor exits: every queued write refused (a release may grant a waiting one)."""
        while self.writes.queue:
            self.perform(self.writes.fail_queued("unavailable", "the actor is exiting"))

    @rule()
    def legacy_interop(self) -> None:
        """A fresh write path with the legacy lock (the queue and the table carried over)."""
        if self.writes.queue or self.writes.pending or self.legacy:
            return
        self.legacy = True
        self.writes = self.make_writes()
        self.acked.clear()  # a new write path remembers no acknowledgement

    # Performing, as the shell does -------------------------------------------------------------

    def perform(self, effects: list[WriteEffect]) -> None:
        for i, fx in enumerate(effects):
            match fx:
                case WriteOut(op=op):
                    holder = self.table.holder
                    assert holder is not None and (holder.lease, holder.fence) == (
                        op.lease,
                        op.fence,
                    )
                    if op.kind == "rewrite":
                        assert not self.unsynced, "a rewrite before the appends were synced"
                    for each in fx.ops:  # one write of op and the rest of its pipeline
                        key = call_key(each.call)
                        assert key not in self.acked, "an acknowledged append written again"
                        self.written[key] += 1
                    kind = self.outcomes.pop(0) if self.outcomes else "ok"
                    fsync = op.kind == "append" and op.durability == "fsync"
                    if kind == "moved" and fsync:
                        kind = "ok"  # checked after its sync, not by the write
                    result = outcome_of(kind, offset=sum(self.written.values()))
                    if kind in ("ok", "external") and fsync:
                        self.unsynced = True  # what the disk tells TranscriptSync
                    self.perform(self.writes.written(op, result, fx.rest))
                case Sync():
                    self.unsynced = False
                case Reply(message=Appended(), needs_sync=needs_sync):
                    fsync = fx.call.request.durability != "flush"
                    assert needs_sync == fsync
                    if fsync:
                        assert any(isinstance(e, Wrote) for e in effects[:i])
                    self.acked.add(call_key(fx.call))
                    self.answer([fx])
                case Reply():
                    self.answer([fx])
                case CheckLease(call=call, lease=lease, fence=fence, purpose=purpose):
                    verdict = self.table.check_write(call.lane.uid, lease, fence, purpose=purpose)
                    self.perform(self.writes.checked(fx, verdict))
                case AskWriteLease(req=req, lane=lane, priority=priority):
                    self.table_effects(
                        self.table.acquire(req, lane, "write", self.now, priority=priority)
                    )
                case ReleaseWriteLease(req=req, lane=lane, lease=lease):
                    self.table_effects(self.table.release(req, lane, lease, self.now))
                case Notify() | Wrote() | Commit() | ReleaseLegacyLock():
                    pass

    def table_effects(self, effects: list[Any]) -> None:
        for fx in effects:
            match fx:
                case Grant() if self.writes.is_pending(fx.req):
                    self.writes.granted(fx.req, fx.lease, fx.fence)
                case Grant():
                    self.leases[fx.lane] = (fx.lease, fx.fence)
                case Reject() if self.writes.is_pending(fx.req):
                    for _ in range(1 + len(self.writes.rejected(fx.req))):
                        self.answer_request(fx.req)
                case Released() if self.writes.released_silently(fx.req):
                    pass
                case Released(freed=True):
                    self.leases.pop(fx.lane, None)

    # The model -------------------------------------------------------------------------------

    def deliver(self, lane: str, request: Any, rid: int | None = None) -> LaneCall:
        if rid is None:
            self.ids += 1
            rid = self.ids
        self.deliveries += 1
        call = LaneCall(
            lane=LaneRef(uid=lane, name=lane, address=f"lane:{lane}"),
            path=PATH,
            canonical=True,
            request=request.model_copy(update={"id": rid}),
        )
        self.calls[rid] = call
        self.pending[self.deliveries] = rid
        self.by_delivery[self.deliveries] = call
        return call

    def answer(self, effects: list[WriteEffect]) -> None:
        """Count the replies among ``effects`` (other effects are performed)."""
        rest: list[WriteEffect] = []
        for fx in effects:
            if isinstance(fx, Reply):
                assert isinstance(fx.message, Appended | Rewritten | Error)
                self.answer_request(call_key(fx.call))
            else:
                rest.append(fx)
        if rest:
            self.perform(rest)

    def answer_request(self, key: Any) -> None:
        """The oldest unanswered delivery of ``key`` is answered now."""
        lane, rid = key
        for delivery, pending_rid in sorted(self.pending.items()):
            if pending_rid == rid and self.by_delivery[delivery].lane.uid == lane:
                del self.pending[delivery]
                self.answers[delivery] += 1
                return
        raise AssertionError(f"a reply to {key}, which has no unanswered delivery")

    @invariant()
    def answered_at_most_once(self) -> None:
        assert all(n == 1 for n in self.answers.values())

    @invariant()
    def unanswered_calls_are_queued_or_waiting(self) -> None:
        waiting = {call_key(op.call) for op in self.writes.queue} | set(self.writes.pending)
        for delivery in self.pending:
            assert call_key(self.by_delivery[delivery]) in waiting

    def teardown(self) -> None:
        """The actor exits: what is still unanswered waits for a short write lease."""
        self.fail_queued()
        for delivery in self.pending:
            assert call_key(self.by_delivery[delivery]) in self.writes.pending


WritePathModel.TestCase.settings = settings(
    max_examples=500 if _CI else 250,
    stateful_step_count=40,
    deadline=None,
    derandomize=_CI,
    suppress_health_check=[HealthCheck.too_slow],
)
TestWritePathModel = WritePathModel.TestCase
