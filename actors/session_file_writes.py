"""The write path of a SessionFile: accepting writes, the write queue, performing them.

``WritesMixin`` is a part of ``actors.session_file.SessionFile``, not used alone: it shares
the actor's state and reads its clock through ``now()``.

A write under a lease (``append`` with ``lease`` + ``fence``, or ``rewrite``) is checked when
it arrives and again when it is performed; a write that fails the check changes nothing.
Writes without a lease (``append`` with ``lane`` + ``path``) are queued like a short ``write``
lease: the records are validated up front, written when the lease is granted, and the lease is
released right after, so they never interleave with another lane's turn. An append that is
delivered again is answered with its first reply (remembered by lane and request id).

Legacy interop (``legacy_lock``). Every write (and rewrite) goes through a FIFO write queue;
with the legacy lock on, draining it first takes ``<file>.lock`` (never waiting: a live legacy
holder means the queue is retried by ``wakeupAfter`` with backoff), performs the queued writes,
syncs them and releases the lock. Writes that arrive meanwhile queue behind; a queued write is
re-checked against its lease and fence when it is finally performed.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from actors.confined import failure_detail, is_fd_exhaustion
from actors.group_commit import CommitPolicy
from actors.lease_table import Effect, LeaseTable
from actors.legacy_lock import LegacyLock
from actors.transcript import Transcript, encode_records
from messages.errors import ErrorCode, SessionLaneError
from messages.internal import FileReply, FileSettings, LaneCall
from messages.wire import (
    Append,
    Appended,
    Durability,
    Error,
    ExternalChange,
    Purpose,
    Reply,
    Rewrite,
    Rewritten,
)

__all__ = ["WritesMixin"]

log = logging.getLogger(__name__)

_DEDUP_SIZE = 1024
_LEGACY_RETRY_MIN_S = 0.002
_LEGACY_RETRY_MAX_S = 0.05
"""Backoff bounds for retrying a legacy lock held by a live legacy writer."""


@dataclass
class _PendingWrite:
    """A lease-less append waiting for its short write lease."""

    call: LaneCall
    data: bytes
    lines: int
    durability: Durability


@dataclass
class _WriteOp:
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


class WritesMixin:
    """The write path of ``SessionFile``: its queue, its de-duplication, the legacy lock."""

    # What this part uses of the rest of the actor.
    group_commit: ClassVar[bool]
    path: str
    table: LeaseTable | None
    transcript: Transcript | None
    legacy: LegacyLock | None
    tail_unchecked: bool
    counters: dict[str, int]
    unsynced: bool
    batch: CommitPolicy

    if TYPE_CHECKING:

        @property
        def file_settings(self) -> FileSettings: ...
        def now(self) -> float: ...
        def key(self, call: LaneCall) -> Any: ...
        def perform(self, effects: list[Effect]) -> None: ...
        def reply(self, call: LaneCall, message: Reply, *, needs_sync: bool = False) -> None: ...
        def send_lane(self, lane_uid: Any, message: FileReply) -> None: ...
        def sync_now(self) -> None: ...
        def commit(self) -> None: ...
        def wakeupAfter(self, timePeriod: Any, payload: Any = None) -> None: ...

    def init_writes(self) -> None:
        self.pending_writes: dict[Any, _PendingWrite] = {}
        self.auto_releases: set[Any] = set()
        self.done: OrderedDict[Any, Reply] = OrderedDict()  # (lane uid, id) -> append reply
        self.auto_ids = 0
        # Writes, in order; waits only for the legacy lock.
        self.write_queue: deque[_WriteOp] = deque()
        self.in_drain = False
        self.legacy_retry_armed = False
        self.legacy_backoff = _LEGACY_RETRY_MIN_S

    # Accepting writes ----------------------------------------------------------------------

    def write_under_lease(self, call: LaneCall, req: Append) -> None:
        assert self.table is not None and req.lease is not None and req.fence is not None
        if self.answer_duplicate(call):
            return
        refusal = self.table.check_write(call.lane.uid, req.lease, req.fence)
        if refusal is not None:
            code, detail = refusal
            self.reply(call, Error(id=req.id, code=code, detail=detail, path=self.path))
            return
        encoded = self.encode(call, req.records)
        if encoded is None:
            return
        data, lines = encoded
        durability = req.durability or self.file_settings.durability
        self.submit(_WriteOp("append", call, req.lease, req.fence, data, lines, durability))

    def queue_write(self, call: LaneCall, req: Append, now: float) -> list[Effect]:
        assert self.table is not None
        if self.answer_duplicate(call):
            return []
        encoded = self.encode(call, req.records)
        if encoded is None:
            return []
        data, lines = encoded
        durability = req.durability or self.file_settings.durability
        self.pending_writes[self.key(call)] = _PendingWrite(call, data, lines, durability)
        return self.table.acquire(
            self.key(call), call.lane.uid, "write", now, priority=call.lane.priority
        )

    def write_granted(self, req: Any, lease: str, fence: int) -> None:
        """A lease-less append was granted its short write lease: write it (or queue it)."""
        pending = self.pending_writes.pop(req)
        op = _WriteOp(
            "append",
            pending.call,
            lease,
            fence,
            pending.data,
            pending.lines,
            pending.durability,
            auto_release=True,
        )
        self.submit(op)

    def rewrite(self, call: LaneCall, req: Rewrite) -> None:
        assert self.table is not None
        refusal = self.table.check_write(call.lane.uid, req.lease, req.fence, purpose="compaction")
        if refusal is not None:
            code, detail = refusal
            self.reply(call, Error(id=req.id, code=code, detail=detail, path=self.path))
            return
        encoded = self.encode(call, req.records) if req.records else (b"", 0)
        if encoded is None:
            return
        data, lines = encoded
        self.submit(_WriteOp("rewrite", call, req.lease, req.fence, data, lines, "fsync"))

    def answer_duplicate(self, call: LaneCall) -> bool:
        """Answer a re-delivered append with its first reply (queued behind it, if held)."""
        dup = self.done.get(self.key(call))
        if dup is None or call.request.id is None:
            return False
        self.counters["duplicates"] += 1
        self.reply(call, dup)
        return True

    def encode(self, call: LaneCall, records: list[Any]) -> tuple[bytes, int] | None:
        try:
            data = encode_records(records, self.file_settings.max_record_bytes)
        except SessionLaneError as exc:
            self.counters["invalid_records"] += 1
            self.reply(
                call, Error(id=call.request.id, code=exc.code, detail=exc.detail, path=self.path)
            )
            return None
        return data, len(records)

    # Performing writes ---------------------------------------------------------------------

    def submit(self, op: _WriteOp) -> None:
        self.write_queue.append(op)
        self.drain_writes()

    def drain_writes(self) -> None:
        """Perform the queued writes in order, under the legacy lock when configured.

        Re-entrant calls (a write's auto-release granting the next queued write) only queue:
        the outer loop performs them under the same lock.
        """
        if self.in_drain or not self.write_queue:
            return
        self.in_drain = True
        locked = False
        try:
            if self.legacy is not None:
                try:
                    locked = self.legacy.try_acquire()
                except SessionLaneError as exc:  # the directory's path became a symlink...
                    log.warning("cannot take legacy lock %s: %s", self.legacy.path, exc.detail)
                    self.fail_queued_writes(exc.code, exc.detail)
                    return
                except OSError as exc:
                    log.error("cannot take legacy lock %s: %s", self.legacy.path, exc)
                    self.fail_queued_writes("internal", f"legacy lock: {exc}")
                    return
                if not locked:
                    self.retry_legacy_later()
                    return
                self.legacy_backoff = _LEGACY_RETRY_MIN_S
            while self.write_queue:
                self.perform_write(self.write_queue.popleft())
            if locked:
                self.sync_now()  # durable before a legacy writer may append after us
        finally:
            if locked:
                assert self.legacy is not None
                try:
                    self.legacy.release()
                except OSError:
                    log.exception("cannot release legacy lock %s", self.legacy.path)
            self.in_drain = False
        if locked:
            self.commit()

    def retry_legacy_later(self) -> None:
        self.counters["legacy_lock_waits"] += 1
        if self.legacy_retry_armed:
            return
        self.legacy_retry_armed = True
        delay, self.legacy_backoff = (
            self.legacy_backoff,
            min(self.legacy_backoff * 2, _LEGACY_RETRY_MAX_S),
        )
        self.wakeupAfter(delay, payload=("legacy", 0))

    def perform_write(self, op: _WriteOp) -> None:
        assert self.table is not None
        lane = op.call.lane.uid
        purpose: Purpose | None = "compaction" if op.kind == "rewrite" else None
        refusal = self.table.check_write(lane, op.lease, op.fence, purpose=purpose)
        reply: Reply
        needs_sync = False
        if refusal is not None:
            code, detail = refusal
            reply = Error(id=op.call.request.id, code=code, detail=detail, path=self.path)
        else:
            try:
                if op.kind == "rewrite":
                    reply = self.perform_rewrite(op)
                else:
                    reply = self.perform_append(op)
                    needs_sync = op.durability == "fsync"
                    if not self.group_commit:
                        self.sync_now()  # the baseline benchmarks compare against
                    self.remember(op.call, reply)
            except SessionLaneError as exc:
                # The name became unusable (a symlink, a second hard link...): refused, and
                # refused again by every later write until the name is a plain file again.
                log.warning("%s of %s refused: %s", op.kind, self.path, exc.detail)
                reply = Error(
                    id=op.call.request.id, code=exc.code, detail=exc.detail, path=self.path
                )
            except Exception as exc:
                failed: ErrorCode = "too_many_files" if is_fd_exhaustion(exc) else "internal"
                log.exception("%s of %s failed", op.kind, self.path)
                reply = Error(id=op.call.request.id, code=failed, detail=failure_detail(exc))
        if op.auto_release:
            self.release_short_write(op)
        self.reply(op.call, reply, needs_sync=needs_sync)

    def perform_append(self, op: _WriteOp) -> Reply:
        assert self.transcript is not None
        self.adopt_external_change(op.lease, op.call.lane.uid)
        offset = self.transcript.append(op.data)
        if op.durability == "fsync":
            self.unsynced = True
            self.batch.wrote(op.call.lane.uid, self.now())
        self.counters["appends"] += 1
        self.counters["records"] += op.lines
        return Appended(id=op.call.request.id, offset=offset, lines=op.lines, fence=op.fence)

    def perform_rewrite(self, op: _WriteOp) -> Reply:
        assert self.transcript is not None
        self.adopt_external_change(op.lease, op.call.lane.uid)
        self.sync_now()  # what was acknowledged-to-be is durable before the file is replaced
        self.transcript.rewrite(op.data)
        self.counters["rewrites"] += 1
        return Rewritten(id=op.call.request.id, lines=op.lines, fence=op.fence)

    def release_short_write(self, op: _WriteOp) -> None:
        """Release the short write lease a lease-less append was granted (no reply for it)."""
        assert self.table is not None
        self.auto_ids += 1
        release_key = ("auto", self.auto_ids)
        self.auto_releases.add(release_key)
        self.perform(self.table.release(release_key, op.call.lane.uid, op.lease, self.now()))

    def fail_queued_writes(self, code: ErrorCode, detail: str) -> None:
        while self.write_queue:
            op = self.write_queue.popleft()
            error = Error(id=op.call.request.id, code=code, detail=detail, path=self.path)
            if op.auto_release and self.table is not None:
                self.release_short_write(op)
            self.reply(op.call, error)

    def adopt_external_change(self, lease: str, lane_uid: str) -> None:
        """Before our write: adopt what changed outside sessionlane and tell the holder."""
        assert self.transcript is not None
        kind = self.transcript.check_external()
        if self.tail_unchecked:  # left at activation: now we hold the legacy lock
            self.tail_unchecked = False
            self.transcript.repair_torn_tail()
        if kind is None:
            return
        self.counters["external_changes"] += 1
        # Legacy writers appending between our writes is what legacy interop is for.
        level = logging.INFO if self.legacy is not None and kind == "append" else logging.WARNING
        log.log(level, "external %s of %s adopted during lease %s", kind, self.path, lease)
        event = ExternalChange(lease=lease, path=self.path, kind=kind)
        reply = FileReply(path=self.path, message=event, held=lease, lane=lane_uid)
        self.send_lane(lane_uid, reply)

    def remember(self, call: LaneCall, reply: Reply) -> None:
        if call.request.id is None:
            return
        self.done[self.key(call)] = reply
        while len(self.done) > _DEDUP_SIZE:
            self.done.popitem(last=False)
