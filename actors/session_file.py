"""SessionFile: the one actor of one canonical path. Every grant and every write goes through it.

A thin shell: it turns ``LaneCall`` messages into calls on the pure ``LeaseTable``, performs
the effects (durable fence reservations, transcript writes, replies and events to lanes,
wakeups) and nothing else. Writes are checked against the current lease and fence when they
are performed; a write that fails the check changes nothing.

The actor is one class made of parts, a module each, that share its state:

* ``actors.session_file_writes``: accepting and performing writes, lease-less appends, the
  FIFO write queue and legacy interop;
* ``actors.session_file_commit``: the way out to the lanes (replies and events) and group
  commit, which holds acknowledgements until an fdatasync covers them;
* ``actors.session_file_channels``: the gateway's direct channels.

This module is the rest: the handler table, lifecycle, calls, effects, timers and status. It
also holds the one clock every part reads, ``now()`` (tests replace ``monotonic_ms`` here).

Passivation. One idle timer at a time fires ``idle_ms`` after the last call of any route; a
file quiet with no channel then sends ``IdleNotice`` and refuses new channels until a message
from the Registry says it is not retired after all.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from thespian.actors import ActorExitRequest, ThespianWatch, WakeupMessage, WatchMessage

from actors._shell import Handler, ShellActor, monotonic_ms
from actors.confined import ConfinedDir, failure_code, failure_detail, is_fd_exhaustion
from actors.fencestore import FenceStore
from actors.histogram import FileMetrics
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
from actors.ownership import OwnedElsewhere, Ownership
from actors.session_file_channels import ChannelsMixin
from actors.session_file_commit import GroupCommitMixin
from actors.session_file_writes import WritesMixin
from actors.transcript import OpenReport, Transcript
from messages.errors import ErrorCode, SessionLaneError
from messages.internal import (
    ActivationFailed,
    Drain,
    Drained,
    FileInit,
    FileReply,
    FileSettings,
    FileStatusAnswer,
    FileStatusQuery,
    IdleNotice,
    LaneCall,
    OpenChannel,
)
from messages.wire import (
    Abandon,
    AbortRequested,
    Acquire,
    Append,
    Error,
    FileStatus,
    Granted,
    HolderStatus,
    Queued,
    QueueEntry,
    Recover,
    Release,
    Revoked,
    Rewrite,
    Skipped,
)
from messages.wire import (
    Abandoned as AbandonedReply,
)
from messages.wire import (
    Released as ReleasedReply,
)

__all__ = ["Broken", "SessionFile", "activation_error"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Broken:
    """Why a SessionFile could not start serving its file: every request gets this error."""

    code: ErrorCode
    detail: str


def activation_error(exc: BaseException) -> Broken:
    """The error a failed activation answers with (a pure mapping, tested on its own).

    Another owner or an I/O error is ``unavailable`` (the next request tries again: the
    owner may have gone); a path that confinement refuses is ``path_not_allowed``; running out
    of descriptors is ``too_many_files``.
    """
    detail = failure_detail(exc)
    if not isinstance(exc, SessionLaneError):
        detail = f"cannot open the file: {detail}"
    return Broken(failure_code(exc), detail)


class SessionFile(ChannelsMixin, GroupCommitMixin, WritesMixin, ShellActor):
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
        self.tail_unchecked = False
        """A torn last line seen at activation was left for the first write under the legacy
        lock to repair (it may have been a legacy writer's line in progress)."""
        self.registry: Any = None
        self.directory: ConfinedDir | None = None
        """The transcript's directory, walked from its root without symlinks; shared by the
        owner lock, the transcript, its fence store and the legacy lock."""
        self.ownership: Ownership | None = None
        self.broken: Broken | None = None
        self.reported = -1  # ``received`` when ActivationFailed was last sent
        self.incarnation = 0
        self.restarted = False  # this incarnation replaced one that died (FileInit)
        self.metrics = FileMetrics()  # latency histograms, reported in the status counters
        self.received = 0  # messages the Registry forwarded (compared in its passivation check)
        self.activity = 0  # calls of any route, for the idle timer
        self.last_active = 0.0
        self.idle_armed = False
        self.retiring = False  # IdleNotice sent; cleared by the next message from the Registry
        self.lanes: dict[str, Any] = {}  # lane uid -> Lane address
        self.lane_names: dict[str, str] = {}  # lane uid -> the name its agent gave it
        self.next_wakeup: float | None = None
        self.init_channels()
        self.init_group_commit()
        self.init_writes()
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
        if self.broken is not None:
            self.report_broken()
            return None
        return self.end_turn()

    def report_broken(self) -> None:
        """Ask the Registry to retire us, once per count of forwarded messages answered."""
        if self.broken is None or self.registry is None or self.reported == self.received:
            return
        self.reported = self.received
        failed = ActivationFailed(
            path=self.path,
            received=self.received,
            code=self.broken.code,
            detail=self.broken.detail,
        )
        self.send(self.registry, failed)

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
        self.restarted = msg.restarted
        self.last_active = self.now()
        try:
            # Ownership first: nothing of the file (torn tail, fences) is touched unless we
            # are its one owner on this machine, and the fence floor read below is the last
            # owner's final word (it held the lock until its process ended).
            self.directory, _ = ConfinedDir.open_parent(msg.path, msg.root)
            owner = s.owner
            self.ownership = Ownership.acquire(
                msg.path,
                service_pid=owner.pid if owner else 0,
                gateway=owner.gateway if owner else "",
                admin_port=owner.admin_port if owner else 0,
                now=time.time(),
                directory=self.directory,
            )
            self.transcript = Transcript(msg.path, root=msg.root, directory=self.directory, log=log)
            report = self.open_transcript(s.legacy_lock)
            self.fences = FenceStore(msg.path, self.transcript.directory)
            floor = self.fences.load()
        except Exception as exc:  # another owner, permission, corrupt fence file, EMFILE...
            self.broken = activation_error(exc)
            self.close_after_failure()
            level = logging.INFO if isinstance(exc, OwnedElsewhere) else logging.ERROR
            log.log(level, "not serving %s: %s", msg.path, self.broken.detail)
            return
        self.open_pass_end()
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

    def open_transcript(self, legacy_lock: bool) -> OpenReport:
        """Open the transcript; with legacy interop, repair a torn tail only under the lock.

        A legacy writer writes its line while it holds ``<file>.lock``: an unterminated last
        line seen without that lock may be its write in progress, and quarantining it would
        cut the line in two (the test of legacy interop lost a record that way). So the
        repair happens here only if the lock is free now, else before our first write, which
        always takes the lock.
        """
        assert self.transcript is not None and self.directory is not None
        if not legacy_lock:
            return self.transcript.open()
        self.legacy = LegacyLock(self.path, directory=self.directory)
        if not self.legacy.try_acquire():
            self.tail_unchecked = True
            return self.transcript.open(repair=False)
        try:
            return self.transcript.open()
        finally:
            self.legacy.release()

    def close_after_failure(self) -> None:
        """Let go of what a failed activation had already opened (the lock last)."""
        if self.transcript is not None:
            try:
                self.transcript.close()
            except Exception:
                log.exception("closing %s after a failed activation", self.path)
            self.transcript = None
        self.fences = None
        if self.ownership is not None:
            self.ownership.release()
            self.ownership = None
        if self.directory is not None:
            self.directory.close()
            self.directory = None

    def on_exit(self, msg: ActorExitRequest, sender: Any) -> None:
        self.fail_queued_writes("unavailable", "the file's actor is exiting")
        self.commit()
        self.close_channels()
        if self.transcript is not None:
            self.transcript.close()
        self.close_pass_end()
        if self.ownership is not None:
            # Last: until here another service must not open, quarantine or fence the file.
            self.ownership.release()
            self.ownership = None
        if self.directory is not None:
            self.directory.close()
            self.directory = None

    def on_drain(self, msg: Drain, sender: Any) -> None:
        self.commit()
        if self.table is not None:
            self.perform(self.table.shutdown(self.now()))
        self.fail_queued_writes("shutting_down", "the service is stopping")
        self.commit()
        self.send(sender, Drained(files=1))

    # Calls ---------------------------------------------------------------------------------

    def on_call(self, call: LaneCall, sender: Any) -> None:
        self.from_registry()
        self.serve(call)

    def from_registry(self, *, activity: bool = True) -> None:
        """Count a message the Registry forwarded (and counted); it cancels a retirement.

        ``activity=False`` (a status query): it does not keep the file from going idle, or a
        metrics scraper polling every few seconds would keep every file alive forever.
        """
        self.received += 1
        if activity:
            self.touch()
        if self.retiring:
            # The Registry now counts more than our IdleNotice said: it will not retire us.
            self.retiring = False
            self._schedule_idle()

    def touch(self) -> None:
        self.activity += 1
        self.last_active = self.now()

    def serve(self, call: LaneCall) -> None:
        """One call, from the Registry or from a channel: lease table, writes, replies."""
        self.lanes[call.lane.uid] = call.lane.address
        self.lane_names[call.lane.uid] = call.lane.name
        if self.table is None:
            broken = self.broken or Broken("unavailable", "the file actor is not initialised")
            error = Error(
                id=call.request.id, code=broken.code, detail=broken.detail, path=call.path
            )
            self.reply(call, error)
            return
        now = self.now()
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
            # A refusal met on the way (a fence sidecar that became a symlink, no descriptor
            # left) keeps its own code; anything else is a bug: internal.
            code: ErrorCode = "internal"
            if isinstance(exc, SessionLaneError):
                code = exc.code
            elif is_fd_exhaustion(exc):
                code = "too_many_files"
            error = Error(id=msg.request.id, code=code, detail=failure_detail(exc), path=self.path)
            self.reply(msg, error)

    def on_watch(self, msg: WatchMessage, sender: Any) -> None:
        """Channel sockets first (their calls join this pass), then the end of the pass."""
        self.on_channels_ready(msg.ready)
        if self.ready_fd is not None and self.ready_fd in msg.ready:
            self.on_pass_end()

    def key(self, call: LaneCall) -> Any:
        return (call.lane.uid, call.request.id)

    # Effects -------------------------------------------------------------------------------

    def perform(self, effects: list[Effect]) -> None:
        """Carry out the table's effects, in order (a fence reservation before its grant)."""
        assert self.table is not None
        started = self.now()
        for fx in effects:
            if isinstance(fx, Grant) and fx.waited_ms is not None:  # a hand-off to a waiter
                self.metrics.observe("grant_wait", fx.waited_ms)
                self.metrics.observe("handoff", self.now() - started)
            match fx:
                case ReserveFences(ceiling=ceiling):
                    assert self.fences is not None
                    if ceiling > self.fences.ceiling:
                        self.counters["fence_reservations"] += 1
                    self.fences.reserve(ceiling)
                case Grant() if fx.req in self.pending_writes:
                    self.write_granted(fx.req, fx.lease, fx.fence)
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

    # Timers --------------------------------------------------------------------------------

    def now(self) -> float:
        """The actor's clock, read by every part of it (tests replace ``monotonic_ms`` here)."""
        return monotonic_ms()

    def schedule(self) -> None:
        assert self.table is not None
        due = self.table.next_deadline()
        if due is not None and (self.next_wakeup is None or due < self.next_wakeup):
            self.next_wakeup = due
            delay_s = max(0.0, due - self.now()) / 1000.0
            self.wakeupAfter(delay_s, payload=("tick", due))

    def _schedule_idle(self) -> None:
        """Arm the idle timer, one at a time: due ``idle_ms`` after the last call.

        It stays armed for the actor's life (re-armed each time it fires) except while
        retiring; a timer per call would pile up in thespian's sorted wakeup list.
        """
        if self.idle_armed or self.retiring:
            return
        self.idle_armed = True
        now = self.now()
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
            self.perform(self.table.tick(self.now()))
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
        self.from_registry(activity=False)
        self.send(sender, FileStatusAnswer(query=msg.query, status=self.status()))

    def status(self) -> FileStatus:
        if self.table is None:
            return FileStatus(
                path=self.path, fence=0, holder=None, queue=[], counters={"broken": 1}
            )
        now = self.now()
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
        counters["incarnation"] = self.incarnation
        counters["restarted"] = int(self.restarted)
        counters.update(self.metrics.counters())
        return FileStatus(
            path=self.path, fence=t.fence, holder=holder, queue=queue, counters=counters
        )

    def lane_name(self, uid: Any) -> str:
        return self.lane_names.get(uid, str(uid))

    @property
    def file_settings(self) -> FileSettings:
        assert self.settings is not None
        return self.settings
