"""SessionFile: the one actor of one canonical path. Every grant and every write goes through it.

A thin shell: it turns ``LaneCall`` messages into calls on the pure ``LeaseTable``, performs
the effects (durable fence reservations, transcript writes, replies and events to lanes,
wakeups) and nothing else. Writes are checked against the current lease and fence first; a
write that fails the check changes nothing.

Writes without a lease (``append`` with ``lane`` + ``path``) are queued like a short ``write``
lease: the records are validated up front, written when the lease is granted, and the lease is
released right after, so they never interleave with another lane's turn.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from thespian.actors import ActorExitRequest, WakeupMessage

from actors._shell import Handler, ShellActor, monotonic_ms
from actors.fencestore import FenceStore
from actors.lease_table import (
    Abandoned,
    AbortRequest,
    Diagnostic,
    Effect,
    Grant,
    LeasePolicy,
    LeaseTable,
    Queue,
    Reject,
    Released,
    ReserveFences,
    Revoke,
    Skip,
)
from actors.transcript import Transcript, encode_records
from messages.errors import SessionLaneError
from messages.internal import (
    Drain,
    Drained,
    FileInit,
    FileReply,
    FileSettings,
    FileStatusAnswer,
    FileStatusQuery,
    IdleNotice,
    LaneCall,
)
from messages.wire import (
    Abandon,
    AbortRequested,
    Acquire,
    Append,
    Appended,
    Durability,
    Error,
    ExternalChange,
    FileStatus,
    Granted,
    HolderStatus,
    Queued,
    QueueEntry,
    Recover,
    Release,
    Reply,
    Revoked,
    Rewrite,
    Rewritten,
    Skipped,
)
from messages.wire import (
    Abandoned as AbandonedReply,
)
from messages.wire import (
    Released as ReleasedReply,
)

__all__ = ["SessionFile"]

log = logging.getLogger(__name__)

_DEDUP_SIZE = 1024


@dataclass
class _PendingWrite:
    """A lease-less append waiting for its short write lease."""

    call: LaneCall
    data: bytes
    lines: int
    durability: Durability


class SessionFile(ShellActor):
    """Owns one transcript: lease table, fence counter, the open file."""

    log = log

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.path = ""
        self.settings: FileSettings | None = None
        self.table: LeaseTable | None = None
        self.transcript: Transcript | None = None
        self.fences: FenceStore | None = None
        self.registry: Any = None
        self.broken: str | None = None
        self.received = 0
        self.lanes: dict[str, Any] = {}  # lane uid -> Lane address
        self.lane_names: dict[str, str] = {}  # lane uid -> the name its agent gave it
        self.pending_writes: dict[Any, _PendingWrite] = {}
        self.auto_releases: set[Any] = set()
        self.done: OrderedDict[Any, Reply] = OrderedDict()  # (lane uid, id) -> append reply
        self.next_wakeup: float | None = None
        self.auto_ids = 0
        self.counters: dict[str, int] = {
            "appends": 0,
            "records": 0,
            "rewrites": 0,
            "external_changes": 0,
            "duplicates": 0,
            "invalid_records": 0,
        }

    def handlers(self) -> dict[type, Handler]:
        return {
            FileInit: self.on_init,
            LaneCall: self.on_call,
            FileStatusQuery: self.on_status,
            WakeupMessage: self.on_wakeup,
            Drain: self.on_drain,
            ActorExitRequest: self.on_exit,
        }

    # Lifecycle -----------------------------------------------------------------------------

    def on_init(self, msg: FileInit, sender: Any) -> None:
        self.path = msg.path
        self.settings = s = msg.settings
        self.registry = sender
        try:
            self.transcript = Transcript(msg.path, log=log)
            report = self.transcript.open()
            self.fences = FenceStore(msg.path)
            floor = self.fences.load()
        except Exception as exc:  # permission, corrupt fence file, full disk...
            self.broken = f"{type(exc).__name__}: {exc}"
            log.error("cannot open %s: %s", msg.path, self.broken)
            return
        policy = LeasePolicy(
            max_hold_ms=s.max_hold_ms,
            wait_timeout_ms=s.wait_timeout_ms,
            aging_ms=s.aging_ms,
            max_queue=s.max_queue,
        )
        tag = hashlib.sha256(msg.path.encode()).hexdigest()[:8]
        self.table = LeaseTable(msg.path, policy, fence_floor=floor, lease_prefix=f"{tag}-")
        log.info(
            "opened %s (incarnation %d, fence floor %d, size %d, torn bytes %d)",
            msg.path,
            msg.incarnation,
            floor,
            report.size,
            report.torn_bytes,
        )
        self._schedule_idle()

    def on_exit(self, msg: ActorExitRequest, sender: Any) -> None:
        if self.transcript is not None:
            self.transcript.close()

    def on_drain(self, msg: Drain, sender: Any) -> None:
        if self.table is not None:
            self.perform(self.table.shutdown(monotonic_ms()))
        self.send(sender, Drained(files=1))

    # Calls ---------------------------------------------------------------------------------

    def on_call(self, call: LaneCall, sender: Any) -> None:
        self.received += 1
        self.lanes[call.lane.uid] = call.lane.address
        self.lane_names[call.lane.uid] = call.lane.name
        if self.table is None:
            detail = self.broken or "the file actor is not initialised"
            self.reply(call, Error(id=call.request.id, code="unavailable", detail=detail))
            return
        now = monotonic_ms()
        req = call.request
        match req:
            case Acquire():
                effects = self.table.acquire(
                    self.key(call),
                    call.lane.uid,
                    req.purpose,
                    now,
                    priority=req.priority or "interactive",
                    on_contention=req.on_contention,
                    wait_timeout_ms=req.wait_timeout_ms,
                    max_hold_ms=req.max_hold_ms,
                )
            case Release():
                effects = self.table.release(self.key(call), call.lane.uid, req.lease, now)
            case Abandon():
                reason = req.reason or "requested by the lane"
                effects = self.table.abandon(self.key(call), call.lane.uid, now, reason=reason)
            case Recover():
                effects = self.table.recover(
                    self.key(call), call.lane.uid, req.grace_ms, now, reason=req.reason
                )
            case Append() if req.lease is not None:
                effects = []
                self.write_under_lease(call, req)
            case Append():
                effects = self.queue_write(call, req, now)
            case Rewrite():
                effects = []
                self.rewrite(call, req)
        self.perform(effects)

    def on_handler_error(self, msg: Any, sender: Any, exc: Exception) -> None:
        if isinstance(msg, LaneCall):
            detail = f"{type(exc).__name__}: {exc}"
            self.reply(msg, Error(id=msg.request.id, code="internal", detail=detail))

    def key(self, call: LaneCall) -> Any:
        return (call.lane.uid, call.request.id)

    # Writes --------------------------------------------------------------------------------

    def write_under_lease(self, call: LaneCall, req: Append) -> None:
        assert self.table is not None and req.lease is not None and req.fence is not None
        if (dup := self.done.get(self.key(call))) is not None and req.id is not None:
            self.counters["duplicates"] += 1
            self.reply(call, dup)
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
        reply = self.write(call, req.lease, data, lines, req.fence, durability)
        self.remember(call, reply)
        self.reply(call, reply)

    def queue_write(self, call: LaneCall, req: Append, now: float) -> list[Effect]:
        assert self.table is not None
        if (dup := self.done.get(self.key(call))) is not None and req.id is not None:
            self.counters["duplicates"] += 1
            self.reply(call, dup)
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

    def write(
        self, call: LaneCall, lease: str, data: bytes, lines: int, fence: int, dur: Durability
    ) -> Reply:
        assert self.transcript is not None
        self.adopt_external_change(lease, call.lane.uid)
        offset = self.transcript.append(data)
        self.transcript.sync(dur)
        self.counters["appends"] += 1
        self.counters["records"] += lines
        return Appended(id=call.request.id, offset=offset, lines=lines, fence=fence)

    def rewrite(self, call: LaneCall, req: Rewrite) -> None:
        assert self.table is not None and self.transcript is not None
        refusal = self.table.check_write(call.lane.uid, req.lease, req.fence, purpose="compaction")
        if refusal is not None:
            code, detail = refusal
            self.reply(call, Error(id=req.id, code=code, detail=detail, path=self.path))
            return
        encoded = self.encode(call, req.records) if req.records else (b"", 0)
        if encoded is None:
            return
        data, lines = encoded
        self.adopt_external_change(req.lease, call.lane.uid)
        self.transcript.rewrite(data)
        self.counters["rewrites"] += 1
        self.reply(call, Rewritten(id=req.id, lines=lines, fence=req.fence))

    def adopt_external_change(self, lease: str, lane_uid: str) -> None:
        """Before our write: adopt what changed outside sessionlane and tell the holder."""
        assert self.transcript is not None
        kind = self.transcript.check_external()
        if kind is None:
            return
        self.counters["external_changes"] += 1
        log.warning("external %s of %s adopted during lease %s", kind, self.path, lease)
        event = ExternalChange(lease=lease, path=self.path, kind=kind)
        self.send_lane(lane_uid, FileReply(path=self.path, message=event, held=lease))

    def remember(self, call: LaneCall, reply: Reply) -> None:
        if call.request.id is None:
            return
        self.done[self.key(call)] = reply
        while len(self.done) > _DEDUP_SIZE:
            self.done.popitem(last=False)

    # Effects -------------------------------------------------------------------------------

    def perform(self, effects: list[Effect]) -> None:
        """Carry out the table's effects, in order (a fence reservation before its grant)."""
        assert self.table is not None
        for fx in effects:
            match fx:
                case ReserveFences(ceiling=ceiling):
                    assert self.fences is not None
                    self.fences.reserve(ceiling)
                case Grant() if fx.req in self.pending_writes:
                    self.perform_queued_write(fx)
                case Grant():
                    self.answer(
                        fx.req,
                        fx.lane,
                        Granted(lease=fx.lease, fence=fx.fence, path=self.path, purpose=fx.purpose),
                    )
                case Queue() if fx.req in self.pending_writes:
                    pass  # a short write answers once, with `appended`
                case Queue():
                    self.answer(fx.req, fx.lane, Queued(position=fx.position))
                case Skip():
                    self.answer(fx.req, fx.lane, Skipped(path=self.path))
                case Reject():
                    self.pending_writes.pop(fx.req, None)
                    self.answer(
                        fx.req, fx.lane, Error(code=fx.code, detail=fx.detail, path=self.path)
                    )
                case Released() if fx.req in self.auto_releases:
                    self.auto_releases.discard(fx.req)
                case Released():
                    self.answer(fx.req, fx.lane, ReleasedReply(lease=fx.lease))
                case Abandoned():
                    self.answer(fx.req, fx.lane, AbandonedReply(leases=list(fx.leases)))
                case Revoke():
                    event = Revoked(lease=fx.lease, path=self.path, reason=fx.reason)
                    self.send_lane(fx.lane, FileReply(path=self.path, message=event))
                case AbortRequest():
                    event = AbortRequested(lease=fx.lease, path=self.path, grace_ms=fx.grace_ms)
                    self.send_lane(fx.lane, FileReply(path=self.path, message=event, held=fx.lease))
                case Diagnostic(message=message):
                    log.warning(message)
        self.schedule()

    def perform_queued_write(self, grant: Grant) -> None:
        assert self.table is not None
        pending = self.pending_writes.pop(grant.req)
        try:
            reply = self.write(
                pending.call,
                grant.lease,
                pending.data,
                pending.lines,
                grant.fence,
                pending.durability,
            )
        except Exception as exc:
            log.exception("short write to %s failed", self.path)
            reply = Error(id=pending.call.request.id, code="internal", detail=str(exc))
        else:
            self.remember(pending.call, reply)
        self.auto_ids += 1
        release_key = ("auto", self.auto_ids)
        self.auto_releases.add(release_key)
        self.perform(self.table.release(release_key, grant.lane, grant.lease, monotonic_ms()))
        self.reply(pending.call, reply)

    def answer(self, req: Any, lane_uid: Any, message: Reply) -> None:
        _, rid = req
        self.send_lane(
            lane_uid,
            FileReply(
                path=self.path,
                message=message.model_copy(update={"id": rid}),
                held=self.held(lane_uid),
            ),
        )

    def reply(self, call: LaneCall, message: Reply) -> None:
        self.send(
            call.lane.address,
            FileReply(path=self.path, message=message, held=self.held(call.lane.uid)),
        )

    def held(self, lane_uid: Any) -> str | None:
        holder = self.table.held_by(lane_uid) if self.table is not None else None
        return holder.lease if holder is not None else None

    def send_lane(self, lane_uid: Any, message: FileReply) -> None:
        address = self.lanes.get(lane_uid)
        if address is not None:
            self.send(address, message)

    # Timers --------------------------------------------------------------------------------

    def schedule(self) -> None:
        assert self.table is not None
        due = self.table.next_deadline()
        if due is not None and (self.next_wakeup is None or due < self.next_wakeup):
            self.next_wakeup = due
            delay_s = max(0.0, due - monotonic_ms()) / 1000.0
            self.wakeupAfter(delay_s, payload=("tick", due))
        if self.table.idle() and not self.pending_writes:
            self._schedule_idle()

    def _schedule_idle(self) -> None:
        self.wakeupAfter(self.file_settings.idle_ms / 1000.0, payload=("idle", self.received))

    def on_wakeup(self, msg: WakeupMessage, sender: Any) -> None:
        if self.table is None or not isinstance(msg.payload, tuple):
            return
        what, value = msg.payload
        if what == "tick":
            if self.next_wakeup is not None and value >= self.next_wakeup:
                self.next_wakeup = None
            self.perform(self.table.tick(monotonic_ms()))
        elif what == "idle" and value == self.received and self.table.idle():
            self.send(self.registry, IdleNotice(path=self.path, received=self.received))

    # Status --------------------------------------------------------------------------------

    def on_status(self, msg: FileStatusQuery, sender: Any) -> None:
        self.received += 1
        self.send(sender, FileStatusAnswer(query=msg.query, status=self.status()))

    def status(self) -> FileStatus:
        if self.table is None:
            return FileStatus(
                path=self.path, fence=0, holder=None, queue=[], counters={"broken": 1}
            )
        now = monotonic_ms()
        t = self.table
        holder = None
        if t.holder is not None:
            holder = HolderStatus(
                lane=self.lane_name(t.holder.lane),
                lease=t.holder.lease,
                purpose=t.holder.purpose,
                held_ms=int(now - t.holder.granted_at),
            )
        queue = [
            QueueEntry(
                lane=self.lane_name(w.lane),
                purpose=w.purpose,
                priority=w.priority,
                waited_ms=int(now - w.enqueued_at),
            )
            for w in t.order(now)
        ]
        counters = {**t.counters, **self.counters}
        if self.transcript is not None:
            counters["syncs"] = self.transcript.sync_count
            counters["size"] = self.transcript.size
        return FileStatus(
            path=self.path, fence=t.fence, holder=holder, queue=queue, counters=counters
        )

    def lane_name(self, uid: Any) -> str:
        return self.lane_names.get(uid, str(uid))

    @property
    def file_settings(self) -> FileSettings:
        assert self.settings is not None
        return self.settings
