"""The write path of a SessionFile: accepting writes, the write queue, performing them.

``WritePath`` is a part of ``sessionlane.actors.session_file.SessionFile`` with its own state; like
``LeaseTable`` it returns effects (``Reply``, ``Notify``, ``TableEffects``, ``Wrote``,
``Commit``) that the actor performs in order, and it is tested without an actor
(``tests/test_write_path.py``). It does the transcript I/O itself (appends, rewrites, the
legacy lock): the effects are what the rest of the actor must do about them.

A write under a lease (``append`` with ``lease`` + ``fence``, or ``rewrite``) is checked when
it arrives and again when it is performed; a write that fails the check changes nothing.
Writes without a lease (``append`` with ``lane`` + ``path``) are queued like a short ``write``
lease: the records are validated up front, written when the lease is granted, and the lease is
released right after, so they never interleave with another lane's turn. An append that is
delivered again is answered with its first reply (remembered by lane and request id).

Legacy interop (``legacy_lock``). Every write (and rewrite) goes through a FIFO write queue;
with the legacy lock on, draining it first takes ``<file>.lock`` (never waiting: a live legacy
holder means the queue is retried later, with backoff: ``retry_after``), performs the queued
writes, syncs them and releases the lock. Writes that arrive meanwhile queue behind; a queued
write is re-checked against its lease and fence when it is finally performed. A torn last line
seen at activation while a legacy writer held the lock is repaired by the first write under
the lock (it may have been that writer's line in progress).

The drain is driven by the actor, one write at a time (``begin_drain``, ``next_write``,
``end_drain``), because a write's effects can grant the next queued lease-less append: the
actor performs them between two writes, and the append granted so joins the same drain, under
the same lock.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from sessionlane.actors.confined import failure_detail, is_fd_exhaustion
from sessionlane.actors.disk_errors import disk_error_code
from sessionlane.actors.lease_table import Effect, LeaseTable
from sessionlane.actors.legacy_lock import LegacyLock
from sessionlane.actors.session_file_commit import TranscriptSync, moved_detail
from sessionlane.actors.transcript import Transcript, encode_records
from sessionlane.messages.errors import ErrorCode, FileMoved, SessionLaneError
from sessionlane.messages.internal import FileReply, LaneCall
from sessionlane.messages.wire import (
    Append,
    Appended,
    Durability,
    Error,
    ExternalChange,
    Purpose,
    Rewrite,
    Rewritten,
)
from sessionlane.messages.wire import Reply as ReplyMessage

__all__ = [
    "Commit",
    "Notify",
    "Reply",
    "TableEffects",
    "WriteEffect",
    "WritePath",
    "Wrote",
    "call_key",
]

log = logging.getLogger(__name__)

_DEDUP_SIZE = 1024
LEGACY_RETRY_MIN_S = 0.002
LEGACY_RETRY_MAX_S = 0.05
"""Backoff bounds for retrying a legacy lock held by a live legacy writer."""


def call_key(call: LaneCall) -> tuple[Any, Any]:
    """The lease table's request key of a call: (lane uid, request id)."""
    return (call.lane.uid, call.request.id)


# Effects ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer ``call`` with ``message``; ``needs_sync``: only once an fdatasync covers it."""

    call: LaneCall
    message: ReplyMessage
    needs_sync: bool = False


@dataclass(frozen=True, slots=True)
class Notify:
    """Send ``message`` (an event such as ``ExternalChange``) to the lane ``lane``."""

    lane: str
    message: FileReply


@dataclass(frozen=True, slots=True)
class TableEffects:
    """Perform these effects of the lease table (a short write lease asked for or released)."""

    effects: list[Effect]


@dataclass(frozen=True, slots=True)
class Wrote:
    """An ``fsync`` append of ``lane`` was written: its acknowledgement waits for a sync."""

    lane: str


@dataclass(frozen=True, slots=True)
class Commit:
    """Sync and send what is held now (a drain under the legacy lock made the writes durable)."""


WriteEffect = Reply | Notify | TableEffects | Wrote | Commit


# State --------------------------------------------------------------------------------------


@dataclass
class _PendingWrite:
    """A lease-less append waiting for its short write lease."""

    call: LaneCall
    data: bytes
    lines: int
    durability: Durability


@dataclass
class WriteOp:
    """A write accepted for the file: performed at once, or once the legacy lock is free."""

    kind: Literal["append", "rewrite"]
    call: LaneCall
    lease: str
    fence: int
    data: bytes
    lines: int
    durability: Durability
    auto_release: bool = False
    """A lease-less append: release its short write lease once written."""


class WritePath:
    """The write path of one open transcript: its queue, its de-duplication, the legacy lock.

    ``sync`` is told of every fsync append written, and makes them durable when the write
    path needs it (before a rewrite, before the legacy lock is released); ``clock`` is the
    actor's clock (ms).
    """

    def __init__(
        self,
        path: str,
        table: LeaseTable,
        transcript: Transcript,
        *,
        legacy: LegacyLock | None,
        tail_unchecked: bool,
        durability: Durability,
        max_record_bytes: int,
        sync: TranscriptSync,
        clock: Callable[[], float],
        sync_each_append: bool = False,
    ) -> None:
        self.path = path
        self.table = table
        self.transcript = transcript
        self.legacy = legacy
        self.tail_unchecked = tail_unchecked
        """A torn last line seen at activation was left for the first write under the
        legacy lock to repair (it may have been a legacy writer's line in progress)."""
        self.durability = durability
        self.max_record_bytes = max_record_bytes
        self.sync = sync
        self.clock = clock
        self.sync_each_append = sync_each_append
        """No group commit: sync every append before answering it (the benchmarks' baseline)."""
        self.pending: dict[Any, _PendingWrite] = {}
        self.auto_releases: set[Any] = set()
        self.done: OrderedDict[Any, ReplyMessage] = OrderedDict()  # call key -> append reply
        self.auto_ids = 0
        self.queue: deque[WriteOp] = deque()  # in order; waits only for the legacy lock
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
        }

    # Accepting writes ----------------------------------------------------------------------

    def append_under_lease(self, call: LaneCall, req: Append) -> list[WriteEffect]:
        """An append with ``lease`` + ``fence``: refused, a duplicate, or queued to write."""
        assert req.lease is not None and req.fence is not None  # the caller's match says so
        if (dup := self.duplicate(call)) is not None:
            return dup
        refusal = self.table.check_write(call.lane.uid, req.lease, req.fence)
        if refusal is not None:
            return [self.refused(call, *refusal)]
        encoded = self.encode(call, req.records)
        if isinstance(encoded, Reply):
            return [encoded]
        data, lines = encoded
        durability = req.durability or self.durability
        self.queue.append(WriteOp("append", call, req.lease, req.fence, data, lines, durability))
        return []

    def append_without_lease(self, call: LaneCall, req: Append, now: float) -> list[WriteEffect]:
        """A lease-less append: validated now, written once its short write lease is granted."""
        if (dup := self.duplicate(call)) is not None:
            return dup
        encoded = self.encode(call, req.records)
        if isinstance(encoded, Reply):
            return [encoded]
        data, lines = encoded
        key = call_key(call)
        self.pending[key] = _PendingWrite(call, data, lines, req.durability or self.durability)
        effects = self.table.acquire(key, call.lane.uid, "write", now, priority=call.lane.priority)
        return [TableEffects(effects)]

    def rewrite(self, call: LaneCall, req: Rewrite) -> list[WriteEffect]:
        """A rewrite under a compaction lease: refused, or queued to write."""
        refusal = self.table.check_write(call.lane.uid, req.lease, req.fence, purpose="compaction")
        if refusal is not None:
            return [self.refused(call, *refusal)]
        encoded = self.encode(call, req.records) if req.records else (b"", 0)
        if isinstance(encoded, Reply):
            return [encoded]
        data, lines = encoded
        self.queue.append(WriteOp("rewrite", call, req.lease, req.fence, data, lines, "fsync"))
        return []

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
            )
        )

    def rejected(self, req: Any) -> None:
        """The table refused ``req`` (the queue is full...): no write will follow."""
        self.pending.pop(req, None)

    def released_silently(self, req: Any) -> bool:
        """Was ``req`` the release of a short write lease (answered by nobody)? Forgets it."""
        if req in self.auto_releases:
            self.auto_releases.discard(req)
            return True
        return False

    def forget(self, key: Any) -> None:
        """The acknowledgement of ``key`` turned into an error: a retry must write again."""
        self.done.pop(key, None)

    # Performing writes ---------------------------------------------------------------------

    def may_drain(self) -> bool:
        """Are there writes to perform, and no drain in progress (that would take them)?"""
        return bool(self.queue) and not self.draining

    def begin_drain(self) -> list[WriteEffect] | None:
        """Start performing the queue: None when the writes may go (lock taken if configured).

        Otherwise the effects of not draining now (every queued write failed: the lock file
        cannot be used); a live legacy holder leaves the queue as it is, ``retry_after``
        says when to try again.
        """
        if self.legacy is not None:
            try:
                # A drop-in holder keeps <file>.lock for its lease: its writes go under it.
                self.locked = self.legacy.try_acquire(lease=self.queue[0].lease)
            except SessionLaneError as exc:  # the directory's path became a symlink...
                log.warning("cannot take legacy lock %s: %s", self.legacy.path, exc.detail)
                return self.fail_queued(exc.code, exc.detail)
            except OSError as exc:
                log.error("cannot take legacy lock %s: %s", self.legacy.path, exc)
                return self.fail_queued("internal", f"legacy lock: {exc}")
            if not self.locked:
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
        """Perform the next queued write: its effects, or None when the queue is empty."""
        if not self.queue:
            return None
        return self.perform(self.queue.popleft())

    def end_drain(self) -> list[WriteEffect]:
        """The queue is empty: sync and release the legacy lock if it was taken."""
        self.draining = False
        if not self.locked:
            return []
        assert self.legacy is not None  # ``locked`` only ever comes from it
        self.locked = False
        try:
            self.sync.sync_now()  # durable before a legacy writer may append after us
        finally:
            try:
                self.legacy.release()
            except OSError:
                log.exception("cannot release legacy lock %s", self.legacy.path)
        return [Commit()]

    def perform(self, op: WriteOp) -> list[WriteEffect]:
        """Re-check ``op`` against the current lease and fence, then write it (or refuse)."""
        purpose: Purpose | None = "compaction" if op.kind == "rewrite" else None
        refusal = self.table.check_write(op.call.lane.uid, op.lease, op.fence, purpose=purpose)
        effects: list[WriteEffect] = []
        needs_sync = False
        reply: ReplyMessage
        if refusal is not None:
            reply = self.refused(op.call, *refusal).message
        else:
            try:
                if op.kind == "rewrite":
                    reply = self.perform_rewrite(op, effects)
                else:
                    reply = self.perform_append(op, effects)
                    needs_sync = op.durability == "fsync"
                    self.remember(op.call, reply)
            except SessionLaneError as exc:
                # The name became unusable (a symlink, a second hard link...): refused, and
                # refused again by every later write until the name is a plain file again.
                log.warning("%s of %s refused: %s", op.kind, self.path, exc.detail)
                reply = Error(
                    id=op.call.request.id, code=exc.code, detail=exc.detail, path=self.path
                )
            except Exception as exc:
                reply = self.failed(op, exc)
        if op.auto_release:
            effects.append(self.release_short_write(op))
        effects.append(Reply(op.call, reply, needs_sync=needs_sync))
        return effects

    def failed(self, op: WriteOp, exc: Exception) -> Error:
        """The answer to a write that raised: a disk error by name (logged once per episode),
        ``too_many_files``, or ``internal`` for a bug (logged with its traceback)."""
        code: ErrorCode
        disk = disk_error_code(exc)
        if disk is not None:
            self.sync.disk.failed(disk, op.kind, exc)
            code, detail = disk, f"{op.kind} of {self.path} failed: {exc}; nothing was written"
        elif is_fd_exhaustion(exc):
            code, detail = "too_many_files", failure_detail(exc)
        else:
            log.exception("%s of %s failed", op.kind, self.path)
            code, detail = "internal", failure_detail(exc)
        return Error(id=op.call.request.id, code=code, detail=detail, path=self.path)

    def perform_append(self, op: WriteOp, effects: list[WriteEffect]) -> ReplyMessage:
        effects.extend(self.adopt_external_change(op.lease, op.call.lane.uid))
        offset = self.transcript.append(op.data)
        if op.durability == "fsync":
            self.sync.wrote()
            effects.append(Wrote(op.call.lane.uid))
        else:  # acknowledged now: the bytes must have gone to the file at the path
            if not self.transcript.still_at_path():
                self.sync.moved += 1
                raise FileMoved(moved_detail(self.path), path=self.path)
            self.sync.disk.succeeded()
        if self.sync_each_append:
            self.sync.sync_now()  # the baseline benchmarks compare against
        self.counters["appends"] += 1
        self.counters["records"] += op.lines
        return Appended(id=op.call.request.id, offset=offset, lines=op.lines, fence=op.fence)

    def perform_rewrite(self, op: WriteOp, effects: list[WriteEffect]) -> ReplyMessage:
        effects.extend(self.adopt_external_change(op.lease, op.call.lane.uid))
        self.sync.sync_now()  # what was acknowledged-to-be is durable before the file is replaced
        self.transcript.rewrite(op.data)
        if not self.transcript.still_at_path():  # the new file must be the one at the path
            self.sync.moved += 1
            raise FileMoved(moved_detail(self.path), path=self.path)
        self.counters["rewrites"] += 1
        return Rewritten(id=op.call.request.id, lines=op.lines, fence=op.fence)

    def release_short_write(self, op: WriteOp) -> TableEffects:
        """Release the short write lease a lease-less append was granted (no reply for it)."""
        self.auto_ids += 1
        release_key = ("auto", self.auto_ids)
        self.auto_releases.add(release_key)
        return TableEffects(
            self.table.release(release_key, op.call.lane.uid, op.lease, self.clock())
        )

    def fail_queued(self, code: ErrorCode, detail: str) -> list[WriteEffect]:
        """Answer every queued write with this error (the actor exits, the lock is unusable)."""
        effects: list[WriteEffect] = []
        while self.queue:
            op = self.queue.popleft()
            if op.auto_release:
                effects.append(self.release_short_write(op))
            effects.append(self.refused(op.call, code, detail))
        return effects

    def adopt_external_change(self, lease: str, lane_uid: str) -> list[WriteEffect]:
        """Before our write: adopt what changed outside sessionlane and tell the holder."""
        kind = self.transcript.check_external()
        if self.tail_unchecked:  # left at activation: now we hold the legacy lock
            self.tail_unchecked = False
            self.transcript.repair_torn_tail()
        if kind is None:
            return []
        self.counters["external_changes"] += 1
        # Legacy writers appending between our writes is what legacy interop is for.
        level = logging.INFO if self.legacy is not None and kind == "append" else logging.WARNING
        log.log(level, "external %s of %s adopted during lease %s", kind, self.path, lease)
        event = ExternalChange(lease=lease, path=self.path, kind=kind)
        return [Notify(lane_uid, FileReply(path=self.path, message=event, lane=lane_uid))]

    # Helpers -------------------------------------------------------------------------------

    def duplicate(self, call: LaneCall) -> list[WriteEffect] | None:
        """A re-delivered append's first reply (queued behind it, if held), or None."""
        dup = self.done.get(call_key(call))
        if dup is None or call.request.id is None:
            return None
        self.counters["duplicates"] += 1
        return [Reply(call, dup)]

    def encode(self, call: LaneCall, records: list[Any]) -> tuple[bytes, int] | Reply:
        """The records as lines, or the refusal of records that cannot be written."""
        try:
            data = encode_records(records, self.max_record_bytes)
        except SessionLaneError as exc:
            self.counters["invalid_records"] += 1
            return self.refused(call, exc.code, exc.detail)
        return data, len(records)

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
