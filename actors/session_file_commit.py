"""How a SessionFile's messages reach its lanes: group commit holds acks until they are durable.

``GroupCommitMixin`` is a part of ``actors.session_file.SessionFile``, not used alone: it
shares the actor's state and reads its clock through ``now()``. Every reply and event to a
lane leaves through it (``reply``, ``answer``, ``send_lane``, then ``emit``). The decisions are
the pure ``actors.group_commit`` (``Outbox``, ``CommitPolicy``); this part carries them out.

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
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from actors.group_commit import CommitPolicy, Outbox, Outgoing
from actors.histogram import FileMetrics
from actors.lease_table import LeaseTable
from actors.transcript import Transcript
from messages.internal import FileReply, LaneCall
from messages.wire import Error, Reply

if TYPE_CHECKING:
    from actors.session_file_writes import _WriteOp

__all__ = ["GroupCommitMixin"]

log = logging.getLogger(__name__)


class GroupCommitMixin:
    """Replies and group commit for ``SessionFile``: the outbox, the pass, the sync."""

    # What this part uses of the rest of the actor.
    group_commit: ClassVar[bool]
    watch_supported: bool
    path: str
    table: LeaseTable | None
    transcript: Transcript | None
    counters: dict[str, int]
    metrics: FileMetrics
    lanes: dict[str, Any]
    done: OrderedDict[Any, Reply]
    write_queue: deque[_WriteOp]

    if TYPE_CHECKING:

        def now(self) -> float: ...
        def key(self, call: LaneCall) -> Any: ...
        def deliver(self, address: Any, message: FileReply) -> None: ...
        def wakeupAfter(self, timePeriod: Any, payload: Any = None) -> None: ...

    def init_group_commit(self) -> None:
        self.outbox = Outbox()
        self.unsynced = False  # an fsync append was written and no fdatasync covers it yet
        self.sync_error: str | None = None
        self.batch = CommitPolicy()
        self.commit_wakeup: float | None = None  # the earliest pending ("commit", due) wakeup
        self.phase: Literal["idle", "pass", "wait"] = "idle"
        self.ready_fd: int | None = None

    # Messages to lanes ---------------------------------------------------------------------

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
        """Send ``out`` now, or hold it in the outbox until the next commit."""
        if self.outbox.put(out):
            self.deliver(out.address, out.message)

    # Group commit --------------------------------------------------------------------------

    def open_pass_end(self) -> None:
        """The always-readable pipe, where the base can watch it and group commit is on."""
        if self.watch_supported and self.group_commit:
            self.ready_fd = _always_readable_fd()

    def close_pass_end(self) -> None:
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None

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
        decision = self.batch.decide(self.now(), others_may_write=self.others_may_write())
        if decision == "sync":
            self.commit()
            return
        self.batch.begin_pass()
        if decision == "wait":
            self.phase = "wait"
            due = self.batch.deadline()
            if self.commit_wakeup is None or due < self.commit_wakeup:
                self.commit_wakeup = due
                self.wakeupAfter(max(0.0, due - self.now()) / 1000.0, payload=("commit", due))

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
        started = self.now()
        try:
            self.transcript.sync("fsync")
            elapsed = self.now() - started
            self.batch.synced(elapsed)
            self.metrics.observe("fsync", elapsed)
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
