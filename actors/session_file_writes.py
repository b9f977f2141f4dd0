"""The write path of a SessionFile: accepting writes, the write queue, performing them.

``WritePath`` is a part of ``sessionlane.actors.session_file.SessionFile`` with its own state; like
``LeaseTable`` it decides and returns effects that the actor performs in order, and does no
I/O and needs no clock (the table's deadlines are the core's). The disk effects
(``WriteOut``: write these bytes; ``Sync``; ``ReleaseLegacyLock``) are performed by the
shell's ``FileDisk`` (``sessionlane.actors.session_file_disk``), whose ``WriteOutcome`` comes
back through ``written``; the others (``Reply``, ``Notify``, ``Wrote``, ``Commit``) are what
the rest of the actor must do. Tested without an actor (``tests/test_write_path.py``).

Its effect records (and ``WriteOp``) are in ``sessionlane.actors.session_file_write_effects``,
re-exported here. It does not hold the lease table either: what it needs of it are *table
requests* that the core (``sessionlane.actors.session_file_core.FileCore``, which owns both)
performs on the table: ``CheckLease`` (may this write go under its lease and fence? the
verdict comes back through ``checked``), ``AskWriteLease`` (a lease-less append's short write
lease) and ``ReleaseWriteLease`` (that lease, once its append is written). The table's answers
come back as they do for any request: ``granted``, ``rejected``, ``released_silently``.

A write under a lease (``append`` with ``lease`` + ``fence``, or ``rewrite``) is checked when
it arrives and again when it is performed; a write that fails the check changes nothing.
Writes without a lease (``append`` with ``lane`` + ``path``) are queued like a short ``write``
lease: the records are validated up front, written when the lease is granted, and the lease is
released right after, so they never interleave with another lane's turn. An append that is
delivered again is answered with its first reply (remembered by lane and request id).

Pipelines. An append that names the one before it in its pipeline (``after``: that append's
``aid``) is written only if the last append written under its lease is that one
(``last_written``): otherwise it is refused ``pipeline_broken`` and nothing is written. The
check is made when the write is performed, in queue order, so once an append of a pipeline is
not written (refused, failed, or its sync failed) no later one is: each names a predecessor
that is not the last written. ``last_written`` is forgotten when a sync fails (``forget``)
and, after a service restart, taken from the holder's lease record (``resume``).

Offsets. An append that asks (``Append.offsets``: a pipeline's group of records) is answered
with the offset of each of its lines (``Appended.offsets``), from the lengths of the lines it
encodes anyway (``WriteOp.starts``); a resent one answered from the lease record, from the
lines its records make (``resent_offsets``).

Append and release. An append under a lease may carry its release (``Append.release``): once
written and durable, one level of its lease is released (a ``ReleaseWriteLease`` the core
performs on the table, answered by nobody), right after its write for a ``flush`` append,
after the sync that covers it for an ``fsync`` one; a pipeline's chain ends with it. What is
between the write and the release is kept by ``sessionlane.actors.append_release``.

Legacy interop (``legacy_lock``). Every write (and rewrite) goes through a FIFO write queue;
with the legacy lock on, draining it first takes ``<file>.lock`` (never waiting: a live legacy
holder means the queue is retried later, with backoff: ``retry_after``), performs the queued
writes, syncs them and releases the lock. Writes that arrive meanwhile queue behind; a queued
write is re-checked against its lease and fence when it is finally performed. A torn last line
seen at activation while a legacy writer held the lock is repaired by the first write under
the lock (it may have been that writer's line in progress).

The drain is driven by the actor, one write at a time (``begin_drain`` with the outcome of
taking the legacy lock, ``next_write``, its ``CheckLease`` answered through ``checked``,
``written``, ``end_drain``), because a write's
effects can grant the next queued lease-less append: the actor performs them between two
writes, and the append granted so joins the same drain, under the same lock. One exception:
the appends of a pipeline queued one behind the other under the same lease go out in one
``write`` (``chained``: one system call, one look for an outside change), because nothing
performed between their writes could change what their checks find.

About 650 lines, a third of them this docstring: one queue and its drain, whose every step
reads the same pending writes (the effect records and the append-and-release bookkeeping are
in their own modules already).
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sessionlane.actors.append_release import ReleasingAppends
from sessionlane.actors.confined import failure_detail, is_fd_exhaustion
from sessionlane.actors.disk_errors import disk_error_code
from sessionlane.actors.session_file_commit import moved_detail
from sessionlane.actors.session_file_disk import LockOutcome, WriteOutcome
from sessionlane.actors.session_file_write_effects import (
    AskWriteLease,
    CheckLease,
    Commit,
    Notify,
    ReleaseLegacyLock,
    ReleaseWriteLease,
    Reply,
    Sync,
    TableRequest,
    Verdict,
    WriteEffect,
    WriteOp,
    WriteOut,
    Wrote,
)
from sessionlane.actors.transcript import encode_lines, line_starts
from sessionlane.messages import trusted
from sessionlane.messages.errors import ErrorCode, FileMoved, SessionLaneError
from sessionlane.messages.internal import FileReply, LaneCall
from sessionlane.messages.wire import (
    Append,
    Durability,
    Error,
    ExternalChange,
    Purpose,
    Rewrite,
    Rewritten,
)
from sessionlane.messages.wire import Reply as ReplyMessage

__all__ = [
    "AskWriteLease",
    "CheckLease",
    "Commit",
    "Notify",
    "ReleaseLegacyLock",
    "ReleaseWriteLease",
    "Reply",
    "Sync",
    "TableRequest",
    "Verdict",
    "WriteEffect",
    "WriteOp",
    "WriteOut",
    "WritePath",
    "Wrote",
    "call_key",
]

log = logging.getLogger(__name__)

_DEDUP_SIZE = 1024
MAX_CHAINED = 255
MAX_CHAINED_BYTES = 4 << 20
"""At most this many appends (this many bytes) join the one before them in one ``write``
(``WritePath.chained``): a group commit's batch (``group_commit.MAX_BATCH_WRITES``)."""
LEGACY_RETRY_MIN_S = 0.002
LEGACY_RETRY_MAX_S = 0.05
"""Backoff bounds for retrying a legacy lock held by a live legacy writer."""


def call_key(call: LaneCall) -> tuple[Any, Any]:
    """The lease table's request key of a call: (lane uid, request id)."""
    return (call.lane.uid, call.request.id)


# State --------------------------------------------------------------------------------------


@dataclass
class _PendingWrite:
    """A lease-less append waiting for its short write lease."""

    call: LaneCall
    data: bytes
    lines: int
    durability: Durability
    starts: tuple[int, ...] | None


class WritePath:
    """The write path of one open transcript: its queue, its de-duplication, the legacy lock.

    Pure: the disk is the shell's (``FileDisk``), the lease table the core's (asked through
    table requests: ``CheckLease``...). ``legacy``: writes take ``<file>.lock``
    (the shell takes it, for ``lock_for``'s lease, before ``begin_drain``); ``unsynced``
    is asked whether an fsync append no fdatasync covers yet was written (a rewrite syncs it
    first).
    """

    def __init__(
        self,
        path: str,
        *,
        legacy: bool,
        tail_unchecked: bool,
        durability: Durability,
        max_record_bytes: int,
        unsynced: Callable[[], bool],
        sync_each_append: bool = False,
    ) -> None:
        self.path = path
        self.legacy = legacy
        self.tail_unchecked = tail_unchecked
        """A torn last line seen at activation was left for the first write under the
        legacy lock to repair (it may have been a legacy writer's line in progress)."""
        self.durability = durability
        self.max_record_bytes = max_record_bytes
        self.unsynced = unsynced
        self.sync_each_append = sync_each_append
        """No group commit: sync every append before answering it (the benchmarks' baseline)."""
        self.pending: dict[Any, _PendingWrite] = {}
        self.auto_releases: set[Any] = set()
        self.done: OrderedDict[Any, ReplyMessage] = OrderedDict()  # call key -> append reply
        self.waiting: dict[Any, list[LaneCall]] = {}
        """Appends queued or pending, by call key: the copies of each delivered again meanwhile
        (answered with its reply when it is written or refused, never written twice)."""
        self.auto_ids = 0
        self.releasing = ReleasingAppends()
        """Appends that release their lease (``Append.release``), from write to release."""
        self.last_written: tuple[str, str | None] | None = None
        """(lease, aid) of the last append written, which a pipelined append must follow."""
        self.queue: deque[WriteOp] = deque()  # in order; waits only for the legacy lock
        self.gathering = False
        """Set by the shell while the call it serves is an append with more appends of the
        same channel read right behind it: the queue is drained after the last of them, so
        that a pipeline's appends go out in one write (``chained``)."""
        self.draining = False
        self.locked = False
        self.retry_armed = False
        self.backoff = LEGACY_RETRY_MIN_S
        self.counters: dict[str, int] = {
            "appends": 0,
            "records": 0,
            "rewrites": 0,
            "external_changes": 0,
            "duplicates": 0,
            "invalid_records": 0,
            "legacy_lock_waits": 0,
            "pipeline_broken": 0,
            "chained_appends": 0,
        }

    # Accepting writes ----------------------------------------------------------------------

    def append_under_lease(self, call: LaneCall, req: Append) -> list[WriteEffect]:
        """An append with ``lease`` + ``fence``: a duplicate, or its lease checked
        (``CheckLease``, then ``checked``: refused, or queued to write)."""
        assert req.lease is not None and req.fence is not None  # the caller's match says so
        if (dup := self.duplicate(call)) is not None:
            return dup
        return [CheckLease(call, req.lease, req.fence)]

    def checked(self, check: CheckLease, verdict: Verdict) -> list[WriteEffect]:
        """The table's ``verdict`` on ``check``: an arriving write refused or queued, a queued
        one refused or performed (``perform``)."""
        if check.op is not None:
            return self.perform(check.op, verdict)
        call, req = check.call, check.call.request
        if verdict is not None:
            return [self.refused(call, *verdict)]
        if isinstance(req, Rewrite):
            encoded = self.encode(call, req.records) if req.records else (b"", 0, None)
            if isinstance(encoded, Reply):
                return [encoded]
            data, lines, _ = encoded
            self.queue.append(WriteOp("rewrite", call, req.lease, req.fence, data, lines, "fsync"))
            return []
        assert isinstance(req, Append) and req.lease is not None and req.fence is not None
        encoded = self.encode(call, req.records, bool(req.offsets))
        if isinstance(encoded, Reply):
            return [encoded]
        data, lines, starts = encoded
        durability = req.durability or self.durability
        op = WriteOp(
            "append",
            call,
            req.lease,
            req.fence,
            data,
            lines,
            durability,
            aid=req.aid,
            after=req.after,
            release=bool(req.release),
            starts=starts,
        )
        self.queue.append(op)
        self.wait_for(call)
        return []

    def append_without_lease(self, call: LaneCall, req: Append) -> list[WriteEffect]:
        """A lease-less append: validated now, written once its short write lease is granted."""
        if (dup := self.duplicate(call)) is not None:
            return dup
        encoded = self.encode(call, req.records, bool(req.offsets))
        if isinstance(encoded, Reply):
            return [encoded]
        data, lines, starts = encoded
        key = call_key(call)
        durability = req.durability or self.durability
        self.pending[key] = _PendingWrite(call, data, lines, durability, starts)
        self.wait_for(call)
        return [AskWriteLease(key, call.lane.uid, call.lane.priority)]

    def rewrite(self, call: LaneCall, req: Rewrite) -> list[WriteEffect]:
        """A rewrite under a compaction lease: its lease checked (``CheckLease``, then
        ``checked``: refused, or queued to write)."""
        return [CheckLease(call, req.lease, req.fence, purpose="compaction")]

    # What the lease table's effects mean for the write path --------------------------------

    def is_pending(self, req: Any) -> bool:
        """Is ``req`` a lease-less append waiting for its short write lease?"""
        return req in self.pending

    def granted(self, req: Any, lease: str, fence: int) -> None:
        """The pending append ``req`` was granted its short write lease: queue it to write."""
        pending = self.pending.pop(req)
        self.queue.append(
            WriteOp(
                "append",
                pending.call,
                lease,
                fence,
                pending.data,
                pending.lines,
                pending.durability,
                auto_release=True,
                starts=pending.starts,
            )
        )

    def rejected(self, req: Any) -> list[LaneCall]:
        """The table refused ``req`` (the queue is full...): no write will follow. Returns the
        copies of it delivered meanwhile (each gets the same refusal)."""
        self.pending.pop(req, None)
        return self.waiting.pop(req, [])

    def released_silently(self, req: Any) -> bool:
        """Was ``req`` the release of a short write lease (answered by nobody)? Forgets it."""
        if req in self.auto_releases:
            self.auto_releases.discard(req)
            return True
        return self.releasing.silent(req)

    def forget(self, key: Any) -> None:
        """The acknowledgement of ``key`` turned into an error: a retry must write again, and
        no pipelined append may follow it (nor any append its failed sync covered)."""
        self.done.pop(key, None)
        self.releasing.forget(key)  # its sync failed: the lease stays held
        self.last_written = None

    def resume(self, lease: str, aid: str | None) -> None:
        """After a restart: the holder ``lease`` awaited from the lease record last wrote the
        append ``aid`` (its pipeline resent may go on from there)."""
        self.last_written = (lease, aid)

    # Performing writes ---------------------------------------------------------------------

    def may_drain(self) -> bool:
        """Are there writes to perform, no drain in progress (that would take them), and no
        more appends of a pipeline about to be queued behind them (``gathering``)?"""
        return bool(self.queue) and not self.draining and not self.gathering

    def lock_for(self) -> str | None:
        """The lease the shell takes the legacy lock for before ``begin_drain`` (the first
        queued write's: a drop-in holder keeps ``<file>.lock`` for its lease, and its writes
        go under it), or None when writes take no lock."""
        return self.queue[0].lease if self.legacy and self.queue else None

    def begin_drain(self, lock: LockOutcome = True) -> list[WriteEffect] | None:
        """Start performing the queue: None when the writes may go.

        ``lock``: the outcome of taking the legacy lock (for ``lock_for``'s lease). Otherwise the
        effects of not draining now (every queued write failed: the lock file cannot be
        used); a live legacy holder leaves the queue as it is, ``retry_after`` says when to
        try again.
        """
        if self.legacy:
            if isinstance(lock, tuple):
                return self.fail_queued(*lock)
            self.locked = lock
            if not lock:
                self.counters["legacy_lock_waits"] += 1
                return []
            self.backoff = LEGACY_RETRY_MIN_S
        self.draining = True
        return None

    def retry_after(self) -> float | None:
        """Seconds until the legacy lock is tried again, when a retry must be armed now."""
        if self.retry_armed or not self.queue or self.draining:
            return None
        self.retry_armed = True
        delay, self.backoff = self.backoff, min(self.backoff * 2, LEGACY_RETRY_MAX_S)
        return delay

    def retry_due(self) -> None:
        """The retry armed by ``retry_after`` fired (the actor drains again)."""
        self.retry_armed = False

    def next_write(self) -> list[WriteEffect] | None:
        """The next queued write, taken off the queue: the check of its lease and fence
        against the table now (``CheckLease``, whose verdict ``checked`` hands to
        ``perform``); None when the queue is empty."""
        if not self.queue:
            return None
        op = self.queue.popleft()
        purpose: Purpose | None = "compaction" if op.kind == "rewrite" else None
        return [CheckLease(op.call, op.lease, op.fence, purpose=purpose, op=op)]

    def perform(self, op: WriteOp, verdict: Verdict) -> list[WriteEffect]:
        """A write taken off the queue, checked: its ``WriteOut`` (after a ``Sync`` for a
        rewrite), or its refusal when it fails the check or breaks its pipeline."""
        if verdict is not None:
            return self.answer(op, self.refused(op.call, *verdict).message)
        if op.after is not None and self.last_written != (op.lease, op.after):
            self.counters["pipeline_broken"] += 1
            detail = (
                f"the append before it in its pipeline ({op.after}) was not the last one "
                "written under this lease; nothing was written"
            )
            return self.answer(op, self.refused(op.call, "pipeline_broken", detail).message)
        repair, self.tail_unchecked = self.tail_unchecked, False
        if op.kind == "rewrite":
            out = WriteOut(op, repair_tail=repair)
            if self.unsynced():
                return [Sync(), out]  # what was acknowledged-to-be is durable before the replace
            return [out]
        return [WriteOut(op, repair_tail=repair, rest=self.chained(op))]

    def chained(self, op: WriteOp) -> tuple[WriteOp, ...]:
        """The appends queued right behind ``op`` that continue its pipeline, taken off the
        queue to go in ``op``'s write.

        Each would pass its checks when performed if ``op`` is written: the same lease and
        fence (the table's verdict on ``op`` holds for them, nothing between their writes
        changes the table) and, for each, ``after`` naming the one before it. Only ``fsync``
        appends (a ``flush`` one is answered at once, by itself) and no lease-less append
        (its short lease is released between writes). ``written`` puts them back in the queue,
        as they were, when ``op``'s write fails."""
        if op.aid is None or op.durability != "fsync" or op.auto_release or op.release:
            return ()  # nothing goes after an append that releases: it ends the turn
        queue = self.queue
        rest: list[WriteOp] = []
        prev, size = op, len(op.data)
        while queue and len(rest) < MAX_CHAINED:
            nxt = queue[0]
            if (
                nxt.after is None
                or nxt.after != prev.aid
                or nxt.kind != "append"
                or nxt.lease != op.lease
                or nxt.fence != op.fence
                or nxt.durability != "fsync"
                or nxt.auto_release
                or nxt.call.lane.uid != op.call.lane.uid
                or size + len(nxt.data) > MAX_CHAINED_BYTES
            ):
                break
            rest.append(queue.popleft())
            prev, size = nxt, size + len(nxt.data)
            if nxt.release:
                break
        self.counters["chained_appends"] += len(rest)
        return tuple(rest)

    def written(
        self, op: WriteOp, outcome: WriteOutcome, rest: tuple[WriteOp, ...] = ()
    ) -> list[WriteEffect]:
        """``op``'s ``WriteOut`` was performed: tell the holder of an outside change, answer.

        ``rest``: the ``WriteOut``'s other appends (``chained``), answered in order, each at
        its own offset; if the write failed, none of them is in the file: they go back to the
        front of the queue, where each is refused ``pipeline_broken`` as it comes (``op``,
        the one before it, was not written)."""
        effects = self.adopted(op, outcome)
        reply: ReplyMessage
        if rest and (outcome.error is not None or outcome.moved):
            self.queue.extendleft(reversed(rest))
            self.counters["chained_appends"] -= len(rest)
            rest = ()
        if op.kind == "rewrite" or outcome.error is not None or outcome.moved:
            self.last_written = None  # a pipeline cannot go on past a rewrite or a failure
        if outcome.error is not None:
            reply = self.failed(op, outcome.error)
        elif outcome.moved:
            log.warning("%s of %s refused: %s", op.kind, self.path, moved_detail(self.path))
            moved = FileMoved(moved_detail(self.path), path=self.path)
            reply = Error(
                id=op.call.request.id, code=moved.code, detail=moved.detail, path=self.path
            )
        elif op.kind == "rewrite":
            self.counters["rewrites"] += 1
            reply = Rewritten(id=op.call.request.id, lines=op.lines, fence=op.fence)
        else:
            offset = outcome.offset
            for each in (op, *rest):
                effects += self.appended(each, offset)
                offset += len(each.data)
            return effects
        return effects + self.answer(op, reply)

    def appended(self, op: WriteOp, offset: int) -> list[WriteEffect]:
        """The append ``op`` is in the file at ``offset``: its answer (held for the next sync
        when it is an ``fsync`` one)."""
        fsync = op.durability == "fsync"
        effects: list[WriteEffect] = [Wrote(op.call.lane.uid)] if fsync else []
        if self.sync_each_append:
            effects.append(Sync())  # the baseline benchmarks compare against
        self.counters["appends"] += 1
        self.counters["records"] += op.lines
        self.last_written = (op.lease, op.aid)
        released = True if op.release else None
        offsets = None if op.starts is None else [offset + start for start in op.starts]
        reply = trusted.appended(op.call.request.id, offset, op.lines, op.fence, released, offsets)
        self.remember(op.call, reply)
        if op.release:
            release = self.releasing.release(op.call.lane.uid, op.lease, op.aid, reply)
            if fsync:  # once the sync that makes it durable succeeds
                self.releasing.hold(call_key(op.call), release)
            else:
                effects.append(release)  # before the answer: the next holder's grant first
        return effects + self.answer(op, reply, needs_sync=fsync)

    def answer(
        self, op: WriteOp, reply: ReplyMessage, *, needs_sync: bool = False
    ) -> list[WriteEffect]:
        """The reply to a performed (or refused) write, after its short lease's release."""
        effects: list[WriteEffect] = []
        if op.auto_release:
            effects.append(self.release_short_write(op))
        effects.append(Reply(op.call, reply, needs_sync=needs_sync))
        for copy in self.copies_of(op):
            effects.append(Reply(copy, reply, needs_sync=needs_sync))
        return effects

    def end_drain(self) -> list[WriteEffect]:
        """The queue is empty: sync and release the legacy lock if it was taken."""
        self.draining = False
        if not self.locked:
            return []
        self.locked = False
        # durable before a legacy writer may append after us
        return [Sync(), ReleaseLegacyLock(), Commit()]

    def failed(self, op: WriteOp, exc: Exception) -> Error:
        """The answer to a write that raised: its refusal (a name that became unusable: a
        symlink, a second hard link...), a disk error by name, ``too_many_files``, or
        ``internal`` for a bug (logged with its traceback)."""
        code: ErrorCode
        if isinstance(exc, SessionLaneError):
            # refused again by every later write until the name is a plain file again
            log.warning("%s of %s refused: %s", op.kind, self.path, exc.detail)
            code, detail = exc.code, exc.detail
        elif (disk := disk_error_code(exc)) is not None:
            code, detail = disk, f"{op.kind} of {self.path} failed: {exc}; nothing was written"
        elif is_fd_exhaustion(exc):
            code, detail = "too_many_files", failure_detail(exc)
        else:
            log.error("%s of %s failed", op.kind, self.path, exc_info=exc)
            code, detail = "internal", failure_detail(exc)
        return Error(id=op.call.request.id, code=code, detail=detail, path=self.path)

    def release_short_write(self, op: WriteOp) -> ReleaseWriteLease:
        """Release the short write lease a lease-less append was granted (no reply for it)."""
        self.auto_ids += 1
        release_key = ("auto", self.auto_ids)
        self.auto_releases.add(release_key)
        return ReleaseWriteLease(release_key, op.call.lane.uid, op.lease)

    def fail_queued(self, code: ErrorCode, detail: str) -> list[WriteEffect]:
        """Answer every queued write with this error (the actor exits, the lock is unusable)."""
        effects: list[WriteEffect] = []
        while self.queue:
            op = self.queue.popleft()
            if op.auto_release:
                effects.append(self.release_short_write(op))
            effects.append(self.refused(op.call, code, detail))
            effects += [self.refused(copy, code, detail) for copy in self.copies_of(op)]
        return effects

    def adopted(self, op: WriteOp, outcome: WriteOutcome) -> list[WriteEffect]:
        """Before our write, a change outside sessionlane was adopted: tell the holder."""
        kind = outcome.external
        if kind is None:
            return []
        self.counters["external_changes"] += 1
        lane_uid = op.call.lane.uid
        # Legacy writers appending between our writes is what legacy interop is for.
        level = logging.INFO if self.legacy and kind == "append" else logging.WARNING
        log.log(level, "external %s of %s adopted during lease %s", kind, self.path, op.lease)
        event = ExternalChange(lease=op.lease, path=self.path, kind=kind)
        return [Notify(lane_uid, FileReply(path=self.path, message=event, lane=lane_uid))]

    # Helpers -------------------------------------------------------------------------------

    def duplicate(self, call: LaneCall) -> list[WriteEffect] | None:
        """A re-delivered append's first reply (queued behind it, if held), nothing yet if its
        first copy still waits to be written (it is answered with that one's reply), or None:
        not a duplicate."""
        if call.request.id is None:
            return None
        key = call_key(call)
        copies = self.waiting.get(key)
        if copies is not None:
            self.counters["duplicates"] += 1
            copies.append(call)
            return []
        dup = self.done.get(key)
        if dup is None:
            return None
        self.counters["duplicates"] += 1
        return [Reply(call, dup)]

    def wait_for(self, call: LaneCall) -> None:
        """An append is queued or pending: a copy delivered meanwhile waits for its answer."""
        if call.request.id is not None:
            self.waiting[call_key(call)] = []

    def copies_of(self, op: WriteOp) -> list[LaneCall]:
        """``op`` is answered: the copies of it delivered while it waited (none for a rewrite)."""
        if op.kind != "append" or not self.waiting:
            return []
        return self.waiting.pop(call_key(op.call), [])

    def encode(
        self, call: LaneCall, records: list[Any], offsets: bool = False
    ) -> tuple[bytes, int, tuple[int, ...] | None] | Reply:
        """The records as lines, their number and (``offsets``: asked for) where each line
        starts, or the refusal of records that cannot be written."""
        try:
            lines = encode_lines(records, self.max_record_bytes)
        except SessionLaneError as exc:
            self.counters["invalid_records"] += 1
            return self.refused(call, exc.code, exc.detail)
        return b"".join(lines), len(lines), line_starts(lines) if offsets else None

    def resent_offsets(self, req: Append, offset: int, lines: int) -> list[int] | None:
        """The offsets of the lines of ``req``, an append resent and already written at
        ``offset`` (the lease record keeps no offsets of lines), when it asks for them: its
        records encode to the lines written, none if they are not as many."""
        if not req.offsets:
            return None
        try:
            encoded = encode_lines(req.records, self.max_record_bytes)
        except SessionLaneError:
            return None
        if len(encoded) != lines:
            return None
        return [offset + start for start in line_starts(encoded)]

    def refused(self, call: LaneCall, code: ErrorCode, detail: str) -> Reply:
        return Reply(call, Error(id=call.request.id, code=code, detail=detail, path=self.path))

    def remember(self, call: LaneCall, reply: ReplyMessage) -> None:
        if call.request.id is None:
            return
        self.done[call_key(call)] = reply
        while len(self.done) > _DEDUP_SIZE:
            self.done.popitem(last=False)

    def others_may_join(self, holder_lease: str) -> bool:
        """Is a lease-less append queued under ``holder_lease`` (released once written)?"""
        return any(op.auto_release and op.lease == holder_lease for op in self.queue)
