"""SessionFile: the one actor of one canonical path. Every grant and every write goes through it.

A thin shell: it turns channel calls (``on_channel_events``, from a socket or carried in a
message) into calls on its parts and performs the effects they return (durable fence
reservations, replies and events to lanes, syncs, wakeups).
Writes are checked against the current lease and fence when they are performed; a write that
fails the check changes nothing.

Its state is one of two (``sessionlane.actors.session_file_serving``): ``Serving``, built complete
from the ``FileInit`` (the open file and the parts working on it), or ``Broken`` (activation
failed, or no ``FileInit`` yet), whose error answers every request. The parts of ``Serving``,
each owning its state:

* ``FileCore`` (``sessionlane.actors.session_file_core``): which part a call goes to, and what
  the lease table's effects mean (replies, events, fence reservations, drains); pure;
* ``LeaseTable`` (``sessionlane.actors.lease_table``): leases, waiters, fences; returns effects;
* ``WritePath`` (``sessionlane.actors.session_file_writes``): accepting and checking writes, the
  FIFO write queue, de-duplication, legacy interop; returns effects, does no I/O;
* ``FileDisk`` (``sessionlane.actors.session_file_disk``): performs the write path's disk
  effects (writes, fdatasync, the legacy lock) and reports their outcomes;
* ``TranscriptSync`` and ``GroupCommit`` (``sessionlane.actors.session_file_commit``): what is not
  synced yet, and the acknowledgements held until an fdatasync covers them;
* ``FileChannels`` (``sessionlane.actors.session_file_channels``): the direct channels of the
  gateway and the Lane actors, on a socket or carried in thespian messages.

This module is the shell: the handler table, lifecycle, calls, effects, timers (typed:
``sessionlane.actors.timers``), passivation and status. It holds the one clock, ``now()``
(tests replace ``monotonic_ms`` here): the parts get the time as ``now`` arguments and read
no clock; only the shell's ``FileDisk``, which performs the disk effects, reads it to time
the fdatasync it performs.

Ownership follows the path: before every call or timer that may grant or write, ``own_path``
checks that the owner lock at the file's path is still the one held (``Serving.keep_ownership``;
docs/security-files.md). A lock that moved is taken again; one another process holds ends the
serving (``lose_file``): leases revoked ``ownership_lost``, the actor retires as a broken one.

Over 600 lines: the channels' entry points (one for both carriers) joined the shell before
the core/shell split moves the deciding parts out of it.

Passivation (``sessionlane.actors.passivation``). One idle timer at a time fires ``idle_ms`` after
the last call of any route; a file quiet with no channel then sends ``IdleNotice`` and refuses new
channels until a message from the Registry says it is not retired after all.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

from thespian.actors import ActorExitRequest, ThespianWatch, WakeupMessage, WatchMessage

from sessionlane.actors import lease_table as lt
from sessionlane.actors._shell import Handler, ShellActor, monotonic_ms, retitle
from sessionlane.actors.confined import failure_detail, is_fd_exhaustion
from sessionlane.actors.disk_errors import named_disk_error
from sessionlane.actors.file_channels import ChannelCallEvent, ChannelClosed, ChannelEvent
from sessionlane.actors.histogram import FileMetrics
from sessionlane.actors.ownership import OwnedElsewhere
from sessionlane.actors.passivation import Passivation
from sessionlane.actors.session_file_channels import FLUSH_RETRY_S, channel_call, refused_offer
from sessionlane.actors.session_file_core import (
    Answer,
    DrainWrites,
    Event,
    Handoff,
    Reserve,
    Warn,
)
from sessionlane.actors.session_file_outlet import Outlet
from sessionlane.actors.session_file_serving import (
    NOT_STARTED,
    Broken,
    Serving,
    Switches,
    activation_error,
)
from sessionlane.actors.session_file_writes import (
    Commit,
    Notify,
    ReleaseLegacyLock,
    Reply,
    Sync,
    TableEffects,
    WriteEffect,
    WriteOut,
    Wrote,
    call_key,
)
from sessionlane.actors.timers import ChannelFlush, CommitDue, IdleCheck, LeaseTick, LegacyRetry
from sessionlane.messages import wire
from sessionlane.messages.carried import CarriedCalls, CarriedLost, CarriedReplies
from sessionlane.messages.errors import ErrorCode, SessionLaneError
from sessionlane.messages.internal import (
    ActivationFailed,
    Drain,
    Drained,
    FileInit,
    FileStatusAnswer,
    FileStatusQuery,
    IdleNotice,
    LaneCall,
    OpenChannel,
)
from sessionlane.messages.wire import (
    Acquire,
    Append,
    Error,
    FileStatus,
)
from sessionlane.messages.wire import Reply as ReplyMessage

__all__ = ["Broken", "SessionFile", "activation_error"]

log = logging.getLogger(__name__)


class SessionFile(ShellActor):
    """Owns one transcript: lease table, fence counter, the open file."""

    log = log

    group_commit: ClassVar[bool] = True
    """Benchmarks set this to False (before the actor system forks) to sync every append."""
    channels: ClassVar[bool] = True
    """Set to False (before the actor system forks) to offer no socket: every ``OpenChannel``
    is then answered with a carried channel (the frames in thespian messages)."""

    def __init__(self, capabilities: dict[str, Any] | None = None, *args: Any, **kwargs: Any):
        # thespian passes ``capabilities`` by name only to a positional-or-keyword parameter.
        super().__init__(*args, **kwargs)
        self.watch_supported = bool((capabilities or {}).get("Thespian Watch Supported"))
        self.state: Serving | Broken = NOT_STARTED
        self.path = ""
        self.registry: Any = None
        self.incarnation = 0
        self.restarted = False  # this incarnation replaced one that died (FileInit)
        self.metrics = FileMetrics()  # latency histograms, reported in the status counters
        self.idle = Passivation()
        self.out = Outlet(lambda address, message: self.send(address, message))

    def handlers(self) -> dict[type, Handler]:
        return {
            FileInit: self.on_init,
            OpenChannel: self.on_open_channel,
            CarriedCalls: self.on_carried,
            CarriedLost: self.on_carried_lost,
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
        if isinstance(self.state, Broken):
            self.report_broken(self.state)
            return None
        return self.end_turn(self.state)

    def report_broken(self, broken: Broken) -> None:
        """Ask the Registry to retire us, once per count of forwarded messages answered."""
        if self.registry is None or not self.idle.report_broken():
            return
        received = self.idle.received
        failed = ActivationFailed(
            path=self.path, received=received, code=broken.code, detail=broken.detail
        )
        self.send(self.registry, failed)

    def end_turn(self, s: Serving) -> ThespianWatch | None:
        """After every message: group commit, then one write of the channels' output.

        Channels the write found closed are handled here (their lanes abandoned), and the
        commit logic runs again for what that changed.
        """
        while True:
            try:
                pass_end = self.after_message(s)
            except Exception:
                log.exception("group commit of %s failed", self.path)
                pass_end = False
            closed, arm = s.channels.flush()
            self.send_carried(s)
            if arm:
                self.wakeupAfter(FLUSH_RETRY_S, payload=ChannelFlush())
            if not closed:
                return self.watch(s, pass_end)
            for event in closed:
                self.on_channel_closed(s, event)

    def after_message(self, s: Serving) -> bool:
        """Commit now, or keep holding; True: watch for the end of the pass."""
        watch = s.commit.after_message()
        if watch is None:
            self.commit(s)
            return False
        return watch

    def watch(self, s: Serving, pass_end: bool) -> ThespianWatch | None:
        """The fds thespian should watch until the next message: channels, pass end."""
        fds = s.channels.fds()
        if pass_end and s.commit.ready_fd is not None:
            fds.append(s.commit.ready_fd)
        return ThespianWatch(fds) if fds else None

    # Lifecycle -----------------------------------------------------------------------------

    def on_init(self, msg: FileInit, sender: Any) -> None:
        self.path = self.out.path = msg.path
        retitle(self, f"file {msg.path}")
        self.registry = sender
        self.incarnation = msg.incarnation
        self.restarted = msg.restarted
        self.idle.last_active = self.now()
        switches = Switches(self.watch_supported, self.group_commit, self.channels)
        try:
            self.state = Serving.open(
                msg,
                switches,
                metrics=self.metrics,
                clock=self.now,
                accepting=lambda: not self.idle.retiring,
            )
        except Exception as exc:  # another owner, permission, corrupt fence file, EMFILE...
            self.state = activation_error(exc)
            level = logging.INFO if isinstance(exc, OwnedElsewhere) else logging.ERROR
            log.log(level, "not serving %s: %s", msg.path, self.state.detail)
            return
        self.schedule_idle(self.state)
        self.schedule(self.state)  # an awaited holder's grace ends even if nobody asks

    def on_exit(self, msg: ActorExitRequest, sender: Any) -> None:
        s = self.state
        if not isinstance(s, Serving):
            return
        failed = s.writes.fail_queued("unavailable", "the file's actor is exiting", self.now())
        self.perform_writes(s, failed)
        self.commit(s)
        self.state = Broken("unavailable", "the file's actor is exiting")
        s.close()
        self.send_carried(s)

    def on_drain(self, msg: Drain, sender: Any) -> None:
        s = self.state
        if isinstance(s, Serving):
            self.commit(s)
            self.perform(s, s.table.shutdown(self.now()))
            stopping = s.writes.fail_queued("shutting_down", "the service is stopping", self.now())
            self.perform_writes(s, stopping)
            self.commit(s)
        self.send(sender, Drained(files=1))

    # Calls ---------------------------------------------------------------------------------

    def from_registry(self, *, activity: bool = True) -> None:
        """Count a message the Registry forwarded; ``activity=False``: a status query."""
        if self.idle.forwarded(self.now(), activity=activity) and isinstance(self.state, Serving):
            self.schedule_idle(self.state)

    def touch(self) -> None:
        self.idle.touch(self.now())

    def serve(self, call: LaneCall) -> None:
        """One call, from the Registry or from a channel: lease table, writes, replies."""
        self.out.met(call)
        s = self.state
        if isinstance(s, Broken):
            error = Error(id=call.request.id, code=s.code, detail=s.detail, path=call.path)
            self.reply(call, error)
            return
        if not self.own_path(s, call):
            return
        now, req = self.now(), call.request
        if isinstance(req, Acquire) and req.reclaim is not None:
            self.perform(s, self.reclaim(s, call_key(call), call.lane.uid, req.reclaim, now))
            return
        done = self.written_before(s, call.lane.uid, req) if isinstance(req, Append) else None
        if done is not None:
            self.reply(call, done)
        else:
            self.perform_writes(s, s.core.call(call, now))
        self.perform(s, [])  # the lease record follows the holder; the next tick is armed

    def reclaim(
        self, s: Serving, key: Any, lane: str, ticket: wire.ReclaimTicket, now: float
    ) -> list[lt.Effect]:
        """A lease held before a restart, asked back: the same lease, or ``reclaim_refused``."""
        identity = s.transcript.identity
        why = s.book.refusal(ticket, identity.ino, identity.size)
        if why is not None:
            return [s.table.refuse_reclaim(key, lane, why)]
        s.book.issue(ticket.lease, ticket.secret)
        return s.table.reclaim(key, lane, ticket.lease, ticket.fence, now)

    def written_before(self, s: Serving, lane: str, req: Append) -> wire.Appended | None:
        """The first answer of an append resent after a restart (same ``aid``), if written."""
        if req.lease is None or req.fence is None or req.aid is None:
            return None
        done = s.book.answered(req.lease, req.aid)
        if done is None or s.table.check_write(lane, req.lease, req.fence) is not None:
            return None
        s.writes.counters["duplicates"] += 1
        return wire.Appended(id=req.id, offset=done.offset, lines=done.lines, fence=done.fence)

    def on_handler_error(self, msg: Any, sender: Any, exc: Exception) -> None:
        if isinstance(msg, LaneCall):
            # A refusal met on the way (a fence sidecar that became a symlink, no descriptor
            # left) keeps its own code; anything else is a bug: internal.
            code: ErrorCode = "internal"
            if isinstance(exc, SessionLaneError):
                code = exc.code
            elif is_fd_exhaustion(exc):
                code = "too_many_files"
            elif (disk := named_disk_error(exc)) is not None:  # a fence reservation, say
                code = disk
            error = Error(id=msg.request.id, code=code, detail=failure_detail(exc), path=self.path)
            self.reply(msg, error)

    # Ownership -----------------------------------------------------------------------------

    def own_path(self, s: Serving, call: LaneCall | None = None) -> bool:
        """Before anything that may grant or write: is the owner lock at the path still ours?

        If it moved and was free, it is ours again (``Serving.keep_ownership``); if another
        process holds it, the file is lost (``lose_file``) and ``call`` answered with why.
        A path that kept changing refuses ``call`` only (a timer goes on).
        """
        check = s.keep_ownership(self.now())
        self.perform(s, check.effects)
        if check.lost is not None:
            self.lose_file(s, Broken(check.lost.code, check.lost.detail), call)
            return False
        if check.refused is not None and call is not None:
            no = check.refused
            self.reply(
                call, Error(id=call.request.id, code=no.code, detail=no.detail, path=self.path)
            )
            return False
        return True

    def lose_file(self, s: Serving, broken: Broken, call: LaneCall | None) -> None:
        """Stop serving: every lease reported lost, queued writes refused, then ``Broken``."""
        log.warning("no longer serving %s: %s", self.path, broken.detail)
        lost = s.table.shutdown(
            self.now(), code="unavailable", detail=broken.detail, reason="ownership_lost"
        )
        self.perform(s, lost)
        self.perform_writes(s, s.writes.fail_queued(broken.code, broken.detail, self.now()))
        if call is not None:
            rid = call.request.id
            self.reply(call, Error(id=rid, code=broken.code, detail=broken.detail, path=self.path))
        self.commit(s)
        s.channels.flush()  # the revocations go out before the channels close
        self.state = broken
        s.close()
        self.send_carried(s)

    # Effects -------------------------------------------------------------------------------

    def perform(self, s: Serving, effects: list[lt.Effect]) -> None:
        """Carry out the table's effects, in order, as the core reads them (a fence
        reservation before its grant: one that fails stops the grant)."""
        started = self.now()
        for fx in effects:
            for out in s.core.meaning(fx):
                match out:
                    case Reserve(ceiling=ceiling):
                        if ceiling > s.fences.ceiling:
                            s.fence_reservations += 1
                        s.fences.reserve(ceiling)
                    case Handoff(waited_ms=waited_ms):
                        self.metrics.observe("grant_wait", waited_ms)
                        self.metrics.observe("handoff", self.now() - started)
                    case DrainWrites():
                        self.drain_writes(s)
                    case Answer(req=req, lane=lane, message=message):
                        self.out.answer(s, req, lane, message)
                    case Event(lane=lane, message=event):
                        self.out.event(s, lane, event)
                    case Warn(message=message):
                        log.warning(message)
        s.note_holder(self.out.name, self.now())
        self.schedule(s)

    def write(self, s: Serving, effects: list[WriteEffect]) -> None:
        """A write was accepted (or answered): perform its effects, then the write queue."""
        self.perform_writes(s, effects)
        self.drain_writes(s)

    def perform_writes(self, s: Serving, effects: Sequence[WriteEffect | DrainWrites]) -> None:
        """Carry out the write path's effects, in order."""
        for fx in effects:
            match fx:
                case Reply(call=call, message=message, needs_sync=needs_sync):
                    if isinstance(message, wire.Appended | wire.Rewritten):
                        s.note_write(call.request, message)
                    self.reply(call, message, needs_sync=needs_sync)
                case Notify(lane=lane, message=event):
                    self.out.event(s, lane, event)
                case TableEffects(effects=table_effects):
                    self.perform(s, table_effects)
                case Wrote(lane=lane):
                    s.commit.wrote(lane, self.now())
                case Commit():
                    self.commit(s)
                case WriteOut(op=op, repair_tail=repair):
                    fsync = op.kind == "append" and op.durability == "fsync"
                    outcome = s.disk.write(op.kind, op.data, fsync, repair)
                    self.perform_writes(s, s.writes.written(op, outcome, self.now()))
                case Sync():
                    s.disk.sync_now()
                case ReleaseLegacyLock():
                    s.disk.release_legacy()
                case DrainWrites():
                    self.drain_writes(s)

    def drain_writes(self, s: Serving) -> None:
        """Perform the queued writes in order, under the legacy lock when configured.

        One write at a time: its effects may grant a queued lease-less append, which then
        joins this drain (``drain_writes`` called meanwhile does nothing).
        """
        if not s.writes.may_drain():
            return
        lease = s.writes.lock_for()
        lock = s.disk.take_legacy(lease) if lease is not None else True
        not_now = s.writes.begin_drain(self.now(), lock)
        if not_now is not None:
            self.perform_writes(s, not_now)
            if (delay := s.writes.retry_after()) is not None:
                self.wakeupAfter(delay, payload=LegacyRetry())
            return
        try:
            while (effects := s.writes.next_write(self.now())) is not None:
                self.perform_writes(s, effects)
        finally:
            done = s.writes.end_drain()
        self.perform_writes(s, done)

    # Messages to lanes ---------------------------------------------------------------------

    def reply(self, call: LaneCall, message: ReplyMessage, *, needs_sync: bool = False) -> None:
        self.out.reply(self.state, call, message, needs_sync=needs_sync)

    def commit(self, s: Serving) -> None:
        """Sync, then send what group commit held; acks a failed sync covered are errors,
        and the write path forgets them (a retry must write again)."""
        s.disk.sync_now()
        done = s.commit.commit()
        for key in done.failed_keys:
            s.writes.forget(key)
        for out in done.deliveries:
            self.out.deliver(s, out.address, out.message)

    def decide(self, s: Serving) -> None:
        """The held batch's pass ended (or its wait timed out): sync, pass again, or wait."""
        now = self.now()
        due = s.commit.decide(now, others_may_write=s.others_may_write())
        if due == "sync":
            self.commit(s)
        elif due is not None:
            self.wakeupAfter(max(0.0, due - now) / 1000.0, payload=CommitDue(due))

    # Channels ------------------------------------------------------------------------------

    def on_open_channel(self, msg: OpenChannel, sender: Any) -> None:
        self.from_registry()
        reply_to = msg.reply_to if msg.reply_to is not None else sender
        s = self.state
        if isinstance(s, Serving):
            offer = s.channels.offer(msg, self.myAddress)
        else:
            offer = refused_offer(msg, self.path or None, s.detail, s.code)
        self.send(reply_to, offer)

    def on_carried(self, msg: CarriedCalls, sender: Any) -> None:
        """Channel frames carried by a message: handled exactly as a socket's."""
        s = self.state
        if not isinstance(s, Serving):
            if not msg.closing:
                why = f"the file is not serving: {s.detail}"
                self.send(sender, CarriedReplies(msg.path, self.incarnation, b"", closed=why))
            return
        self.on_channel_events(s, s.channels.on_carried(msg, sender))

    def on_carried_lost(self, msg: CarriedLost, sender: Any) -> None:
        """From the Registry: these peers' member is lost; what their lanes held is let go."""
        self.from_registry()
        s = self.state
        if not isinstance(s, Serving):
            return
        for ref in s.channels.on_carried_lost(msg):
            self.on_channel_closed(s, ChannelClosed(ref), msg.reason, tell=True)

    def send_carried(self, s: Serving) -> None:
        for address, message in s.channels.take_carried():
            self.send(address, message)

    def on_watch(self, msg: WatchMessage, sender: Any) -> None:
        """Channel sockets first (their calls join this pass), then the end of the pass."""
        s = self.state
        if not isinstance(s, Serving):
            return
        self.on_channel_events(s, s.channels.on_ready(msg.ready))
        if self.state is not s:
            return
        ready_fd = s.commit.ready_fd
        if ready_fd is not None and ready_fd in msg.ready and s.commit.pass_ended():
            self.decide(s)

    def on_channel_events(
        self, s: Serving, events: list[ChannelEvent], why: str = "the gateway's channel closed"
    ) -> None:
        """Calls and closes from a channel, whichever carried them; ``why``: a close's reason."""
        for event in events:
            if self.state is not s:  # the file was lost to another owner: its channels closed
                return
            if isinstance(event, ChannelCallEvent):
                self.on_channel_call(s, event)
            else:
                self.on_channel_closed(s, event, why)

    def on_channel_call(self, s: Serving, event: ChannelCallEvent) -> None:
        """A call on a channel: served like a ``LaneCall`` but not counted in ``received``."""
        call = channel_call(self.path, event.conn, event.call)
        s.channels.calls += 1
        self.touch()
        try:
            self.serve(call)
        except Exception as exc:
            log.exception("channel call to %s failed", self.path)
            try:
                self.on_handler_error(call, None, exc)
            except Exception:
                log.exception("answering the failed channel call to %s failed", self.path)

    def on_channel_closed(
        self,
        s: Serving,
        event: ChannelClosed,
        reason: str = "the gateway's channel closed",
        *,
        tell: bool = False,
    ) -> None:
        """Abandon every lane that was reached through the closed channel, and forget it.

        ``tell``: the channel's last output still goes (a lost member's carried channel), so
        the abandon is an event (no id), which its lane reports as ``revoked``, ``member_lost``.
        """
        for uid in self.out.through(event.conn):
            try:
                key = (uid, None) if tell else ("closed", s.channels.next_closed())
                self.perform(s, s.table.abandon(key, uid, self.now(), reason=reason))
            except Exception:
                log.exception("abandoning lane %s of %s failed", uid, self.path)
            self.out.forget(uid)

    # Timers --------------------------------------------------------------------------------

    def now(self) -> float:
        """The actor's clock, read by every part of it (tests replace ``monotonic_ms`` here)."""
        return monotonic_ms()

    def on_wakeup(self, msg: WakeupMessage, sender: Any) -> None:
        s = self.state
        if not isinstance(s, Serving):
            return
        match msg.payload:
            case LeaseTick(due=due):
                if s.next_tick is not None and due >= s.next_tick:
                    s.next_tick = None
                if self.own_path(s):  # a tick may grant the next waiter
                    self.perform(s, s.table.tick(self.now()))
            case CommitDue(due=due):
                if s.commit.timer_fired(due):
                    self.decide(s)
            case LegacyRetry():
                s.writes.retry_due()
                if self.own_path(s):
                    self.drain_writes(s)
            case IdleCheck(activity=seen):
                self.on_idle(s, seen)
            case ChannelFlush():
                s.channels.flush_due()  # end_turn writes what is left

    def schedule(self, s: Serving) -> None:
        """Arm a ``LeaseTick`` for the table's next deadline, unless one as early is armed."""
        due = s.table.next_deadline()
        if due is not None and (s.next_tick is None or due < s.next_tick):
            s.next_tick = due
            self.wakeupAfter(max(0.0, due - self.now()) / 1000.0, payload=LeaseTick(due))

    def schedule_idle(self, s: Serving) -> None:
        """Arm the idle timer, unless it is armed (or the file is retiring)."""
        delay_ms = self.idle.arm(self.now(), s.settings.idle_ms)
        if delay_ms is not None:
            self.wakeupAfter(delay_ms / 1000.0, payload=IdleCheck(self.idle.activity))

    def on_idle(self, s: Serving, seen: int) -> None:
        """The idle timer fired: ask to be passivated if nothing happened and nothing is open."""
        quiet = s.quiet() and s.channels.connections() == 0
        retire = self.idle.fired(seen, quiet=quiet)
        if retire:
            self.send(self.registry, IdleNotice(path=self.path, received=self.idle.received))
        elif retire is not None:
            self.schedule_idle(s)

    # Status --------------------------------------------------------------------------------

    def on_status(self, msg: FileStatusQuery, sender: Any) -> None:
        self.from_registry(activity=False)
        self.send(sender, FileStatusAnswer(query=msg.query, status=self.status()))

    def status(self) -> FileStatus:
        s = self.state
        if isinstance(s, Broken):
            return FileStatus(
                path=self.path, fence=0, holder=None, queue=[], counters={"broken": 1}
            )
        extra = {
            "incarnation": self.incarnation,
            "restarted": int(self.restarted),
            **self.metrics.counters(),
        }
        return s.status(self.now(), self.out.name, extra)
