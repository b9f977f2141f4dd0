"""The deciding core of a SessionFile: every decision about one file, spoken only in effects.

Pure: no I/O, no clock (``now`` comes in), no actor. ``FileCore`` owns the file's
``AwaitingTable`` (the lease table, ``sessionlane.actors.awaited``), ``WritePath`` (which asks
the table through the core: ``table_request``), ``ReclaimBook`` (the lease record as this
actor knows it), the
pure part of group commit (``GroupCommit``: the outbox, the pass, the policy) and the lanes
directory (uid to address and name). The shell
(``sessionlane.actors.session_file.SessionFile``) keeps one worklist loop:

    core.push(core.call(call, now))
    while (fx := core.next(now)) is not None:
        perform fx, and feed its outcome back (``written``, ``locked``, ``reservation_failed``,
        ``committed``)

``next`` reads the worklist itself as far as it can: a lease-table effect is translated
(``meaning``), a reply or an event goes to the outbox (held behind an unsynced ack, or handed
out as ``Deliver``), a drain takes the next queued write. It stops at the first effect only
the shell can perform (``session_file_effects.ShellEffect``). An outcome fed back goes to
the front of the worklist, so a write's consequences (a short write lease released, the next
queued lease-less append granted) are read before the drain's next write, and a failed fence
reservation stops the grant that follows it. ``settle`` ends a run that read a table effect:
the lease record follows the holder and the table's next deadline is armed.

Also decided here: the lanes of a closed channel (abandoned), whether other lanes may write
before a held batch is synced, and whether a call may grant or write (``may_grant_or_write``:
the shell checks the owner lock only before those, ``docs/grantcost.md``). A reclaim, an
append resent after a restart, a lost member's lease kept and the holder awaited at
activation are decided by ``sessionlane.actors.awaited`` (over this core's table and book).

About 700 lines: every decision that needs the table, the write path and the book together
lives here (an append that releases its lease needs all three: ``resent``, ``committed``); the
parts that need one of them only have moved out (``awaited``, the write path and its
``append_release``, ``session_file_effects``), and what could go next is named in
``docs/architecture.md``.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from collections.abc import Callable
from typing import Any, get_args

from sessionlane.actors import awaited
from sessionlane.actors import lease_table as lt
from sessionlane.actors.awaited import AwaitingTable
from sessionlane.actors.confined import failure_detail, is_fd_exhaustion
from sessionlane.actors.disk_errors import disk_error_code
from sessionlane.actors.file_channels import ChannelRef
from sessionlane.actors.group_commit import Outgoing
from sessionlane.actors.reclaim import DoneAppend, LeaseRecord, ReclaimBook
from sessionlane.actors.session_file_commit import GroupCommit, SyncFailure
from sessionlane.actors.session_file_disk import LockOutcome, WriteOutcome
from sessionlane.actors.session_file_effects import (
    Answer,
    ArmCommit,
    ArmRetry,
    ArmTick,
    CoreEffect,
    Deliver,
    DrainWrites,
    Event,
    Handoff,
    Resent,
    Reserve,
    ShellEffect,
    TableEffects,
    TakeLegacyLock,
    Warn,
    WriteNext,
    WriteRecord,
)
from sessionlane.actors.session_file_writes import (
    AskWriteLease,
    CheckLease,
    Commit,
    Notify,
    ReleaseWriteLease,
    Reply,
    Sync,
    TableRequest,
    WriteEffect,
    WriteOp,
    WritePath,
    Wrote,
    call_key,
)
from sessionlane.messages import trusted, wire
from sessionlane.messages.errors import ErrorCode, SessionLaneError
from sessionlane.messages.internal import FileReply, LaneCall
from sessionlane.messages.wire import (
    Abandon,
    Acquire,
    Append,
    Appended,
    Error,
    Recover,
    Release,
    Rewrite,
    Rewritten,
)
from sessionlane.messages.wire import Reply as ReplyMessage

__all__ = ["Answer", "CoreEffect", "DrainWrites", "Event", "FileCore", "Handoff", "Reserve", "Warn"]

_RECORD_FIRST = (Deliver, Sync, Commit)
"""Effects a lease record that a write changed is written before (``FileCore.next``)."""

log = logging.getLogger(__name__)


_WRITE_NEXT = WriteNext()


def _rid(req: Any) -> Any:
    """The request id in a table request key, (lane uid, request id) (``call_key``)."""
    _, rid = req
    return rid


class FileCore:
    """Lease table, write path, lease record, outbox and lanes of one file, and their rules."""

    def __init__(
        self,
        path: str,
        table: AwaitingTable,
        writes: WritePath,
        book: ReclaimBook,
        *,
        commit: GroupCommit | None = None,
        reclaim_until_ms: float = 0.0,
        new_secret: Callable[[], str] = lambda: secrets.token_urlsafe(24),
    ) -> None:
        self.path = path
        self.table = table
        self.writes = writes
        self.book = book
        """The lease record and the reclaim secrets of the leases granted."""
        self.commit = commit if commit is not None else GroupCommit(path, None, watch=False)
        self.reclaim_until_ms = reclaim_until_ms
        """Until then (the service's restart grace), an acquire keeps the wait it reports."""
        self.new_secret = new_secret
        self.lanes: dict[Any, Any] = {}  # lane uid -> Lane address (or channel)
        self.names: dict[Any, str] = {}  # lane uid -> the name its agent gave it
        self.ino = 0
        self.size = 0
        """The transcript as last written (the shell says so after every ``WriteOut``)."""
        self.work: deque[Any] = deque()
        self.unsettled = True
        """A table effect was read since the last ``settle`` (the shell settles after a run)."""
        self.next_tick: float | None = None  # the earliest LeaseTick armed
        self.record_due = False
        """A write changed the lease record since it was last written: it is written before
        the next ``Deliver`` (the answer it backs cannot leave first), or by ``record_now``."""
        self.syncing: dict[Any, tuple[str, str]] = {}
        """By call key: (lease, aid) of each append with an id whose ack waits for a sync. The
        lease record has it already (``note_write``); a failed sync drops it (``committed``)."""
        self.closes = 0  # keys of the abandons a closed channel causes
        self.unreserved: tuple[ErrorCode, str, float] | None = None
        """A fence reservation failed (``reservation_failed``): the grant after it is undone."""
        self.read: dict[type, Callable[[Any, float], ShellEffect | None]] = {
            Reply: self.read_reply,
            **dict.fromkeys(get_args(lt.Effect), self.read_table_effect),
            TableEffects: self.read_table_effects,
            **dict.fromkeys((CheckLease, AskWriteLease, ReleaseWriteLease), self.read_request),
            Answer: self.read_answer,
            Event: self.read_event,
            Notify: self.read_event,
            Wrote: self.read_wrote,
            DrainWrites: self.read_drain,
            WriteNext: self.read_write_next,
            Resent: self.read_resent,
        }

    # Calls ---------------------------------------------------------------------------------

    def met(self, call: LaneCall) -> None:
        """A call of ``call.lane``: where its replies and events go from now on."""
        self.lanes[call.lane.uid] = call.lane.address
        self.names[call.lane.uid] = call.lane.name

    def name(self, uid: Any) -> str:
        return self.names.get(uid, str(uid))

    def call(self, call: LaneCall, now: float) -> list[Any]:
        """What ``call`` does: the table's effects (``TableEffects``) or the write path's."""
        key, lane, req = call_key(call), call.lane.uid, call.request
        if back := self.table.came_back(lane, now):  # its lease was kept for a reclaim
            self.push([TableEffects(back)])
        match req:
            case Acquire() if req.reclaim is not None:
                name, ino, size = self.name(lane), self.ino, self.size
                effects = awaited.reclaim(
                    self.table, self.book, key, lane, name, req.reclaim, ino, size, now
                )
            case Acquire():
                in_grace = now < self.reclaim_until_ms
                effects = self.table.acquire(
                    key,
                    lane,
                    req.purpose,
                    now,
                    priority=req.priority or "interactive",
                    on_contention=req.on_contention,
                    wait_timeout_ms=req.wait_timeout_ms,
                    max_hold_ms=req.max_hold_ms,
                    waited_ms=(req.waited_ms or 0) if in_grace else 0,
                )
            case Release():
                effects = self.table.release(key, lane, req.lease, now)
            case Abandon():
                reason = req.reason or "requested by the lane"
                effects = self.table.abandon(key, lane, now, reason=reason)
            case Recover():
                effects = self.table.recover(key, lane, req.grace_ms, now, reason=req.reason)
            case Append() if req.lease is not None:
                if (resent := self.resent(call, req)) is not None:
                    return resent
                return [*self.writes.append_under_lease(call, req), DrainWrites()]
            case Append():
                return [*self.writes.append_without_lease(call, req), DrainWrites()]
            case Rewrite():
                return [*self.writes.rewrite(call, req), DrainWrites()]
        return [TableEffects(effects)]

    def resent(self, call: LaneCall, req: Append) -> list[Any] | None:
        """An append with an ``aid`` already written under its lease (resent after a restart,
        or delivered again): its first answer (``Resent``), None if it is not one.

        One that released its lease (``Append.release``) is answered as written and released
        even once its lease is gone (the lease record keeps it: ``ReclaimBook.released_by``);
        one written whose release was not performed yet (the service restarted between the
        write and the release) releases now, grant first; one whose release waits for the sync
        of its first delivery (a copy under another call key, after a reconnect) is answered
        after that sync, as that delivery is (``released`` only if it did); so is any append
        whose first answer waits for a sync (a failed sync fails both: ``committed``), and a
        resend that adds a release to a first send without one releases only once that sync
        succeeds (held by its own call key, ``ReleasingAppends.hold``), never if it fails."""
        assert req.lease is not None
        book, writes = self.book, self.writes
        waits = False
        if req.release and (done := book.answered_released(req.lease, req.aid, req.fence)):
            release = False
        elif (done := awaited.resent(self.table, book, call.lane.uid, req)) is not None:
            releases_after = bool(req.release) and writes.releasing.waiting(req.lease, req.aid)
            release = bool(req.release) and not releases_after
            # written, not durable yet: answered by the sync its first answer waits for
            waits = releases_after or (req.lease, req.aid) in self.syncing.values()
        else:
            return None
        writes.counters["duplicates"] += 1
        first = Appended(
            id=req.id,
            offset=done.offset,
            lines=done.lines,
            fence=done.fence,
            released=True if req.release else None,
            offsets=writes.resent_offsets(req, done.offset, done.lines),
        )
        if release:
            releases = writes.releasing.release(call.lane.uid, req.lease, req.aid, first)
            if waits:  # its first send (no release) waits for its sync: release after it
                writes.releasing.hold(call_key(call), releases)
                return [Resent(call, first, after_sync=True)]
            return [releases, Resent(call, first)]
        return [Resent(call, first, after_sync=waits)]

    def may_grant_or_write(self, call: LaneCall) -> bool:
        """Could ``call`` grant a lease or write the transcript? Decided before it is served,
        and False only when it surely cannot: an ``Acquire`` (no reclaim, no recovery) while
        another lane holds the file (it can only queue, skip or be refused), or a ``Release``
        with nobody waiting and no write queued (nothing to grant). The shell checks the
        owner lock before every call for which this is True (``SessionFile.serve``); a call
        it skips leaves the check to the next call of its run, or to the next run."""
        req, table = call.request, self.table
        holder = table.holder
        match req:
            case Acquire() if req.reclaim is None and req.purpose != "recovery":
                return holder is None or holder.state != "held" or holder.lane == call.lane.uid
            case Release():
                return bool(table.waiters) or bool(self.writes.queue)
        return True

    def through(self, conn: ChannelRef) -> list[Any]:
        """The lanes reached through the channel ``conn``."""
        return [u for u, a in self.lanes.items() if isinstance(a, ChannelRef) and a == conn]

    def abandon(
        self, uid: Any, now: float, reason: str, *, tell: bool = False, keep_ms: int = 0
    ) -> None:
        """The lane ``uid`` is gone with its channel: its lease and requests are dropped.
        ``tell``: its lane still hears of it (the abandon answered as an event, no id).
        ``keep_ms`` (its convention member was lost): a lease the lease record names is kept
        that long for a reclaim through another lane (``awaited.keep_for_reclaim``)."""
        if tell:
            key: Any = (uid, None)
        else:
            self.closes += 1
            key = ("closed", self.closes)
        name = self.name(uid)
        kept = awaited.keep_for_reclaim(self.table, self.book, key, uid, name, now, reason, keep_ms)
        effects = kept if kept is not None else self.table.abandon(key, uid, now, reason=reason)
        self.push([TableEffects(effects)])

    def forget(self, uid: Any) -> None:
        """The lane ``uid`` is unreachable: nothing more goes to it."""
        self.lanes.pop(uid, None)
        self.names.pop(uid, None)

    # The lease table's effects -------------------------------------------------------------

    def meaning(self, fx: lt.Effect) -> list[CoreEffect | TableEffects]:
        """What one effect of the lease table means for the lanes and the write path."""
        path = self.path
        match fx:
            case lt.ReserveFences(ceiling=ceiling):
                return [Reserve(ceiling)]
            case lt.Grant() if self.unreserved is not None:
                # the reservation before this grant failed: undo it, answer with the error
                code, detail, now = self.unreserved
                self.unreserved = None
                return [TableEffects(self.table.reservation_failed(fx, code, detail, now))]
            case lt.Grant() if self.writes.is_pending(fx.req):
                self.writes.granted(fx.req, fx.lease, fx.fence)
                return [*self.handoff(fx), DrainWrites()]
            case lt.Grant():
                secret = self.book.secret_of(fx.lease)
                if secret is None:  # its first grant here (a reentrant one carries it too)
                    secret = self.new_secret()
                    self.book.issue(fx.lease, secret)
                granted = trusted.granted(
                    _rid(fx.req), fx.lease, fx.fence, path, fx.purpose, secret
                )
                return [*self.handoff(fx), Answer(fx.req, fx.lane, granted)]
            case lt.Queue() if self.writes.is_pending(fx.req):
                return []  # a short write answers once, with `appended`
            case lt.Queue():
                return [Answer(fx.req, fx.lane, wire.Queued(id=_rid(fx.req), position=fx.position))]
            case lt.Skip():
                return [Answer(fx.req, fx.lane, wire.Skipped(id=_rid(fx.req), path=path))]
            case lt.Reject() if self.writes.released_silently(fx.req):
                return []  # the lease an append was to release is gone already: kept as is
            case lt.Reject():
                copies = self.writes.rejected(fx.req)  # a lease-less append delivered again
                error = Error(id=_rid(fx.req), code=fx.code, detail=fx.detail, path=path)
                return [Answer(fx.req, fx.lane, error) for _ in range(1 + len(copies))]
            case lt.Released() if self.writes.released_silently(fx.req):
                return []
            case lt.Released():
                return [Answer(fx.req, fx.lane, trusted.released(_rid(fx.req), fx.lease))]
            case lt.Abandoned():
                abandoned = wire.Abandoned(id=_rid(fx.req), leases=list(fx.leases))
                return [Answer(fx.req, fx.lane, abandoned)]
            case lt.Revoke():
                event = wire.Revoked(lease=fx.lease, path=path, reason=fx.reason)
                return [Event(fx.lane, FileReply(path=path, message=event, lane=fx.lane))]
            case lt.AbortRequest():
                abort = wire.AbortRequested(lease=fx.lease, path=path, grace_ms=fx.grace_ms)
                return [Event(fx.lane, FileReply(path=path, message=abort, lane=fx.lane))]
            case lt.Diagnostic(message=message):
                return [Warn(message)]
        return []

    @staticmethod
    def handoff(fx: lt.Grant) -> list[CoreEffect]:
        return [Handoff(fx.waited_ms)] if fx.waited_ms is not None else []

    def table_request(self, fx: TableRequest, now: float) -> list[Any]:
        """What the write path asks of the lease table, performed: a check's verdict goes
        back to it (``WritePath.checked``: an arriving write queued or refused, a queued one
        performed or refused); a short write lease asked for or released is the table's
        (its effects: granted, queued, the next waiter granted...)."""
        table = self.table
        if isinstance(fx, CheckLease):  # twice a write: first
            verdict = table.check_write(fx.call.lane.uid, fx.lease, fx.fence, purpose=fx.purpose)
            if verdict is None and self.writes.releasing:  # as good as released?
                verdict = self.writes.releasing.refusal(table.holder, fx.lease)
            return self.writes.checked(fx, verdict)
        if isinstance(fx, AskWriteLease):
            return [
                TableEffects(table.acquire(fx.req, fx.lane, "write", now, priority=fx.priority))
            ]
        effects = table.release(fx.req, fx.lane, fx.lease, now)
        if fx.appended is not None and fx.aid is not None and isinstance(effects[0], lt.Released):
            reply = fx.appended  # an append that released its lease: the record keeps it
            self.book.released_by(
                fx.lease, DoneAppend(fx.aid, reply.offset, reply.lines, reply.fence)
            )
        return [TableEffects(effects)]

    def reservation_failed(self, exc: Exception, now: float) -> None:
        """The shell could not perform a ``Reserve``: the grant that follows it (the next
        table effect read) is undone and its request answered with this error instead."""
        code: ErrorCode
        if isinstance(exc, SessionLaneError):  # the fence sidecar became a symlink...
            code = exc.code
        elif is_fd_exhaustion(exc):
            code = "too_many_files"
        else:
            code = disk_error_code(exc) or "internal"
        detail = f"the fence reservation failed: {failure_detail(exc)}; nothing was granted"
        self.unreserved = (code, detail, now)

    # The worklist --------------------------------------------------------------------------

    def push(self, effects: list[Any]) -> None:
        """Read ``effects`` next, in order (before what was waiting)."""
        self.work.extendleft(reversed(effects))

    def next(self, now: float) -> ShellEffect | None:
        """Read the worklist up to the next effect the shell must perform (None: done).

        A lease record a write changed goes first of the next ``Deliver``, ``Sync`` or
        ``Commit`` (group commit's fdatasync): one record for a whole batch of writes, never
        an answer before the record it backs, and written before the batch's fdatasync, so a
        kill -9 while the batch syncs leaves a record that already counts its writes."""
        work, read = self.work, self.read
        while work:
            fx = work.popleft()
            reader = read.get(type(fx))
            if reader is not None and (fx := reader(fx, now)) is None:
                continue
            if self.record_due and type(fx) in _RECORD_FIRST:
                work.appendleft(fx)
                self.record_due = False
                return WriteRecord(self.book.record)
            return fx  # type: ignore[no-any-return]
        return None

    def record_now(self) -> WriteRecord | None:
        """The lease record to write now, if a write changed it since it was last written."""
        if not self.record_due:
            return None
        self.record_due = False
        return WriteRecord(self.book.record)

    def read_table_effect(self, fx: Any, now: float) -> ShellEffect | None:
        self.unsettled = True  # the holder or a deadline may have changed
        return self.read_next(self.meaning(fx), now)

    def read_table_effects(self, fx: TableEffects, now: float) -> ShellEffect | None:
        self.unsettled = True
        return self.read_next(fx.effects, now)

    def read_next(self, effects: list[Any], now: float) -> ShellEffect | None:
        """Read ``effects`` next: the one effect of most lists at once, else through the
        worklist."""
        if len(effects) != 1:
            self.push(effects)
            return None
        fx = effects[0]
        reader = self.read.get(type(fx))
        return fx if reader is None else reader(fx, now)

    def read_request(self, fx: TableRequest, now: float) -> ShellEffect | None:
        return self.read_next(self.table_request(fx, now), now)

    def read_answer(self, fx: Answer, now: float) -> Deliver | None:
        _, rid = fx.req
        message = fx.message  # ``meaning`` builds it with its request's id: no copy
        if message.id != rid:
            message = message.model_copy(update={"id": rid})
        return self.event(fx.lane, trusted.file_reply(self.path, message, fx.lane))

    def read_event(self, fx: Event | Notify, now: float) -> Deliver | None:
        return self.event(fx.lane, fx.message)

    def read_reply(self, fx: Reply, now: float) -> ShellEffect | None:
        self.reply(fx.call, fx.message, needs_sync=fx.needs_sync)
        if isinstance(fx.message, Appended | Rewritten):
            req = fx.call.request
            self.note_write(req, fx.message)  # written before its answer leaves
            if fx.needs_sync and isinstance(req, Append) and req.aid and req.lease is not None:
                self.syncing[call_key(fx.call)] = (req.lease, req.aid)
        return None

    def read_resent(self, fx: Resent, now: float) -> None:
        self.reply(fx.call, fx.message, needs_sync=fx.after_sync)

    def read_wrote(self, fx: Wrote, now: float) -> None:
        self.commit.wrote(fx.lane, now)

    def read_drain(self, fx: DrainWrites, now: float) -> ShellEffect | None:
        """Start performing the write queue (under the legacy lock, when configured)."""
        if not self.writes.may_drain():
            return None  # nothing queued, or a drain in progress takes it
        lease = self.writes.lock_for()
        if lease is not None:
            return TakeLegacyLock(lease)
        if self.writes.begin_drain() is not None:  # no lock to take: it always drains
            raise AssertionError("a drain without the legacy lock was refused")
        return self.read_write_next(_WRITE_NEXT, now)

    def read_write_next(self, fx: WriteNext, now: float) -> ShellEffect | None:
        """The drain's next write (its consequences are read before the one after it)."""
        effects = self.writes.next_write()
        if effects is None:
            return self.read_next(self.writes.end_drain(), now)
        self.work.appendleft(_WRITE_NEXT)
        return self.read_next(effects, now)

    # Outcomes ------------------------------------------------------------------------------

    def locked(self, lock: LockOutcome, now: float) -> None:
        """The outcome of ``TakeLegacyLock`` (or no lock needed): drain, or retry later."""
        not_now = self.writes.begin_drain(lock)
        if not_now is None:
            self.push([_WRITE_NEXT])
            return
        effects: list[Any] = list(not_now)
        if (delay := self.writes.retry_after()) is not None:
            effects.append(ArmRetry(delay))
        self.push(effects)

    def written(
        self,
        op: WriteOp,
        outcome: WriteOutcome,
        now: float,
        ino: int,
        size: int,
        rest: tuple[WriteOp, ...] = (),
    ) -> None:
        """The outcome of ``WriteOut`` (of ``op`` and the ``rest`` of its pipeline), and the
        transcript's inode and size after it."""
        self.ino, self.size = ino, size
        self.push(self.writes.written(op, outcome, rest))

    def interrupted(self) -> list[WriteEffect]:
        """Performing failed (a bug: every I/O failure is an outcome fed back, never raised,
        ``docs/restarts.md``): what was left is dropped, decided by a state the bug may have
        left wrong; a drain ends."""
        self.work.clear()
        return self.writes.end_drain() if self.writes.draining else []

    # The outbox ----------------------------------------------------------------------------

    def reply(self, call: LaneCall, message: ReplyMessage, *, needs_sync: bool = False) -> None:
        """Answer ``call``; ``needs_sync``: only once an fdatasync covers the append it acks.

        The first answer of an append delivered again while that answer is still held waits
        for the same sync (a failed one turns both into its error)."""
        lane = call.lane.uid
        key = None
        if needs_sync or (self.commit.outbox.acks and isinstance(message, Appended)):
            key = call_key(call)
            needs_sync = needs_sync or key in self.commit.outbox.acks
        out = Outgoing(
            lane=lane,
            address=call.lane.address,
            message=trusted.file_reply(self.path, message, lane),
            needs_sync=needs_sync,
            key=key if needs_sync else None,
        )
        if self.commit.hold(out):
            self.work.appendleft(Deliver(out.address, out.message))

    def event(self, lane: Any, message: FileReply) -> Deliver | None:
        """Send ``message`` to the lane ``lane`` (dropped if the lane is unknown): the
        ``Deliver`` to perform now, or None (held behind an unsynced ack, or dropped)."""
        address = self.lanes.get(lane)
        if address is None:
            return None
        out = Outgoing(lane=lane, address=address, message=message, needs_sync=False)
        return Deliver(address, message) if self.commit.hold(out) else None

    def synced(self, elapsed_ms: float | None) -> None:
        """A sync took ``elapsed_ms`` (None: nothing to sync, or it failed): group commit's
        estimate of a sync's cost."""
        if elapsed_ms is not None:
            self.commit.policy.synced(elapsed_ms)

    def committed(self, failure: SyncFailure | None = None, took: float | None = None) -> None:
        """``Commit`` was performed (synced, in ``took`` ms): release what was held; the acks
        a failed sync covered are errors, forgotten by the write path and by the lease record
        (a resend writes again; the record without them is written before those errors leave:
        ``record_due``, ``next``)."""
        self.synced(took)
        done = self.commit.commit(failure)
        for key in done.failed_keys:
            # an append whose sync failed (plain, pipelined, or releasing: it released
            # nothing) is not answered from the record when resent: it is written again
            if (written := self.syncing.get(key)) is not None:
                self.record_due |= self.book.unwrote(*written)
            self.writes.forget(key)
        self.syncing.clear()  # every ack held was released (``GroupCommit.commit``)
        # appends that release their lease do so now that they are durable, before their acks
        # leave: the next holder's grant goes first (``Append.release``)
        releases = self.writes.releasing.synced([out.key for out in done.deliveries])
        self.push([*releases, *(Deliver(out.address, out.message) for out in done.deliveries)])

    def after_message(self) -> bool:
        """After every message: True to watch for the end of the pass (a ``Commit`` is
        pushed when the held batch goes now)."""
        watch = self.commit.after_message()
        if watch is None:
            self.push([Commit()])
            return False
        return watch

    def decide(self, now: float) -> None:
        """The held batch's pass ended (or its wait timed out): sync, pass again, or wait."""
        due = self.commit.decide(now, others_may_write=self.others_may_write())
        if due == "sync":
            self.push([Commit()])
        elif due is not None:
            self.push([ArmCommit(due)])

    def others_may_write(self) -> bool:
        """Could a lane other than the holder append before the holder's acks are released?

        Not while a lane holds a lease it asked for: the others queue until it releases, and
        it releases only once its appends are acknowledged, so waiting for them would only
        delay the hand-off. A lease-less append's short write lease is released as soon as it
        is written, so behind one (or none) the next writer may join the batch.
        """
        holder = self.table.holder
        return holder is None or self.writes.others_may_join(holder.lease)

    def quiet(self) -> bool:
        """Nothing held, queued or waiting: the actor may be passivated."""
        return self.table.idle() and self.commit.idle() and not self.writes.queue

    def shutdown(self, now: float, **why: Any) -> None:
        """Stop granting: every waiter answered, the holder revoked (``LeaseTable.shutdown``:
        the service stops, or ``code``/``detail``/``reason`` say why)."""
        self.push(self.table.shutdown(now, **why))

    def fail_queued(self, code: ErrorCode, detail: str, now: float) -> None:
        """Answer every queued write with this error (the actor exits, the file is lost)."""
        self.push(self.writes.fail_queued(code, detail))

    # Timers --------------------------------------------------------------------------------

    def pass_ended(self, now: float) -> None:
        """The transport delivered what it had read: decide about the held batch, if any."""
        if self.commit.pass_ended():
            self.decide(now)

    def commit_due(self, due: float, now: float) -> None:
        """The ``CommitDue`` armed for ``due`` fired: decide about the waiting batch, if any."""
        if self.commit.timer_fired(due):
            self.decide(now)

    def tick_due(self, due: float) -> None:
        """A ``LeaseTick`` armed for ``due`` fired (the shell then checks ownership: ``tick``)."""
        if self.next_tick is not None and due >= self.next_tick:
            self.next_tick = None

    def tick(self, now: float) -> None:
        """Apply the table's due deadlines; the next one is armed again even if none was."""
        self.push(self.table.tick(now))
        self.unsettled = True

    def retry_due(self) -> None:
        """The legacy lock's retry fired: drain again (once ownership is checked)."""
        self.writes.retry_due()

    # The lease record (``sessionlane.actors.reclaim``) -------------------------------------

    def settle(self, now: float, wall_ms: float) -> None:
        """After the effects of a message: the lease record follows the holder, and a
        ``LeaseTick`` is armed for the table's next deadline unless one as early is."""
        self.unsettled = False
        record = self.note_holder(now, wall_ms)
        if record is not None:
            self.record_due = False  # this one is the newest
            self.work.append(WriteRecord(record))
        due = self.table.next_deadline()
        if due is not None and (self.next_tick is None or due < self.next_tick):
            self.next_tick = due
            self.work.append(ArmTick(due))

    def activate(
        self, record: LeaseRecord, now: float, until: float, wall_ms: float
    ) -> LeaseRecord | None:
        """The lease record found at activation: a holder found there waits for its reclaim
        until ``until`` (the end of the service's grace), or has lost the file (after it:
        the record to write back)."""
        held, lost = awaited.await_recorded(self.table, self.book, record, now, until, wall_ms)
        if held is not None and self.book.record.appends:
            # a pipeline resent after the restart goes on from the last append recorded
            self.writes.resume(held.lease, self.book.record.appends[-1].aid)
        return self.book.record if lost else None

    def note_holder(self, now: float, wall_ms: float) -> LeaseRecord | None:
        """The lease record naming the current holder, if it changed (a stopping file, or one
        still awaiting its holder, keeps its record)."""
        t = self.table
        h = t.holder
        if t.closed or (h is not None and h.state == "awaiting"):
            return None
        lane = "" if h is None else self.name(h.lane)
        return self.book.holder_now(h, lane, self.ino, self.size, now, wall_ms)

    def note_write(self, request: Any, reply: Appended | Rewritten) -> None:
        """A write was answered: the holder's record learns the new size (and the append id);
        it is written before the next answer leaves (``next``)."""
        if self.book.wrote(request, reply, self.ino, self.size) is not None:
            self.record_due = True
