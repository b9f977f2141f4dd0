"""SessionFile: the one actor of one canonical path. Every grant and every write goes through it.

A thin shell around an I/O-free core. ``FileCore`` (``sessionlane.actors.session_file_core``)
decides everything about the file and speaks only in effects
(``sessionlane.actors.session_file_effects``); this module turns channel calls
(``on_channel_events``, from a socket or carried in a message) into calls on the core,
performs its effects one at a time in one worklist loop (``run``), and feeds each outcome
back: ``Deliver`` (to a Lane actor, or a reply frame on a channel), the disk's ``WriteOut``,
``Sync``, ``Commit`` (sync, then release what group commit held),
``TakeLegacyLock``/``ReleaseLegacyLock``, a fence ``Reserve``, the lease record's
``WriteRecord``, the timers ``ArmTick``, ``ArmRetry``, ``ArmCommit``, and ``Handoff``/``Warn``
for the metrics and the log. Writes are checked against the current lease
and fence when they are performed; a write that fails the check changes nothing.

Its state is one of two (``sessionlane.actors.session_file_serving``): ``Serving``, built complete
from the ``FileInit`` (the open file, the core, and the performers working on them), or
``Broken`` (activation failed, or no ``FileInit`` yet), whose error answers every request. What
``Serving`` holds:

* ``FileCore``: the lease table (``AwaitingTable``, ``sessionlane.actors.awaited``), the
  ``WritePath`` (``sessionlane.actors.session_file_writes``), the lease record's ``ReclaimBook``
  (``sessionlane.actors.reclaim``), group commit's outbox and policy (``GroupCommit``) and the
  lanes directory; pure;
* ``FileDisk`` (``sessionlane.actors.session_file_disk``): performs the disk effects (writes,
  fdatasync, the legacy lock) and reports their outcomes; ``TranscriptSync``
  (``sessionlane.actors.session_file_commit``) keeps what is not synced yet;
* the fence store, the lease record file, the ownership lock, and ``FileChannels``
  (``sessionlane.actors.session_file_channels``): the direct channels of the gateway and the
  Lane actors, on a socket or carried in thespian messages.

This module is the shell: the handler table, lifecycle, the worklist loop, timers (typed:
``sessionlane.actors.timers``), passivation and status (what the serving state does with
what it holds, a fence reservation, the fds to watch, its status, is ``Serving``'s). It holds
the one clock, ``now()`` (tests replace ``monotonic_ms`` here): the core gets the time as
``now`` arguments and reads no clock; only the shell's ``FileDisk``, which performs the disk
effects, reads it to time the fdatasync it performs.

Ownership follows the path: before the first call of a run (the frames of one channel read,
or of one carried message: ``on_channel_events``) that may grant or write
(``FileCore.may_grant_or_write``: an acquire that can only queue behind another lane's lease,
or a release with nobody waiting, is not such a call), and every timer that may grant or write,
``own_path`` checks that the owner lock at the file's path is still the one held
(``Serving.keep_ownership``; docs/security-files.md). A lock that moved is taken again; one
another process holds ends the serving (``lose_file``): leases revoked ``ownership_lost``, the
actor retires as a broken one.

Passivation (``sessionlane.actors.passivation``). One idle timer at a time fires ``idle_ms`` after
the last call of any route; a file quiet with no channel then sends ``IdleNotice`` and refuses new
channels until a message from the Registry says it is not retired after all.

Channels in the turn (``sessionlane.actors.channel_loop``): after a turn that ends watching
channel sockets, the actor waits for them itself while thespian has nothing to do, and handles
what they bring as the ``WatchMessage`` thespian would have delivered (``hold``); the wait is
the transport's own, moved into the turn: thespian's descriptors are in it, and its queued
work or a due timer ends it.

About 750 lines, read whole on purpose: this is the one place where the actor's turn is
decided (a message, the worklist loop that performs the core's effects, the end of the turn and
what thespian watches next, the channel loop's rounds), and each of those steps hands the
next one the serving state; split, a reader would follow one turn across files (STYLE.md's
"one class spread over several files"). Everything that owns state of its own is a module:
the serving state (``session_file_serving``), the channels (``session_file_channels``), the
disk (``session_file_disk``), the waits (``channel_loop``), and every decision (the core).
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

from thespian.actors import ActorExitRequest, ThespianWatch, WakeupMessage, WatchMessage

from sessionlane.actors import ahead, page_merge
from sessionlane.actors._shell import Handler, ShellActor, monotonic_ms, retitle
from sessionlane.actors.channel_loop import ChannelLoop
from sessionlane.actors.confined import failure_detail, is_fd_exhaustion
from sessionlane.actors.disk_errors import named_disk_error
from sessionlane.actors.file_channels import (
    ChannelCallEvent,
    ChannelClosed,
    ChannelEvent,
    ChannelRef,
)
from sessionlane.actors.histogram import FileMetrics
from sessionlane.actors.ownership import OwnedElsewhere
from sessionlane.actors.passivation import Passivation
from sessionlane.actors.session_file_channels import FLUSH_RETRY_S, channel_call, refused_offer
from sessionlane.actors.session_file_effects import (
    ArmCommit,
    ArmRetry,
    ArmTick,
    Deliver,
    DrainWrites,
    Handoff,
    Reserve,
    ShellEffect,
    TakeLegacyLock,
    Warn,
    WriteRecord,
)
from sessionlane.actors.session_file_serving import (
    NOT_STARTED,
    Broken,
    Serving,
    Switches,
    activation_error,
)
from sessionlane.actors.session_file_writes import (
    Commit,
    ReleaseLegacyLock,
    Sync,
    WriteOut,
)
from sessionlane.actors.timers import ChannelFlush, CommitDue, IdleCheck, LeaseTick, LegacyRetry
from sessionlane.messages.carried import CarriedCalls, CarriedLost, CarriedReplies
from sessionlane.messages.errors import ErrorCode, SessionLaneError
from sessionlane.messages.internal import (
    ActivationFailed,
    Drain,
    Drained,
    FileInit,
    FileReply,
    FileStatusAnswer,
    FileStatusQuery,
    IdleNotice,
    LaneCall,
    OpenChannel,
)
from sessionlane.messages.wire import Abandon, Append, Direct, Error, FileStatus
from sessionlane.messages.wire import Reply as ReplyMessage

__all__ = ["Broken", "SessionFile", "activation_error"]

_SLOW = frozenset({WriteOut, Commit, Sync, Reserve, TakeLegacyLock, WriteRecord})
"""Effects that wait for the disk: the clock is read again after them."""

log = logging.getLogger(__name__)


def appends_follow(events: list[ChannelEvent], index: int) -> bool:
    """Are events ``index`` and the one after it appends under a lease on one channel?"""
    if index + 1 >= len(events):
        return False
    this, after = events[index], events[index + 1]
    return (
        isinstance(this, ChannelCallEvent)
        and isinstance(after, ChannelCallEvent)
        and this.conn == after.conn
        and isinstance(this.call.request, Append)
        and isinstance(after.call.request, Append)
        and this.call.request.lease is not None
        and after.call.request.lease is not None
    )


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
        self.run_owned: bool | None = None  # owner lock checked in this run? None: no run
        self.ahead_due = False  # the first fences are to be reserved once a channel is answered
        self.loop: ChannelLoop | None = None  # channels served in the turn (``channel_loop``)
        self.deliveries = 0  # messages thespian delivered (its passes that reached this actor)

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
        self.deliveries += 1
        watch = self.turn(msg, sender)
        if self.loop is None or watch is None:
            return watch
        return self.hold(self.loop, watch)

    def turn(self, msg: Any, sender: Any) -> ThespianWatch | None:
        """One message handled, then the end of the turn: what thespian should watch next."""
        super().receiveMessage(msg, sender)
        if isinstance(msg, ActorExitRequest):
            return None
        if isinstance(self.state, Broken):
            self.report_broken(self.state)
            return None
        return self.end_turn(self.state)

    def hold(self, loop: ChannelLoop, watch: ThespianWatch) -> ThespianWatch | None:
        """Serve the channels in this turn while thespian has nothing to do
        (``sessionlane.actors.channel_loop``): each round is the ``WatchMessage`` thespian's
        next pass would have delivered, handled as one. The turn goes back to thespian when it
        may have work, a timer is due, or the hold's time is up; at once while a carried
        connection is open (its frames come in thespian messages) or the file is retiring."""
        until = loop.until()
        while True:
            s = self.state
            if not isinstance(s, Serving) or self.idle.retiring or s.channels.carried.connections():
                return watch
            try:  # nothing out of this turn: thespian would deliver its message again
                ready = loop.wait(watch.filenos, s.ready_fd, until)
            except Exception:
                log.exception("waiting for the channels of %s in its turn failed", self.path)
                loop.failed()
                return watch
            if ready is None:
                return watch
            try:
                next_watch = self.turn(WatchMessage(ready), None)
            except Exception:
                log.exception("serving the channels of %s in its turn failed", self.path)
                loop.failed()
                return self.watch_after_failure(watch)
            if next_watch is None:
                return None
            watch = next_watch

    def watch_after_failure(self, watch: ThespianWatch) -> ThespianWatch | None:
        """What thespian watches after a round that raised: the channels, and the pipe while
        acks are held (their pass must still end), from the state the round left."""
        s = self.state
        if not isinstance(s, Serving):
            return watch
        fds = s.watched(not s.core.commit.idle())
        return ThespianWatch(fds) if fds else None

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
        commit logic runs again for what that changed. A pass awaited with no input waiting
        is ended here, once per message (``end_pass_here``).
        """
        ended_here = False
        while True:
            try:
                pass_end = s.core.after_message()
                self.run(s)
                if s.core.record_due:
                    self.write_record(s)
            except Exception:
                log.exception("group commit of %s failed", self.path)
                pass_end = False
            closed, arm = s.channels.flush()
            if self.ahead_due and s.channels.connections():
                self.reserve_ahead(s)
            self.send_carried(s)
            if arm:
                self.wakeupAfter(FLUSH_RETRY_S, payload=ChannelFlush())
            if closed:
                for event in closed:
                    self.on_channel_closed(s, event)
                continue
            if pass_end and not ended_here and self.end_pass_here(s):
                ended_here = True
                continue
            fds = s.watched(pass_end)
            return ThespianWatch(fds) if fds else None

    def end_pass_here(self, s: Serving) -> bool:
        """End the group-commit pass now if no input waits: True if it was ended.

        A pass ends once the transport delivered what it had read; the always-readable pipe
        (``Serving.ready_fd``) says so through one more thespian pass, a whole turn of its
        loop. When no channel socket is readable (a poll that does not wait) and no carried
        connection is open, nothing can join this pass, so it ends here: with one writer (a
        lease's holder, a file per client) that is one thespian pass fewer per append.
        """
        if s.ready_fd is None or s.channels.input_waiting():
            return False
        try:
            s.core.pass_ended(self.now())
            self.run(s)
        except Exception:
            log.exception("group commit of %s failed", self.path)
            return False  # the pipe's pass tries again
        return True

    # Lifecycle -----------------------------------------------------------------------------

    def on_init(self, msg: FileInit, sender: Any) -> None:
        if self.incarnation and msg.incarnation == self.incarnation and msg.path == self.path:
            return  # had with its start arguments (``sessionlane.actors.ahead``): nothing new
        self.path = msg.path
        retitle(self, f"file {msg.path}")
        if msg.settings.memory_merge and (why := page_merge.opt_in()) is not None:
            log.debug("%s: pages not merged: %s", msg.path, why)  # said once, at the start
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
            ahead.close_inherited()  # its first askers ask again: the refusal answers
            return
        listener = ahead.take_inherited()
        if listener is not None:  # offered by the Registry already: served from now on
            self.state.channels.adopt(*listener)
        self.state.channels.take_tickets(msg.tickets)  # before anything is accepted
        if self.watch_supported:
            self.loop = ChannelLoop.attach(self, msg.settings.channel_loop_ms)
        self.ahead_due = True
        self.schedule_idle(self.state)
        self.run(self.state)  # an awaited holder's grace ends even if nobody asks

    def reserve_ahead(self, s: Serving) -> None:
        """Once, at the end of the first turn that answered a channel (its welcome is written):
        make the first block of fences durable while the peer's next call is on its way (a
        direct client's ticket goes back through the gateway first), so the first grant does
        not wait for those fsyncs. A failure leaves the reservation to that grant, which
        reports it."""
        self.ahead_due = False
        ceiling = s.table.reserve_ahead()
        if ceiling is not None and s.reserve(ceiling) is None:
            s.table.reserved(ceiling)

    def on_exit(self, msg: ActorExitRequest, sender: Any) -> None:
        s = self.state
        if not isinstance(s, Serving):
            return
        now = self.now()
        s.core.fail_queued("unavailable", "the file's actor is exiting", now)
        self.run(s)
        s.core.push([Commit()])
        self.run(s)
        self.write_record(s)
        self.state = Broken("unavailable", "the file's actor is exiting")
        s.close()
        self.send_carried(s)

    def on_drain(self, msg: Drain, sender: Any) -> None:
        s = self.state
        if isinstance(s, Serving):
            now = self.now()
            s.core.push([Commit()])
            self.run(s)
            s.core.shutdown(now)
            self.run(s)
            s.core.fail_queued("shutting_down", "the service is stopping", now)
            self.run(s)
            s.core.push([Commit()])
            self.run(s)
        self.send(sender, Drained(files=1))

    # Calls ---------------------------------------------------------------------------------

    def from_registry(self, *, activity: bool = True) -> None:
        """Count a message the Registry forwarded; ``activity=False``: a status query."""
        if self.idle.forwarded(self.now(), activity=activity) and isinstance(self.state, Serving):
            self.schedule_idle(self.state)

    def touch(self) -> None:
        self.idle.touch(self.now())

    def serve(self, call: LaneCall) -> None:
        """One call, from the Registry or from a channel: the core decides, the shell performs."""
        s = self.state
        if isinstance(s, Broken):
            error = Error(id=call.request.id, code=s.code, detail=s.detail, path=call.path)
            self.reply(call, error)
            return
        if isinstance(call.request, Direct):
            self.reply(call, s.channels.offer_direct(call))
            return
        if isinstance(call.request, Abandon):
            # Its direct channels go first: their leases are abandoned with them.
            for closed in s.channels.close_direct(call.lane.uid):
                self.on_channel_closed(s, closed, "the client's gateway lane was abandoned")
            if self.state is not s:
                return
        s.directory.sync_pending()  # a transcript created at activation: durable first
        s.core.met(call)
        if not self.run_owned and s.core.may_grant_or_write(call):
            if not self.own_path(s, call):
                return
            if self.run_owned is not None:
                self.run_owned = True  # checked after this run's frames arrived: enough
        s.core.push(s.core.call(call, self.now()))
        self.run(s)

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
        if check.effects:
            s.core.push(check.effects)
            self.run(s)
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
        now = self.now()
        s.core.shutdown(now, code="unavailable", detail=broken.detail, reason="ownership_lost")
        self.run(s)
        s.core.fail_queued(broken.code, broken.detail, now)
        self.run(s)
        if call is not None:
            rid = call.request.id
            self.reply(call, Error(id=rid, code=broken.code, detail=broken.detail, path=self.path))
        s.core.push([Commit()])
        self.run(s)
        self.write_record(s)
        s.channels.flush()  # the revocations go out before the channels close
        self.state = broken
        s.close()
        self.send_carried(s)

    # Effects -------------------------------------------------------------------------------

    def run(self, s: Serving) -> None:
        """Perform what the core asks, one effect at a time, feeding each outcome back; then
        the lease record and the next tick (``FileCore.settle``), performed the same way.

        The clock is read once, and again after each effect that waits for the disk."""
        core = s.core
        if not core.work and not core.unsettled:
            return
        now = started = self.now()
        try:
            while True:
                while (fx := core.next(now)) is not None:
                    self.perform(s, fx, started)
                    if type(fx) in _SLOW:
                        now = self.now()
                if not core.unsettled:
                    return
                core.settle(now, time.time() * 1000)
        except BaseException:
            left = core.interrupted()
            if left:
                core.push(left)
                while (fx := core.next(self.now())) is not None:
                    self.perform(s, fx, started)
            raise

    def write_record(self, s: Serving) -> None:
        """A record a write changed that no answer took out (``FileCore.next``) yet."""
        if (record := s.core.record_now()) is not None:
            self.perform(s, record, self.now())

    def perform(self, s: Serving, fx: ShellEffect, started: float) -> None:
        """One effect of the core; an outcome goes back to it."""
        match fx:
            case Deliver(address=address, message=message):
                if isinstance(address, ChannelRef):
                    s.channels.send(address, message)
                else:
                    self.send(address, message)
            case WriteOut(op=op, repair_tail=repair, rest=rest):
                fsync = op.kind == "append" and op.durability == "fsync"
                outcome = s.disk.write(op.kind, fx.data, fsync, repair)
                identity = s.transcript.identity
                s.core.written(op, outcome, self.now(), identity.ino, identity.size, rest)
            case Commit():
                took = s.disk.sync_now()  # first: its failure is the one the commit takes
                s.core.committed(s.sync.take_error(), took)
            case Sync():
                s.core.synced(s.disk.sync_now())
            case WriteRecord(record=record):
                s.records.try_write(record)  # a failure is logged: the answers still leave
            case Reserve(ceiling=ceiling):
                if (failed := s.reserve(ceiling)) is not None:  # the grant after it is undone
                    log.warning("fence reservation of %s failed: %s", self.path, failed)
                    s.core.reservation_failed(failed, self.now())
            case TakeLegacyLock(lease=lease):
                s.core.locked(s.disk.take_legacy(lease), self.now())
            case ReleaseLegacyLock():
                s.disk.release_legacy()
            case ArmTick(due=due):
                self.wakeupAfter(max(0.0, due - self.now()) / 1000.0, payload=LeaseTick(due))
            case ArmRetry(delay=delay):
                self.wakeupAfter(delay, payload=LegacyRetry())
            case ArmCommit(due=due):
                self.wakeupAfter(max(0.0, due - self.now()) / 1000.0, payload=CommitDue(due))
            case Handoff(waited_ms=waited_ms):
                self.metrics.observe("grant_wait", waited_ms)
                self.metrics.observe("handoff", self.now() - started)
            case Warn(message=message):
                log.warning(message)

    # Messages to lanes ---------------------------------------------------------------------

    def reply(self, call: LaneCall, message: ReplyMessage) -> None:
        """Answer ``call``: through the core's outbox while serving, else at once."""
        s = self.state
        if isinstance(s, Serving):
            s.core.reply(call, message)
            self.run(s)
        else:
            lane = call.lane.uid
            self.send(call.lane.address, FileReply(path=self.path, message=message, lane=lane))

    def decide(self, s: Serving) -> None:
        """The held batch's pass ended (or its wait timed out): sync, pass again, or wait."""
        s.core.decide(self.now())
        self.run(s)

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
            self.on_channel_closed(s, ChannelClosed(ref), msg.reason, tell=True, keep=msg.keep_ms)

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
        ready_fd = s.ready_fd
        if ready_fd is not None and ready_fd in msg.ready:
            s.core.pass_ended(self.now())
            self.run(s)

    def on_channel_events(
        self, s: Serving, events: list[ChannelEvent], why: str = "the gateway's channel closed"
    ) -> None:
        """Calls and closes from a channel, whichever carried them; ``why``: a close's reason.

        One run: the owner lock is checked once, before its first call (``serve``), all its
        frames having arrived; a check that refused or failed is made again by the next call.
        """
        self.run_owned = False
        writes = s.core.writes
        try:
            for index, event in enumerate(events):
                if self.state is not s:  # the file was lost to another owner: channels closed
                    return
                if isinstance(event, ChannelCallEvent):
                    # appends read together are written together: one write (pipelining.md)
                    writes.gathering = appends_follow(events, index)
                    self.on_channel_call(s, event)
                else:
                    self.on_channel_closed(s, event, why)
        finally:
            self.run_owned = None
            if writes.gathering:
                writes.gathering = False
                if self.state is s:
                    s.core.push([DrainWrites()])
                    self.run(s)

    def on_channel_call(self, s: Serving, event: ChannelCallEvent) -> None:
        """A call on a channel: served like a ``LaneCall`` but not counted in ``received``."""
        call = channel_call(self.path, event.conn, event.call, s.channels.lane_refs)
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
        keep: int = 0,
    ) -> None:
        """Abandon every lane that was reached through the closed channel, and forget it.

        ``tell``: the channel's last output still goes (a lost member's carried channel), so
        the abandon is an event (no id), which its lane reports as ``revoked``, ``member_lost``.
        ``keep``: a lost member's lanes' leases are kept that long for a reclaim.
        """
        for uid in s.core.through(event.conn):
            try:
                s.core.abandon(uid, self.now(), reason, tell=tell, keep_ms=keep)
                self.run(s)
            except Exception:
                log.exception("abandoning lane %s of %s failed", uid, self.path)
            s.core.forget(uid)

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
                s.core.tick_due(due)
                if self.own_path(s):  # a tick may grant the next waiter
                    s.core.tick(self.now())
                    self.run(s)
            case CommitDue(due=due):
                s.core.commit_due(due, self.now())
                self.run(s)
            case LegacyRetry():
                s.core.retry_due()
                if self.own_path(s):
                    s.core.push([DrainWrites()])
                    self.run(s)
            case IdleCheck(activity=seen):
                self.on_idle(s, seen)
            case ChannelFlush():
                s.channels.flush_due()  # end_turn writes what is left

    def schedule_idle(self, s: Serving) -> None:
        """Arm the idle timer, unless it is armed (or the file is retiring)."""
        delay_ms = self.idle.arm(self.now(), s.settings.idle_ms)
        if delay_ms is not None:
            self.wakeupAfter(delay_ms / 1000.0, payload=IdleCheck(self.idle.activity))

    def on_idle(self, s: Serving, seen: int) -> None:
        """The idle timer fired: ask to be passivated if nothing happened and nothing is open.

        Direct channels of clients (``docs/direct-channel.md``) idle that long, with nothing
        held or waited for, are closed first: the client opens one again when it needs it, as
        the gateway does its own channels."""
        if seen == self.idle.activity and s.core.quiet():
            for closed in s.channels.close_direct(None):
                self.on_channel_closed(s, closed, "the direct channel was idle")
        quiet = s.core.quiet() and s.channels.connections() == 0
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
            return s.status(self.path)
        extra = {
            "incarnation": self.incarnation,
            "restarted": int(self.restarted),
            "deliveries": self.deliveries,
            **(self.loop.counters() if self.loop is not None else {"loop_rounds": 0}),
            **self.metrics.counters(),
        }
        return s.status(self.now(), s.core.name, extra)
