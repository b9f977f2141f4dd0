"""A Hypothesis stateful model of the whole ``FileCore``: no actor, no disk, the clock a number.

The core is the real one (lease table, write path, lease record, group commit's outbox, the
lanes directory); this model is its shell: it performs every effect ``FileCore.next`` hands
out, with drawn outcomes, and feeds them back as the actor does: a ``WriteOut`` is written,
fails with ``ENOSPC``, finds the file moved or adopts an outside change; a fence ``Reserve``
succeeds or fails; the legacy lock is taken, busy or unusable; a ``Commit``'s fdatasync
succeeds or fails. Lanes ``a`` and ``b`` take leases (``b`` through a channel, which may
close), ``c`` and ``d`` append without one; calls may be delivered again. Messages are ended
as the actor ends them (``after_message``, then the end of the pass), timers fire when the
model says so.

What is asserted, against a simple model of the calls and of the disk:

- every call gets at most one final answer, and each delivery of an append exactly one once
  everything is performed (a ``queued`` is no final answer); at the end, what is unanswered
  still waits for a lease, in the write queue, or was cut off with its channel;
- bytes go out only under the holder's current lease and fence, and with the legacy lock on
  only while the drain holds ``<file>.lock``;
- an acknowledged append is never written again, and an ``fsync`` append's ``appended`` is
  delivered only once a successful sync covers its write (a failed sync turns it into the
  sync's error, and a later delivery writes it again);
- no append id is answered as written (by its own write, or from the lease record when
  resent under another call key) unless a successful sync covered a write of it (or it was
  written ``flush``), and when an append's write or sync fails, the lease record the core
  holds and the one written last no longer name its id by the time its error is delivered;
- a fence reservation that fails leaves no grant: the table has no holder with that fence and
  its fence counter is back where it was, the request gets the disk error;
- fences of fresh grants only grow; a free table has no waiters;
- after every run, the lease record names the table's holder (once it was announced); when
  an ack of the holder's append is delivered, the record written last is the one the core
  holds (its size and append ids include the write acknowledged);
- a lease-less append's short write lease is held only while its write is queued (the core
  performs the write path's ``ReleaseWriteLease``);
- a held batch is never left without a way out: after a message it is committed, watched for
  the end of its pass, or waits for an armed ``CommitDue``; at the end the queue is drained;
- each final answer fits its request (an append is never answered ``granted``);
- an append that releases its lease (``release``) says ``released`` and has released a level
  of the table's lease by the time its ack is delivered, and a waiter it handed the file to
  got its ``granted`` before that ack (grant first); refused or failed (its write or its
  sync), it released nothing: the lease is still held (unless revoked or abandoned since).

Each of these mutations makes it fail (tried with 200 examples each): the grant after a failed
reservation kept (``meaning``), the fence counter not set back (``reservation_failed``), acks a
failed sync turned into errors not forgotten (``committed``), their ids kept in the lease
record or the record not written again before their errors (``committed``), a copy under
another call key answered from the record before its first's sync (``resent``), a copy
that adds a release releasing before that sync (``resent``), the legacy
lock not taken before a drain, a drain that stops after one write, the lease record not
written (``settle``), or written after the acks it backs (``next``), the outbox not holding
an unsynced ack, a copy of an append whose first answer is still held not waiting for its
sync, de-duplication forgetting appends that wait in the queue, no tick armed again after a
tick that changed nothing, and the core answering every ``CheckLease`` of the
write path "accept" or never performing its ``ReleaseWriteLease`` (``table_request``). (Not
telling group commit's policy about a write survives: it changes only when a batch is
synced, not what is.)
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from sessionlane.actors.awaited import AwaitingTable
from sessionlane.actors.file_channels import ChannelRef
from sessionlane.actors.lease_table import LeasePolicy
from sessionlane.actors.reclaim import ReclaimBook
from sessionlane.actors.session_file_commit import GroupCommit, SyncFailure
from sessionlane.actors.session_file_core import FileCore
from sessionlane.actors.session_file_disk import WriteOutcome
from sessionlane.actors.session_file_effects import (
    ArmCommit,
    ArmRetry,
    ArmTick,
    Deliver,
    DrainWrites,
    Handoff,
    Reserve,
    TakeLegacyLock,
    Warn,
    WriteRecord,
)
from sessionlane.actors.session_file_writes import (
    Commit,
    ReleaseLegacyLock,
    Sync,
    WriteOut,
    WritePath,
    call_key,
)
from sessionlane.messages.internal import LaneCall, LaneRef
from sessionlane.messages.wire import (
    Abandon,
    Abandoned,
    Acquire,
    Append,
    Appended,
    Error,
    Granted,
    Queued,
    Release,
    Released,
    Rewrite,
    Rewritten,
    Skipped,
)

_CI = os.environ.get("HYPOTHESIS_PROFILE") == "ci"
PATH = "/sessions/t.jsonl"
HOLDERS = ("a", "b")
WRITERS = ("c", "d")
CHANNEL = ChannelRef(1)
FINAL = (Granted, Skipped, Error, Released, Abandoned, Appended, Rewritten)
WRITE_OUTCOMES = st.sampled_from(["ok", "ok", "ok", "disk_full", "moved", "external"])


class FileCoreModel(RuleBasedStateMachine):
    @initialize(legacy=st.booleans(), block=st.sampled_from([1, 2, 1024]))
    def start(self, legacy: bool, block: int) -> None:
        self.now = 1_000.0
        self.legacy = legacy
        self.unsynced: set[Any] = set()  # keys of fsync appends written, not synced yet
        self.table = AwaitingTable(PATH, LeasePolicy(fence_block=block, max_hold_ms=500))
        writes = WritePath(
            PATH,
            legacy=legacy,
            tail_unchecked=False,
            durability="fsync",
            max_record_bytes=100,
            unsynced=lambda: bool(self.unsynced),
        )
        self.commit = GroupCommit(PATH, None, watch=True)
        self.core = FileCore(
            PATH, self.table, writes, ReclaimBook(), commit=self.commit, new_secret=lambda: "s"
        )
        self.ids = 0
        self.calls: dict[int, LaneCall] = {}  # request id -> its (latest) call
        self.deliveries: Counter[Any] = Counter()  # call key -> times delivered
        self.finals: Counter[Any] = Counter()  # call key -> final answers delivered
        self.cut_off: set[Any] = set()  # keys of calls lost with their channel
        self.acked: set[Any] = set()  # keys whose `appended` was delivered
        self.written: Counter[Any] = Counter()  # key -> WriteOuts performed
        self.written_ok: set[Any] = set()  # keys written whose ack is not an error
        self.failed_acks: list[int] = []  # request ids of appends answered with a disk error
        self.synced_writes: set[Any] = set()  # keys whose write a successful sync covers
        self.leases: dict[str, tuple[str, int]] = {}  # lane -> (lease, fence) granted
        self.last_fence = 0
        self.legacy_held = False
        self.draws: dict[str, list[Any]] = {"write": [], "reserve": [], "lock": [], "sync": []}
        self.armed_commit: float | None = None
        self.armed_tick: float | None = None  # the earliest LeaseTick armed
        self.closing = False  # lane b's channel is closing
        self.durable = 0  # the highest fence a successful reservation made durable
        self.record_holder: Any = None
        self.record_written: Any = None  # the lease record last written
        self.fused: dict[Any, tuple[str, int]] = {}  # key -> (lease, releases before it)
        self.gone: set[str] = set()  # leases revoked, abandoned or released since granted
        self.copy_of: dict[Any, Any] = {}  # key of a copy under another call key -> the first's
        self.aid_of: dict[Any, str] = {}  # key of an append written with an aid -> that aid
        self.durable_aids: set[str] = set()  # aids a successful sync covered (or written flush)

    # The shell ---------------------------------------------------------------------------------

    def draw(self, kind: str, default: Any) -> Any:
        left = self.draws[kind]
        return left.pop(0) if left else default

    def run(self) -> None:
        core = self.core
        while True:  # as the shell's ``run``
            while (fx := core.next(self.now)) is not None:
                self.perform(fx)
            if not core.unsettled:
                return
            core.settle(self.now, 0.0)

    def perform(self, fx: Any) -> None:
        match fx:
            case Deliver(address=address, message=reply):
                self.delivered(address, reply.lane, reply.message)
            case WriteOut(op=op):
                holder = self.table.holder
                assert holder is not None and (holder.lease, holder.fence) == (op.lease, op.fence)
                assert not self.legacy or self.legacy_held, "written without the legacy lock"
                key = call_key(op.call)
                assert key not in self.acked, "an acknowledged append written again"
                assert key not in self.written_ok, "an append written twice"
                if op.kind == "rewrite":
                    assert not self.unsynced, "a rewrite before the appends were synced"
                self.written[key] += 1
                if op.aid is not None:
                    self.aid_of[key] = op.aid
                kind = self.draw("write", "ok")
                fsync = op.kind == "append" and op.durability == "fsync"
                if kind == "moved" and fsync:
                    kind = "ok"  # checked after its sync, not by the write
                outcome = outcome_of(kind, sum(self.written.values()))
                if kind in ("ok", "external") and op.kind == "append":
                    self.written_ok.add(key)
                if kind in ("ok", "external") and fsync:
                    self.unsynced.add(key)
                elif kind in ("ok", "external"):
                    self.synced_writes.add(key)  # a flush ack needs no sync
                    self.made_durable(key)
                self.core.written(op, outcome, self.now, 1, sum(self.written.values()), fx.rest)
            case Sync():
                assert not self.core.record_due, "a sync before the lease record of its writes"
                self.synced_writes |= self.unsynced
                for key in self.unsynced:
                    self.made_durable(key)
                self.unsynced.clear()
            case Commit():
                assert not self.core.record_due, "a commit before the lease record of its writes"
                failure = None
                if self.unsynced and self.draw("sync", "ok") == "fail":
                    failure = SyncFailure("disk_full", "fdatasync failed")
                else:
                    self.synced_writes |= self.unsynced
                    for key in self.unsynced:
                        self.made_durable(key)
                self.unsynced.clear()
                self.core.committed(failure)
            case Reserve(ceiling=ceiling):
                if self.draw("reserve", "ok") == "fail":
                    self.core.reservation_failed(OSError(errno.ENOSPC, "full"), self.now)
                else:
                    self.durable = max(self.durable, ceiling)
            case TakeLegacyLock():
                lock = self.draw("lock", True)
                self.legacy_held = lock is True
                self.core.locked(lock, self.now)
            case ReleaseLegacyLock():
                assert self.legacy_held
                self.legacy_held = False
            case WriteRecord(record=record):
                self.record_holder = None if record.held is None else record.held.lease
                self.record_written = record
            case ArmCommit(due=due):
                self.armed_commit = due
            case ArmTick(due=due):
                assert due == self.core.next_tick
                self.armed_tick = due
            case ArmRetry() | Handoff() | Warn():
                pass
            case _:
                raise AssertionError(f"the shell got an effect it cannot perform: {fx!r}")

    def made_durable(self, key: Any) -> None:
        """The write of ``key`` is durable (synced, or a flush one written)."""
        if (aid := self.aid_of.get(key)) is not None:
            self.durable_aids.add(aid)

    def delivered(self, address: Any, lane: Any, message: Any) -> None:
        assert address == (CHANNEL if lane == "b" else f"lane:{lane}")
        if self.closing and address == CHANNEL:
            return
        if not isinstance(message, FINAL):
            assert isinstance(message, Queued) or message.type in (
                "revoked",
                "abort_requested",
                "external_change",
            ), message
            if message.type == "revoked":
                self.leases.pop(lane, None)
                self.gone.add(message.lease)
            return
        key = (lane, message.id)
        if key not in self.deliveries:
            return  # the short write lease's release, a closed channel's abandon: no call
        self.finals[key] += 1
        assert self.finals[key] <= self.deliveries[key], f"{key} answered more than delivered"
        request = self.calls[message.id].request
        answers = {
            "acquire": (Granted, Skipped, Error),
            "release": (Released, Error),
            "abandon": (Abandoned,),
            "append": (Appended, Error),
            "rewrite": (Rewritten, Error),
        }
        assert isinstance(message, answers[request.type]), f"{request.type} got {message.type}"
        match message:
            case Granted():
                assert message.fence <= self.durable, "granted a fence that is not durable"
                assert message.fence > self.last_fence or message.lease in {
                    lease for lease, _ in self.leases.values()
                }, "a fresh grant with a fence not above the last"
                self.last_fence = max(self.last_fence, message.fence)
                self.leases[lane] = (message.lease, message.fence)
            case Released() | Abandoned():
                if not self.table.held_by(lane):
                    self.gone.add(self.leases.pop(lane, ("", 0))[0])
            case Appended() if isinstance(request, Append):
                held = self.core.book.record.held
                if message.released:  # as a release's answer: before the record that follows
                    record = self.core.book.record
                    assert request.aid in {r.done.aid for r in record.released} | {
                        a.aid for a in record.appends
                    }
                elif held is not None and held.lease == request.lease:
                    # (an append that released in the same commit is kept with the record
                    # that follows its release: not this ack's to wait for)
                    written, now = self.record_written, self.core.book.record
                    assert written is not None and replace(written, released=()) == replace(
                        now, released=()
                    ), "an ack left before the lease record that backs it"
                if request.durability != "flush":
                    # a copy under another call key is answered by its first's write, or the
                    # first by the copy's (when the copy came while the first was queued)
                    firsts = {key, self.copy_of.get(key)}
                    firsts |= {k for k, first in self.copy_of.items() if first == key}
                    # ... or by any write of its aid (a resend after its first's sync failed)
                    firsts |= {k for k, aid in self.aid_of.items() if aid == request.aid}
                    assert firsts & self.synced_writes, "an fsync ack before its sync"
                if request.aid is not None:  # answered from the record, or by its own write
                    assert request.aid in self.durable_aids, (
                        f"{request.aid} answered as written, and no successful sync covered it"
                    )
                self.acked.add(key)
                if request.release:
                    self.released_by_append(lane, key, request, message)
            case Error() if key in self.fused and message.code not in ("stale_fence", "not_holder"):
                lease, _ = self.fused[key]
                if lease not in self.gone and self.finals[key] == 1:
                    holder = self.table.holder
                    assert holder is not None and holder.lease == lease, (
                        "a refused or failed append released its lease"
                    )
                if message.code == "disk_full":
                    self.sync_failed(key, message.id)
            case Error() if message.code == "disk_full" and isinstance(request, Append):
                self.sync_failed(key, message.id)

    def sync_failed(self, key: Any, rid: int) -> None:
        """The append ``key`` was answered its sync's error: a retry writes again (and the
        lease record on disk no longer names it as written, unless it was durable before)."""
        aid = self.calls[rid].request.aid
        if aid is not None and aid not in self.durable_aids:
            for record in (self.record_written, self.core.book.record):
                assert record is None or aid not in {a.aid for a in record.appends}, (
                    f"the lease record keeps {aid} as written after its error left"
                )
        self.acked.discard(key)
        self.written_ok.discard(key)
        self.failed_acks.append(rid)

    def released_by_append(self, lane: str, key: Any, request: Append, ack: Appended) -> None:
        """The ack of an append that releases its lease was delivered."""
        assert ack.released, "an append that released did not say so"
        lease, releases = self.fused[key]
        if self.finals[key] > 1:
            return  # a copy answered again: released once, by the first
        assert self.table.counters["releases"] > releases, "acked before its lease was released"
        holder = self.table.holder
        granted = {lease for lease, _ in self.leases.values()}
        if holder is not None and holder.lane in HOLDERS and holder.lease not in granted:
            assert holder.lane == "b" and self.closing, "the next holder's grant came after"
        if not self.table.held_by(lane):
            self.gone.add(self.leases.pop(lane, (lease, 0))[0])

    # Lanes ---------------------------------------------------------------------------------------

    def deliver(self, lane: str, request: Any, rid: int | None = None, *, end: bool = True) -> None:
        if rid is None:
            self.ids += 1
            rid = self.ids
        address: Any = CHANNEL if lane == "b" else f"lane:{lane}"
        call = LaneCall(
            lane=LaneRef(uid=lane, name=lane, address=address),
            path=PATH,
            canonical=True,
            request=request.model_copy(update={"id": rid}),
        )
        self.calls[rid] = call
        self.deliveries[call_key(call)] += 1
        self.core.met(call)
        self.core.push(self.core.call(call, self.now))
        self.run()
        if end:
            self.end_message()

    def end_message(self) -> None:
        """As the actor ends every message (``SessionFile.end_turn``): commit now, or watch for
        the pass end; and again after it, as ``end_turn`` does (a commit may leave new acks
        held: an append's release granted a lease-less writer, whose write waits for a sync)."""
        for _ in range(4):
            watch = self.core.after_message()
            self.run()
            if not watch:
                break
            self.core.pass_ended(self.now)  # the transport had nothing more for us
            self.run()
        if (record := self.core.record_now()) is not None:  # as the shell's ``write_record``
            self.perform(record)

    @rule(
        lane=st.sampled_from(HOLDERS),
        purpose=st.sampled_from(["prompt", "compaction", "recovery"]),
        contention=st.sampled_from(["wait", "skip"]),
    )
    def acquire(self, lane: str, purpose: Any, contention: Any) -> None:
        self.deliver(lane, Acquire(lane=lane, path=PATH, purpose=purpose, on_contention=contention))

    @rule(lane=st.sampled_from(HOLDERS))
    def release(self, lane: str) -> None:
        lease, _ = self.leases.get(lane, ("none-1", 1))
        self.deliver(lane, Release(lease=lease))

    @rule(lane=st.sampled_from(HOLDERS))
    def abandon(self, lane: str) -> None:
        self.deliver(lane, Abandon(lane=lane, path=PATH))

    @rule(
        lane=st.sampled_from(HOLDERS),
        stale=st.sampled_from([False, False, True]),
        fsync=st.booleans(),
        writes=st.lists(WRITE_OUTCOMES, max_size=3),
        locks=st.lists(st.sampled_from([True, True, False, "unusable"]), max_size=2),
        release=st.sampled_from([False, False, True]),
        aid=st.booleans(),
    )
    def append_under_lease(
        self,
        lane: str,
        stale: bool,
        fsync: bool,
        writes: list[str],
        locks: list[Any],
        release: bool,
        aid: bool,
    ) -> None:
        lease, fence = self.leases.get(lane, ("none-1", 1))
        self.draw_outcomes(writes, locks)
        request = Append(
            lease=lease,
            fence=fence + 1 if stale else fence,
            records=[{"n": self.ids}],
            durability="fsync" if fsync else "flush",
            release=release or None,
            aid=f"aid-{self.ids:05d}" if release or aid else None,
        )
        if release:
            self.fused[(lane, self.ids + 1)] = (lease, self.table.counters["releases"])
        self.deliver(lane, request)

    @rule(
        lane=st.sampled_from(WRITERS),
        too_big=st.sampled_from([False, False, True]),
        writes=st.lists(WRITE_OUTCOMES, max_size=3),
        reserves=st.lists(st.sampled_from(["ok", "ok", "fail"]), max_size=2),
    )
    def append_without_lease(
        self, lane: str, too_big: bool, writes: list[str], reserves: list[str]
    ) -> None:
        self.draw_outcomes(writes, [])
        self.draws["reserve"] = list(reserves)
        records: list[Any] = [{"pad": "x" * 200}] if too_big else [{"n": self.ids}]
        self.deliver(lane, Append(lane=lane, path=PATH, records=records))

    @rule(lane=st.sampled_from(HOLDERS))
    def rewrite(self, lane: str) -> None:
        lease, fence = self.leases.get(lane, ("none-1", 1))
        self.deliver(lane, Rewrite(lease=lease, fence=fence, records=[{"compacted": True}]))

    def appends(self) -> list[int]:
        return [rid for rid, c in self.calls.items() if isinstance(c.request, Append)]

    @precondition(lambda self: bool(self.appends()))
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        """An append delivered again (same lane, same request id): answered, queued or
        waiting for its short write lease."""
        recent = self.appends()[-3:]  # the recent ones may still be held or queued
        rid = data.draw(st.sampled_from(recent + self.failed_acks[-2:]))
        call = self.calls[rid]
        if call_key(call) in self.cut_off:
            return
        self.deliver(call.lane.uid, call.request, rid=rid)

    @rule(lane=st.sampled_from(HOLDERS + WRITERS), sync=st.sampled_from(["ok", "fail"]))
    def append_twice_in_one_pass(self, lane: str, sync: str) -> None:
        """An append and a copy of it in the same transport pass: the first's ack is held
        when the copy arrives; the pass's sync succeeds or fails."""
        self.draws["sync"] = [sync]
        request: Any
        if lane in HOLDERS:
            lease, fence = self.leases.get(lane, ("none-1", 1))
            request = Append(lease=lease, fence=fence, records=[{"n": self.ids}])
        else:
            request = Append(lane=lane, path=PATH, records=[{"n": self.ids}])
        self.deliver(lane, request, end=False)
        self.deliver(lane, request, rid=self.ids)

    @rule(lane=st.sampled_from(HOLDERS), sync=st.sampled_from(["ok", "fail"]))
    def fused_copy_under_another_key(self, lane: str, sync: str) -> None:
        """An fsync append and release and a copy of it under another call key (sent again
        after a reconnect) in the same transport pass; the pass's sync succeeds or fails. The
        copy must not say released before the release (nor after a failed sync)."""
        self.draws["sync"] = [sync]
        lease, fence = self.leases.get(lane, ("none-1", 1))
        request = Append(
            lease=lease,
            fence=fence,
            records=[{"n": self.ids}],
            release=True,
            aid=f"aid-{self.ids:05d}",
        )
        releases = self.table.counters["releases"]
        self.fused[(lane, self.ids + 1)] = (lease, releases)
        self.deliver(lane, request, end=False)
        self.fused[(lane, self.ids + 1)] = (lease, releases)
        self.copy_of[(lane, self.ids + 1)] = (lane, self.ids)
        self.deliver(lane, request)

    @rule(lane=st.sampled_from(HOLDERS), sync=st.sampled_from(["ok", "fail"]))
    def copy_under_another_key(self, lane: str, sync: str) -> None:
        """An fsync append with an aid and a copy of it under another call key (sent again
        after a reconnect) in the same transport pass; the pass's sync succeeds or fails. The
        copy is answered from the record only by the sync its first waits for."""
        self.draws["sync"] = [sync]
        lease, fence = self.leases.get(lane, ("none-1", 1))
        aid = f"aid-{self.ids:05d}"
        request = Append(lease=lease, fence=fence, records=[{"n": self.ids}], aid=aid)
        self.deliver(lane, request, end=False)
        self.copy_of[(lane, self.ids + 1)] = (lane, self.ids)
        self.deliver(lane, request)

    @rule(lane=st.sampled_from(HOLDERS), sync=st.sampled_from(["ok", "fail"]))
    def copy_adds_a_release(self, lane: str, sync: str) -> None:
        """An fsync append with an aid and no release, then a copy of it under another call
        key that asks to release too, in the same transport pass; the pass's sync succeeds
        or fails. The copy releases, and says so, only once that sync succeeded."""
        self.draws["sync"] = [sync]
        lease, fence = self.leases.get(lane, ("none-1", 1))
        aid = f"aid-{self.ids:05d}"
        request = Append(lease=lease, fence=fence, records=[{"n": self.ids}], aid=aid)
        self.deliver(lane, request, end=False)
        self.fused[(lane, self.ids + 1)] = (lease, self.table.counters["releases"])
        self.copy_of[(lane, self.ids + 1)] = (lane, self.ids)
        self.deliver(lane, request.model_copy(update={"release": True}))

    def answered_with_aid(self) -> list[int]:
        return [
            rid
            for rid, c in self.calls.items()
            if isinstance(c.request, Append) and c.request.aid is not None
            if self.finals[call_key(c)] > 0 and call_key(c) not in self.cut_off
        ]

    @precondition(lambda self: bool(self.answered_with_aid()))
    @rule(data=st.data())
    def resend_by_aid(self, data: st.DataObject) -> None:
        """An append with an aid, answered (written, failed or refused), sent again under a
        new request id, as a client resends it after a lost connection or a restart: written
        again unless a successful sync covered it (then answered from the record)."""
        rid = data.draw(st.sampled_from(self.answered_with_aid()[-4:]))
        first = self.calls[rid]
        key = (first.lane.uid, self.ids + 1)
        if first.request.release:  # it releases once, by its first write that was synced
            self.fused[key] = self.fused[call_key(first)]
        writes = [k for k, aid in self.aid_of.items() if aid == first.request.aid]
        if writes:  # answered from the record: by the last write of its aid
            self.copy_of[key] = writes[-1]
        self.deliver(first.lane.uid, first.request)

    @rule(reserves=st.lists(st.sampled_from(["ok", "fail"]), min_size=1, max_size=3))
    def reservations_fail(self, reserves: list[str]) -> None:
        """The next fence reservations succeed or fail as drawn (a disk filling up)."""
        self.draws["reserve"] = list(reserves)

    @rule(syncs=st.lists(st.sampled_from(["ok", "fail"]), min_size=1, max_size=2))
    def syncs_fail(self, syncs: list[str]) -> None:
        self.draws["sync"] = list(syncs)

    # Time and the actor's other messages ------------------------------------------------------

    @rule(ms=st.integers(1, 400))
    def tick(self, ms: int) -> None:
        """Time passes; the ``LeaseTick`` armed last fires if it is due (as the actor's)."""
        self.now += ms
        due = self.armed_tick
        if due is None or due > self.now:
            return
        self.armed_tick = None
        self.core.tick_due(due)
        self.core.tick(self.now)
        self.run()
        self.end_message()

    @precondition(lambda self: self.armed_commit is not None)
    @rule()
    def commit_timer(self) -> None:
        assert self.armed_commit is not None
        self.now = max(self.now, self.armed_commit)
        self.core.commit_due(self.armed_commit, self.now)
        self.armed_commit = None
        self.run()
        self.end_message()

    @rule(locks=st.lists(st.sampled_from([True, False, "unusable"]), min_size=1, max_size=2))
    def legacy_retry(self, locks: list[Any]) -> None:
        self.draw_outcomes([], locks)
        self.core.retry_due()
        self.core.push([DrainWrites()])
        self.run()
        self.end_message()

    @rule()
    def channel_closes(self) -> None:
        """The channel of lane ``b`` closes: its calls still unanswered are cut off."""
        for key, n in self.deliveries.items():
            if key[0] == "b" and self.finals[key] < n:
                self.cut_off.add(key)
        self.closing = True  # what goes to the closed channel now is dropped
        for uid in self.core.through(CHANNEL):  # as the shell's ``on_channel_closed``
            self.core.abandon(uid, self.now, "the gateway's channel closed")
            self.run()
            self.core.forget(uid)
        self.closing = False
        if (held := self.leases.pop("b", None)) is not None:
            self.gone.add(held[0])  # abandoned with the channel (its answer was dropped)
        self.end_message()

    def draw_outcomes(self, writes: list[str], locks: list[Any]) -> None:
        self.draws["write"] = list(writes)
        self.draws["lock"] = [
            ("path_not_allowed", "the lock file cannot be used") if lock == "unusable" else lock
            for lock in locks
        ]

    # Invariants --------------------------------------------------------------------------------

    @invariant()
    def a_free_table_has_no_waiters(self) -> None:
        if self.table.holder is None:
            assert not self.table.waiters

    @invariant()
    def only_durable_fences_are_held(self) -> None:
        """A failed fence reservation leaves no grant (and the fence counter goes back)."""
        holder = self.table.holder
        assert holder is None or holder.fence <= self.durable
        assert self.table.fence <= self.durable

    @invariant()
    def the_next_deadline_is_armed(self) -> None:
        due = self.table.next_deadline()
        if due is not None:
            assert self.armed_tick is not None and self.armed_tick <= due

    @invariant()
    def the_record_names_the_holder(self) -> None:
        holder = self.table.holder
        if holder is not None and self.core.book.secret_of(holder.lease) is not None:
            assert self.record_holder == holder.lease

    @invariant()
    def no_short_write_lease_outlives_its_write(self) -> None:
        """A lease-less append's short write lease is held only while its write is queued
        (the core released it, as the write path asked, once the write was done)."""
        holder = self.table.holder
        if holder is not None and holder.lane in WRITERS:
            queued = self.core.writes.queue
            assert any(op.auto_release and op.lease == holder.lease for op in queued)

    @invariant()
    def a_held_batch_has_a_way_out(self) -> None:
        if self.commit.outbox:
            assert self.commit.phase == "wait" and self.armed_commit is not None

    @invariant()
    def answered_at_most_once_per_delivery(self) -> None:
        for key, n in self.finals.items():
            assert n <= self.deliveries[key]

    def teardown(self) -> None:
        """Everything performed: what is unanswered waits, or was cut off with its channel."""
        if not hasattr(self, "core"):
            return
        self.legacy_retry([True])  # the legacy writer is gone: the queue drains
        assert not self.core.writes.queue and not self.core.writes.draining
        for _ in range(5):  # a batch waiting for a sibling is committed when its timer fires
            if self.armed_commit is None:
                break
            self.commit_timer()
        assert not self.commit.outbox
        writes = self.core.writes
        waiting = {w.req for w in self.table.waiters} | set(writes.pending)
        waiting |= {call_key(op.call) for op in writes.queue}
        for key, n in self.deliveries.items():
            if self.finals[key] < n:
                assert key in waiting or key in self.cut_off, f"{key} was never answered"


def outcome_of(kind: str, offset: int) -> WriteOutcome:
    if kind == "disk_full":
        return WriteOutcome(error=OSError(errno.ENOSPC, "No space left on device"))
    if kind == "moved":
        return WriteOutcome(offset=offset, moved=True)
    if kind == "external":
        return WriteOutcome(external="append", offset=offset)
    return WriteOutcome(offset=offset)


FileCoreModel.TestCase.settings = settings(
    max_examples=400 if _CI else 200,
    stateful_step_count=40,
    deadline=None,
    derandomize=_CI,
    suppress_health_check=[HealthCheck.too_slow],
)
TestFileCoreModel = FileCoreModel.TestCase
