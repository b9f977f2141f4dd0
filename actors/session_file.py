"""SessionFile: the one actor of one canonical path. Every grant and every write goes through it.

A thin shell: it turns ``LaneCall`` messages into calls on the pure ``LeaseTable``, performs
the effects (durable fence reservations, transcript writes, replies and events to lanes,
wakeups) and nothing else. Writes are checked against the current lease and fence when they
are performed; a write that fails the check changes nothing.

Writes without a lease (``append`` with ``lane`` + ``path``) are queued like a short ``write``
lease: the records are validated up front, written when the lease is granted, and the lease is
released right after, so they never interleave with another lane's turn.

Group commit. An append is written at once but acknowledged only once durable: with
``durability="fsync"`` its reply is held in an ``Outbox`` until an fdatasync covers it, and
every later message to that lane queues behind it, so each lane sees its replies and events in
order. While replies are held, ``receiveMessage`` returns a ``ThespianWatch`` on a pipe that is
always readable: the transport's next ``select`` returns at once, together with every socket
that already has data; it delivers those messages and then our ``WatchMessage``, the end of
the pass. There ``CommitPolicy`` decides: sync now (a lone writer never waits), one more pass
(more appends just arrived), or wait with a timer for an expected sibling writer (a lane that
appended recently and is not in the batch), bounded by twice the usual gap between appends.
Why not peek at the mailbox or ``wakeupAfter(0)``: every call reaches this actor through the
Registry, and thespian sends one message per sender/target pair at a time, each after the
previous one's ACK, so the transport never holds more than one unread call (measured), and a
zero wakeup runs before the next ``select``; both batch nothing. Bases without watch support
(``simpleSystemBase``) sync after each message.

Channels. The gateway reaches a file over a direct channel (``messages.channel``) instead of
the actor chain: it asks through the Registry (``OpenChannel``, counted like a call), and the
file answers with a ``ChannelOffer`` naming its ``ChannelServer`` (``actors.file_channels``),
opened on the first such request. Channel calls run through exactly the code of a
``LaneCall``, with the connection (a ``ChannelRef``) as the lane's address; every message to
such a lane becomes a reply frame on that connection, queued, and written once at the end of
the actor's turn. They are not counted in ``received`` (that number is compared with what
the Registry forwarded), so an open channel keeps the file from asking to be passivated, and
a channel that closes abandons its lanes' leases and requests. The server's sockets are
watched always; the always-readable pipe only while a pass is being ended (see above).

Passivation. One idle timer at a time fires ``idle_ms`` after the last call of any route; a
file quiet with no channel then sends ``IdleNotice`` and refuses new channels until a message
from the Registry says it is not retired after all.

Legacy interop (``legacy_lock``). Every write (and rewrite) goes through a FIFO write queue;
with the legacy lock on, draining it first takes ``<file>.lock`` (never waiting: a live legacy
holder means the queue is retried by ``wakeupAfter`` with backoff), performs the queued writes,
syncs them and releases the lock. Writes that arrive meanwhile queue behind; a queued write is
re-checked against its lease and fence when it is finally performed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from thespian.actors import ActorExitRequest, ThespianWatch, WakeupMessage, WatchMessage

from actors._shell import Handler, ShellActor, monotonic_ms
from actors.fencestore import FenceStore
from actors.file_channels import ChannelCallEvent, ChannelClosed, ChannelRef, ChannelServer
from actors.group_commit import CommitPolicy, Outbox, Outgoing
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
from actors.legacy_lock import LegacyLock
from actors.transcript import Transcript, encode_records
from messages.channel import reply_frame
from messages.errors import ErrorCode, SessionLaneError
from messages.internal import (
    ChannelOffer,
    Drain,
    Drained,
    FileInit,
    FileReply,
    FileSettings,
    FileStatusAnswer,
    FileStatusQuery,
    IdleNotice,
    LaneCall,
    LaneRef,
    OpenChannel,
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
    Purpose,
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
_FLUSH_RETRY_S = 0.002
"""How soon channel output a full socket buffer refused is written again."""
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


class SessionFile(ShellActor):
    """Owns one transcript: lease table, fence counter, the open file."""

    log = log

    group_commit: ClassVar[bool] = True
    """Benchmarks set this to False (before the actor system forks) to sync every append."""
    channels: ClassVar[bool] = True
    """Benchmarks set this to False (before the actor system forks) to measure the actor route:
    every ``OpenChannel`` is then answered without an address."""

    def __init__(self, capabilities: dict[str, Any] | None = None, *args: Any, **kwargs: Any):
        # thespian passes ``capabilities`` by name only to a positional-or-keyword parameter.
        super().__init__(*args, **kwargs)
        self.watch_supported = bool((capabilities or {}).get("Thespian Watch Supported"))
        self.path = ""
        self.settings: FileSettings | None = None
        self.table: LeaseTable | None = None
        self.transcript: Transcript | None = None
        self.fences: FenceStore | None = None
        self.legacy: LegacyLock | None = None
        self.registry: Any = None
        self.broken: str | None = None
        self.incarnation = 0
        self.received = 0  # messages the Registry forwarded (compared in its passivation check)
        self.activity = 0  # calls of any route, for the idle timer
        self.last_active = 0.0
        self.idle_armed = False
        self.retiring = False  # IdleNotice sent; cleared by the next message from the Registry
        # Channels: see the module docstring.
        self.server: ChannelServer | None = None
        self.flush_armed = False
        self.closed_channels = 0
        self.lanes: dict[str, Any] = {}  # lane uid -> Lane address
        self.lane_names: dict[str, str] = {}  # lane uid -> the name its agent gave it
        self.pending_writes: dict[Any, _PendingWrite] = {}
        self.auto_releases: set[Any] = set()
        self.done: OrderedDict[Any, Reply] = OrderedDict()  # (lane uid, id) -> append reply
        self.next_wakeup: float | None = None
        self.auto_ids = 0
        # Group commit: see the module docstring.
        self.outbox = Outbox()
        self.unsynced = False  # an fsync append was written and no fdatasync covers it yet
        self.sync_error: str | None = None
        self.batch = CommitPolicy()
        self.commit_wakeup: float | None = None  # the earliest pending ("commit", due) wakeup
        self.phase: Literal["idle", "pass", "wait"] = "idle"
        self.ready_fd: int | None = None
        # Writes, in order; waits only for the legacy lock.
        self.write_queue: deque[_WriteOp] = deque()
        self.in_drain = False
        self.legacy_retry_armed = False
        self.legacy_backoff = _LEGACY_RETRY_MIN_S
        self.counters: dict[str, int] = {
            "appends": 0,
            "records": 0,
            "rewrites": 0,
            "external_changes": 0,
            "duplicates": 0,
            "invalid_records": 0,
            "commits": 0,
            "fence_reservations": 0,
            "legacy_lock_waits": 0,
            "channel_calls": 0,
        }

    def handlers(self) -> dict[type, Handler]:
        return {
            FileInit: self.on_init,
            LaneCall: self.on_call,
            OpenChannel: self.on_open_channel,
            FileStatusQuery: self.on_status,
            WakeupMessage: self.on_wakeup,
            WatchMessage: self.on_watch,
            Drain: self.on_drain,
            ActorExitRequest: self.on_exit,
        }

    def receiveMessage(self, msg: Any, sender: Any) -> ThespianWatch | None:
        super().receiveMessage(msg, sender)
        if isinstance(msg, ActorExitRequest):
            return None
        return self.end_turn()

    def end_turn(self) -> ThespianWatch | None:
        """After every message: group commit, then one write of the channels' output.

        Channels the write found closed are handled here (their lanes abandoned), and the
        commit logic runs again for what that changed.
        """
        while True:
            try:
                pass_end = self.after_message()
            except Exception:
                log.exception("group commit of %s failed", self.path)
                pass_end = False
            closed = self.flush_channels()
            if not closed:
                return self.watch(pass_end)
            for event in closed:
                self.on_channel_closed(event)

    def watch(self, pass_end: bool) -> ThespianWatch | None:
        """The fds thespian should watch until the next message: channels, pass end."""
        fds = self.server.fds() if self.server is not None else []
        if pass_end and self.ready_fd is not None:
            fds.append(self.ready_fd)
        return ThespianWatch(fds) if fds else None

    # Lifecycle -----------------------------------------------------------------------------

    def on_init(self, msg: FileInit, sender: Any) -> None:
        self.path = msg.path
        self.settings = s = msg.settings
        self.registry = sender
        self.incarnation = msg.incarnation
        self.last_active = monotonic_ms()
        try:
            self.transcript = Transcript(msg.path, log=log)
            report = self.transcript.open()
            self.fences = FenceStore(msg.path)
            floor = self.fences.load()
        except Exception as exc:  # permission, corrupt fence file, full disk...
            self.broken = f"{type(exc).__name__}: {exc}"
            log.error("cannot open %s: %s", msg.path, self.broken)
            return
        if s.legacy_lock:
            self.legacy = LegacyLock(msg.path)
        if self.watch_supported and self.group_commit:
            self.ready_fd = _always_readable_fd()
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
        self.fail_queued_writes("unavailable", "the file's actor is exiting")
        self.commit()
        if self.server is not None:
            with contextlib.suppress(OSError):
                self.server.flush()  # best effort: the last replies of a passivated file
            self.server.close()
            self.server = None
        if self.transcript is not None:
            self.transcript.close()
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None

    def on_drain(self, msg: Drain, sender: Any) -> None:
        self.commit()
        if self.table is not None:
            self.perform(self.table.shutdown(monotonic_ms()))
        self.fail_queued_writes("shutting_down", "the service is stopping")
        self.commit()
        self.send(sender, Drained(files=1))

    # Calls ---------------------------------------------------------------------------------

    def on_call(self, call: LaneCall, sender: Any) -> None:
        self.from_registry()
        self.serve(call)

    def from_registry(self) -> None:
        """Count a message the Registry forwarded (and counted); it cancels a retirement."""
        self.received += 1
        self.touch()
        if self.retiring:
            # The Registry now counts more than our IdleNotice said: it will not retire us.
            self.retiring = False
            if self.server is not None:
                self.server.accepting = True
            self._schedule_idle()

    def touch(self) -> None:
        self.activity += 1
        self.last_active = monotonic_ms()

    def serve(self, call: LaneCall) -> None:
        """One call, from the Registry or from a channel: lease table, writes, replies."""
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

    # Channels ------------------------------------------------------------------------------

    def on_open_channel(self, msg: OpenChannel, sender: Any) -> None:
        self.from_registry()
        reply_to = msg.reply_to if msg.reply_to is not None else sender
        server, reason = self.channel_server()
        canonical = self.path or None
        if server is None:
            offer = ChannelOffer(path=msg.path, nonce=msg.nonce, canonical=canonical, reason=reason)
        else:
            offer = ChannelOffer(
                path=msg.path,
                nonce=msg.nonce,
                canonical=canonical,
                address=server.address,
                token=server.token,
                incarnation=self.incarnation,
            )
        self.send(reply_to, offer)

    def channel_server(self) -> tuple[ChannelServer | None, str]:
        """The channel listener, opened on first use, or None and why there is none."""
        if self.server is not None:
            return self.server, ""
        if self.table is None:
            return None, self.broken or "the file actor is not initialised"
        if not self.watch_supported:
            return None, "this actor system cannot watch sockets"
        if not self.channels:
            return None, "channels are turned off"
        try:
            self.server = ChannelServer.open(self.path, self.incarnation)
        except OSError as exc:
            log.error("cannot open a channel listener for %s: %s", self.path, exc)
            return None, f"cannot open a channel listener: {exc}"
        self.server.accepting = not self.retiring
        return self.server, ""

    def on_watch(self, msg: WatchMessage, sender: Any) -> None:
        """Channel sockets first (their calls join this pass), then the end of the pass."""
        if self.server is not None:
            for event in self.server.on_ready(msg.ready):
                if isinstance(event, ChannelCallEvent):
                    self.on_channel_call(event)
                else:
                    self.on_channel_closed(event)
        if self.ready_fd is not None and self.ready_fd in msg.ready:
            self.on_pass_end()

    def on_channel_call(self, event: ChannelCallEvent) -> None:
        """A call on a channel: served like a ``LaneCall`` but not counted in ``received``."""
        c = event.call
        lane = LaneRef(uid=c.uid, name=c.name, address=event.conn, priority=c.priority)
        call = LaneCall(lane=lane, path=self.path, canonical=True, request=c.request)
        self.counters["channel_calls"] += 1
        self.touch()
        try:
            self.serve(call)
        except Exception as exc:
            log.exception("channel call to %s failed", self.path)
            try:
                self.on_handler_error(call, None, exc)
            except Exception:
                log.exception("answering the failed channel call to %s failed", self.path)

    def on_channel_closed(self, event: ChannelClosed) -> None:
        """Abandon every lane that was reached through the closed channel, and forget it."""
        gone = [
            uid
            for uid, address in self.lanes.items()
            if isinstance(address, ChannelRef) and address == event.conn
        ]
        for uid in gone:
            try:
                if self.table is not None:
                    self.closed_channels += 1
                    key = ("closed", self.closed_channels)
                    reason = "the gateway's channel closed"
                    self.perform(self.table.abandon(key, uid, monotonic_ms(), reason=reason))
            except Exception:
                log.exception("abandoning lane %s of %s failed", uid, self.path)
            self.lanes.pop(uid, None)
            self.lane_names.pop(uid, None)

    def flush_channels(self) -> list[ChannelClosed]:
        """Write the channels' output; the connections found closed (for the caller)."""
        if self.server is None:
            return []
        try:
            left = self.server.flush()
        except Exception:
            log.exception("writing the channels of %s failed", self.path)
            left = True
        if left and not self.flush_armed:
            self.flush_armed = True
            self.wakeupAfter(_FLUSH_RETRY_S, payload=("flush", 0))
        return self.server.closed_since_last()

    def key(self, call: LaneCall) -> Any:
        return (call.lane.uid, call.request.id)

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
            except Exception as exc:
                log.exception("%s of %s failed", op.kind, self.path)
                reply = Error(id=op.call.request.id, code="internal", detail=str(exc))
        if op.auto_release:
            self.release_short_write(op)
        self.reply(op.call, reply, needs_sync=needs_sync)

    def perform_append(self, op: _WriteOp) -> Reply:
        assert self.transcript is not None
        self.adopt_external_change(op.lease, op.call.lane.uid)
        offset = self.transcript.append(op.data)
        if op.durability == "fsync":
            self.unsynced = True
            self.batch.wrote(op.call.lane.uid, monotonic_ms())
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
        self.perform(self.table.release(release_key, op.call.lane.uid, op.lease, monotonic_ms()))

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

    # Group commit --------------------------------------------------------------------------

    def after_message(self) -> bool:
        """After every message: sync now, or keep waiting; True: watch for the end of the pass."""
        if not self.outbox:
            self.phase = "idle"
            return False
        if self.ready_fd is None:
            self.commit()
            return False
        if self.phase == "wait":
            if not self.batch.grew():
                return False  # the commit wakeup or the next append ends the wait
            self.phase = "idle"  # an append arrived: give its pass a chance to bring more
        if self.phase == "idle":
            self.phase = "pass"
            self.batch.begin_pass()
        return True

    def on_pass_end(self) -> None:
        """The transport delivered everything it had read: decide what the held batch does."""
        if self.phase == "pass" and self.outbox:
            self.decide()

    def decide(self) -> None:
        decision = self.batch.decide(monotonic_ms(), others_may_write=self.others_may_write())
        if decision == "sync":
            self.commit()
            return
        self.batch.begin_pass()
        if decision == "wait":
            self.phase = "wait"
            due = self.batch.deadline()
            if self.commit_wakeup is None or due < self.commit_wakeup:
                self.commit_wakeup = due
                self.wakeupAfter(max(0.0, due - monotonic_ms()) / 1000.0, payload=("commit", due))

    def others_may_write(self) -> bool:
        """Could a lane other than the holder append before the holder's acks are released?

        Not while a lane holds a lease it asked for: the others queue until it releases, and
        it releases only once its appends are acknowledged, so waiting for them would only
        delay the hand-off. A lease-less append's short write lease is released as soon as it
        is written, so behind one (or none) the next writer may join the batch.
        """
        holder = self.table.holder if self.table is not None else None
        if holder is None:
            return True
        return any(op.auto_release and op.lease == holder.lease for op in self.write_queue)

    def sync_now(self) -> None:
        """fdatasync if an fsync append is not covered yet; a failure is kept for ``commit``."""
        if not self.unsynced or self.transcript is None:
            return
        self.unsynced = False
        started = monotonic_ms()
        try:
            self.transcript.sync("fsync")
            self.batch.synced(monotonic_ms() - started)
        except OSError as exc:
            self.sync_error = f"fdatasync failed: {exc}"
            log.error("%s: %s", self.path, self.sync_error)

    def commit(self) -> None:
        """Sync, then send every held message; acks a failed sync covered become errors."""
        self.sync_now()
        held = self.outbox.take_all()
        failure, self.sync_error = self.sync_error, None
        if held:
            self.counters["commits"] += 1
        for out in held:
            message = out.message
            if failure is not None and out.needs_sync:
                rid = message.message.id
                error = Error(id=rid, code="internal", detail=failure, path=self.path)
                message = message.model_copy(update={"message": error})
                if out.key is not None:
                    self.done.pop(out.key, None)
            self.deliver(out.address, message)
        self.batch.committed()
        self.phase = "idle"

    # Effects -------------------------------------------------------------------------------

    def perform(self, effects: list[Effect]) -> None:
        """Carry out the table's effects, in order (a fence reservation before its grant)."""
        assert self.table is not None
        for fx in effects:
            match fx:
                case ReserveFences(ceiling=ceiling):
                    assert self.fences is not None
                    if ceiling > self.fences.ceiling:
                        self.counters["fence_reservations"] += 1
                    self.fences.reserve(ceiling)
                case Grant() if fx.req in self.pending_writes:
                    pending = self.pending_writes.pop(fx.req)
                    op = _WriteOp(
                        "append",
                        pending.call,
                        fx.lease,
                        fx.fence,
                        pending.data,
                        pending.lines,
                        pending.durability,
                        auto_release=True,
                    )
                    self.submit(op)
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
                    self.send_lane(fx.lane, FileReply(path=self.path, message=event, lane=fx.lane))
                case AbortRequest():
                    abort = AbortRequested(lease=fx.lease, path=self.path, grace_ms=fx.grace_ms)
                    reply = FileReply(path=self.path, message=abort, held=fx.lease, lane=fx.lane)
                    self.send_lane(fx.lane, reply)
                case Diagnostic(message=message):
                    log.warning(message)
        self.schedule()

    def answer(self, req: Any, lane_uid: Any, message: Reply) -> None:
        _, rid = req
        self.send_lane(
            lane_uid,
            FileReply(
                path=self.path,
                message=message.model_copy(update={"id": rid}),
                held=self.held(lane_uid),
                lane=lane_uid,
            ),
        )

    def reply(self, call: LaneCall, message: Reply, *, needs_sync: bool = False) -> None:
        out = Outgoing(
            lane=call.lane.uid,
            address=call.lane.address,
            message=FileReply(
                path=self.path,
                message=message,
                held=self.held(call.lane.uid),
                lane=call.lane.uid,
            ),
            needs_sync=needs_sync,
            key=self.key(call) if needs_sync else None,
        )
        self.emit(out)

    def held(self, lane_uid: Any) -> str | None:
        holder = self.table.held_by(lane_uid) if self.table is not None else None
        return holder.lease if holder is not None else None

    def send_lane(self, lane_uid: Any, message: FileReply) -> None:
        address = self.lanes.get(lane_uid)
        if address is not None:
            self.emit(Outgoing(lane=lane_uid, address=address, message=message, needs_sync=False))

    def emit(self, out: Outgoing) -> None:
        if self.outbox.put(out):
            self.deliver(out.address, out.message)

    def deliver(self, address: Any, message: FileReply) -> None:
        """To a Lane actor, or as a reply frame on a channel (dropped if it closed)."""
        if isinstance(address, ChannelRef):
            if self.server is not None:
                frame = reply_frame(message.lane, message.held, message.message)
                self.server.send(address, frame)
        else:
            self.send(address, message)

    # Timers --------------------------------------------------------------------------------

    def schedule(self) -> None:
        assert self.table is not None
        due = self.table.next_deadline()
        if due is not None and (self.next_wakeup is None or due < self.next_wakeup):
            self.next_wakeup = due
            delay_s = max(0.0, due - monotonic_ms()) / 1000.0
            self.wakeupAfter(delay_s, payload=("tick", due))

    def _schedule_idle(self) -> None:
        """Arm the idle timer, one at a time: due ``idle_ms`` after the last call.

        It stays armed for the actor's life (re-armed each time it fires) except while
        retiring; a timer per call would pile up in thespian's sorted wakeup list.
        """
        if self.idle_armed or self.retiring:
            return
        self.idle_armed = True
        now = monotonic_ms()
        idle_ms = self.file_settings.idle_ms
        due = self.last_active + idle_ms
        if due <= now:
            due = now + idle_ms  # nothing happened since, but it was not quiet: look again later
        self.wakeupAfter((due - now) / 1000.0, payload=("idle", self.activity))

    def on_idle(self, seen: int) -> None:
        """The idle timer fired: ask to be passivated if nothing happened and nothing is open."""
        self.idle_armed = False
        if self.retiring:
            return
        channels = self.server.connections() if self.server is not None else 0
        if seen == self.activity and self.quiet() and channels == 0:
            self.retiring = True
            if self.server is not None:
                self.server.accepting = False
            self.send(self.registry, IdleNotice(path=self.path, received=self.received))
            return
        self._schedule_idle()

    def on_wakeup(self, msg: WakeupMessage, sender: Any) -> None:
        if msg.payload == ("flush", 0):
            self.flush_armed = False  # end_turn writes what is left
            return
        if self.table is None or not isinstance(msg.payload, tuple):
            return
        what, value = msg.payload
        if what == "tick":
            if self.next_wakeup is not None and value >= self.next_wakeup:
                self.next_wakeup = None
            self.perform(self.table.tick(monotonic_ms()))
        elif what == "commit":
            if self.commit_wakeup is not None and value >= self.commit_wakeup:
                self.commit_wakeup = None
            if self.phase == "wait" and self.outbox:
                self.decide()
        elif what == "legacy":
            self.legacy_retry_armed = False
            self.drain_writes()
        elif what == "idle":
            self.on_idle(value)

    def quiet(self) -> bool:
        """Nothing held, queued or waiting: the actor may be passivated."""
        assert self.table is not None
        return self.table.idle() and not self.outbox and not self.write_queue

    # Status --------------------------------------------------------------------------------

    def on_status(self, msg: FileStatusQuery, sender: Any) -> None:
        self.from_registry()
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
        counters["channels"] = self.server.connections() if self.server is not None else 0
        return FileStatus(
            path=self.path, fence=t.fence, holder=holder, queue=queue, counters=counters
        )

    def lane_name(self, uid: Any) -> str:
        return self.lane_names.get(uid, str(uid))

    @property
    def file_settings(self) -> FileSettings:
        assert self.settings is not None
        return self.settings


def _always_readable_fd() -> int:
    """The read end of a pipe holding one byte that nobody reads: ``select`` always returns it."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"!")
    finally:
        os.close(write_end)
    with contextlib.suppress(OSError):
        os.set_blocking(read_end, False)
    return read_end
