"""The deciding core of a SessionFile: what a call does, and what the lease table's effects mean.

Pure: no I/O, no clock (``now`` comes in), no actor. ``FileCore`` owns the file's
``LeaseTable`` and ``WritePath`` and answers two questions for the shell
(``sessionlane.actors.session_file.SessionFile``):

* ``call(call, now)`` (a reclaim and an append resent after a restart excepted: the shell
  answers those from the lease record, ``sessionlane.actors.reclaim``): which part a lane's
  request goes to, and the effects it returns
  (a lease request's table effects wrapped in ``TableEffects``; a write's effects followed by
  ``DrainWrites``, the shell's cue to perform the write queue);
* ``meaning(effect)``: what one effect of the lease table means, as effects the shell performs:
  ``Reserve`` (make a fence ceiling durable), ``Answer`` (a table request's reply; a grant
  carries the lease's reclaim secret, issued at its first grant),
  ``Event`` (to a lane), ``Handoff`` (a grant to a waiter, for the metrics),
  ``Warn``, and ``DrainWrites`` when the grant was a lease-less append's short write lease (the
  write path queues it; the shell drains). Translated one effect at a time, as the shell
  performs them: a fence reservation that fails stops the grant after it from being applied.

The shell performs the effects in order and feeds back what the disk did
(``WritePath.written``); see docs/architecture.md for what is still to move here.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sessionlane.actors import lease_table as lt
from sessionlane.actors.confined import failure_detail, is_fd_exhaustion
from sessionlane.actors.disk_errors import disk_error_code
from sessionlane.actors.lease_table import LeaseTable
from sessionlane.actors.reclaim import ReclaimBook
from sessionlane.actors.session_file_writes import (
    TableEffects,
    WriteEffect,
    WritePath,
    call_key,
)
from sessionlane.messages import wire
from sessionlane.messages.errors import ErrorCode, SessionLaneError
from sessionlane.messages.internal import FileReply, LaneCall
from sessionlane.messages.wire import (
    Abandon,
    Acquire,
    Append,
    Error,
    Recover,
    Release,
    Rewrite,
)
from sessionlane.messages.wire import Reply as ReplyMessage

__all__ = ["Answer", "CoreEffect", "DrainWrites", "Event", "FileCore", "Handoff", "Reserve", "Warn"]


@dataclass(frozen=True, slots=True)
class Reserve:
    """Make fences up to ``ceiling`` durable before the grant that follows."""

    ceiling: int


@dataclass(frozen=True, slots=True)
class Answer:
    """Answer the table request ``req`` (lane uid, request id) of ``lane`` with ``message``."""

    req: Any
    lane: Any
    message: ReplyMessage


@dataclass(frozen=True, slots=True)
class Event:
    """Send ``message`` (a revocation, an abort request) to the lane ``lane``."""

    lane: Any
    message: FileReply


@dataclass(frozen=True, slots=True)
class Handoff:
    """A lease was handed to a waiter that waited ``waited_ms`` (observed by the metrics)."""

    waited_ms: float


@dataclass(frozen=True, slots=True)
class Warn:
    """Log ``message`` as a warning (the table's diagnostics)."""

    message: str


@dataclass(frozen=True, slots=True)
class DrainWrites:
    """Perform the write queue (its first write may need the legacy lock)."""


CoreEffect = Reserve | Answer | Event | Handoff | Warn | DrainWrites | TableEffects


class FileCore:
    """The lease table and the write path of one file, and how a call reaches them."""

    def __init__(
        self,
        path: str,
        table: LeaseTable,
        writes: WritePath,
        book: ReclaimBook,
        *,
        reclaim_until_ms: float = 0.0,
        new_secret: Callable[[], str] = lambda: secrets.token_urlsafe(24),
    ) -> None:
        self.path = path
        self.table = table
        self.writes = writes
        self.book = book
        """The reclaim secrets of the leases granted (``sessionlane.actors.reclaim``)."""
        self.reclaim_until_ms = reclaim_until_ms
        """Until then (the service's restart grace), an acquire keeps the wait it reports."""
        self.new_secret = new_secret
        self.unreserved: tuple[ErrorCode, str, float] | None = None
        """A fence reservation failed (``reservation_failed``): the grant after it is undone."""

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

    def call(self, call: LaneCall, now: float) -> list[WriteEffect | DrainWrites]:
        """What ``call`` does: the table's effects (``TableEffects``) or the write path's."""
        key, lane, req = call_key(call), call.lane.uid, call.request
        match req:
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
                return [*self.writes.append_under_lease(call, req), DrainWrites()]
            case Append():
                return [*self.writes.append_without_lease(call, req, now), DrainWrites()]
            case Rewrite():
                return [*self.writes.rewrite(call, req), DrainWrites()]
        return [TableEffects(effects)]

    def meaning(self, fx: lt.Effect) -> list[CoreEffect]:
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
                granted = wire.Granted(
                    lease=fx.lease, fence=fx.fence, path=path, purpose=fx.purpose, secret=secret
                )
                return [*self.handoff(fx), Answer(fx.req, fx.lane, granted)]
            case lt.Queue() if self.writes.is_pending(fx.req):
                return []  # a short write answers once, with `appended`
            case lt.Queue():
                return [Answer(fx.req, fx.lane, wire.Queued(position=fx.position))]
            case lt.Skip():
                return [Answer(fx.req, fx.lane, wire.Skipped(path=path))]
            case lt.Reject():
                copies = self.writes.rejected(fx.req)  # a lease-less append delivered again
                error = Error(code=fx.code, detail=fx.detail, path=path)
                return [Answer(fx.req, fx.lane, error) for _ in range(1 + len(copies))]
            case lt.Released() if self.writes.released_silently(fx.req):
                return []
            case lt.Released():
                return [Answer(fx.req, fx.lane, wire.Released(lease=fx.lease))]
            case lt.Abandoned():
                return [Answer(fx.req, fx.lane, wire.Abandoned(leases=list(fx.leases)))]
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
