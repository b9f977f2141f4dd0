"""The awaited holder: a lease held for nobody until a lane takes it back or its grace ends.

Two things leave a file's lease without a lane for a while: a service restart (the holder
found in the durable lease record, ``sessionlane.actors.reclaim``, is awaited until the end of
the restart grace) and the loss of a convention member (its lane's lease is kept for a
reclaim through another lane, #22). ``AwaitingTable`` is the lease table of a file that may
await such a holder: ``LeaseTable`` (``sessionlane.actors.lease_table``: the queue, the
holder, the fences, knowing nothing of restarts) and the transitions of an awaited holder:

- ``await_reclaim``: the holder of the lease record holds the path for nobody (``Awaited``)
  until ``until``; ``abandon(keep_as=...)``: a lost member's lane's lease is kept so;
- ``reclaim``: a lane takes it back (same lease, same fence, same nesting, what was left of
  its max hold), or moves a lease still held by another lane (``takeover``: its member died
  before this owner noticed); ``refuse_reclaim`` counts a refusal;
- ``came_back``: the lane a lease was kept from speaks again (it was only cut off): the lease
  is dropped and the next waiter granted;
- ``tick``: the grace ends (or a recovery's abort deadline passes): the path is free again,
  without a revocation (nobody holds it to be told);
- while awaited, nothing else is granted (the holder slot is taken), and nobody releases or
  writes under the lease before its reclaim (``release``, ``check_write``); a stopping
  file drops it silently (its lease record stays for the next grace).

Whether a reclaim may be honoured at all (the secret, the transcript unchanged) is the lease
record's to say (``sessionlane.actors.reclaim.ReclaimBook``). The core's restart deciding,
which asks both, is here too, as functions of the table and the book the core owns: a holder
found in the record awaited at activation (``await_recorded``), a reclaim asked
(``reclaim``), an append resent after the restart (``resent``), a lost member's lease kept
(``keep_for_reclaim``). Pure: no I/O, no clock.
"""

from __future__ import annotations

import logging

from sessionlane.actors.lease_table import LeaseTable
from sessionlane.actors.lease_types import (
    Awaited,
    Diagnostic,
    Effect,
    Grant,
    Holder,
    Lane,
    LeasePolicy,
    Reject,
    RejectCode,
    ReqKey,
    Revoke,
    acts_for,
)
from sessionlane.actors.reclaim import DoneAppend, HeldRecord, LeaseRecord, ReclaimBook
from sessionlane.messages.wire import Append, Priority, Purpose, ReclaimTicket, RevokeReason

__all__ = ["AwaitingTable", "await_recorded", "keep_for_reclaim", "reclaim", "resent"]

log = logging.getLogger(__name__)


class AwaitingTable(LeaseTable):
    """The lease table of one path whose holder may be awaited (after a restart, or kept for
    a lost member's lane)."""

    def __init__(
        self, path: str, policy: LeasePolicy, fence_floor: int = 0, *, lease_prefix: str = ""
    ):
        super().__init__(path, policy, fence_floor, lease_prefix=lease_prefix)
        self.counters.update(reclaims=0, reclaims_expired=0, reclaims_refused=0)

    def await_reclaim(
        self,
        lease: str,
        fence: int,
        lane_name: str,
        purposes: list[Purpose],
        priority: Priority,
        now: float,
        *,
        until: float,
        hold_ms: float | None,
    ) -> None:
        """Hold the path for the holder found in the lease record until ``until`` (the end of
        the reclaim grace); ``hold_ms``: what is left of its max hold, once reclaimed."""
        assert self.holder is None and fence <= self.fence, "await before any grant"
        self.holder = Holder(
            lease=lease,
            fence=fence,
            lane=Awaited(lane_name),
            priority=priority,
            granted_at=now,
            hold_deadline=until,
            purposes=list(purposes),
            state="awaiting",
            reclaim_hold_ms=hold_ms,
        )

    def reclaim(
        self, req: ReqKey, lane: Lane, lease: str, fence: int, now: float, *, takeover: bool = False
    ) -> list[Effect]:
        """``lane`` takes back the awaited ``lease``: the same lease, fence and nesting.

        A second reclaim of a lease ``lane`` already took back is granted again (a client
        that lost the answer asks twice), with no nesting added. ``takeover`` (the caller
        showed the lease's secret under its lane name): a lease still held by another lane
        moves to ``lane``, whose old lane is told ``member_lost``; its holder's member died
        before this owner noticed. Anything else is refused.
        """
        holder = self.holder
        if holder is None or holder.lease != lease or holder.fence != fence:
            return [
                self.refuse_reclaim(
                    req,
                    lane,
                    f"lease {lease} fence {fence} is not awaited; "
                    + (
                        "the path is free" if holder is None else f"current fence is {holder.fence}"
                    ),
                )
            ]
        if holder.state == "held" and holder.lane != lane and takeover:
            old, holder.lane = holder.lane, lane
            self.counters["reclaims"] += 1
            return [
                Revoke(old, lease, "member_lost"),
                Grant(req, lane, lease, fence, holder.purpose),
                Diagnostic(f"reclaimed path={self.path} lane={lane} lease={lease} from={old}"),
            ]
        if holder.state == "held":
            if holder.lane != lane:
                return [
                    self.refuse_reclaim(req, lane, f"lease {lease} was reclaimed by another lane")
                ]
            return [Grant(req, lane, lease, fence, holder.purpose)]
        holder.state = "held"
        holder.lane = lane
        holder.granted_at = now
        left = holder.reclaim_hold_ms
        holder.hold_deadline = None if left is None else now + max(0.0, left)
        holder.reclaim_hold_ms = None
        self.counters["reclaims"] += 1
        return [
            Grant(req, lane, lease, fence, holder.purpose),
            Diagnostic(f"reclaimed path={self.path} lane={lane} lease={lease} fence={fence}"),
        ]

    def refuse_reclaim(self, req: ReqKey, lane: Lane, why: str) -> Reject:
        """A reclaim that cannot be honoured, counted."""
        self.counters["reclaims_refused"] += 1
        return Reject(req, lane, "reclaim_refused", why)

    def release(self, req: ReqKey, lane: Lane, lease: str, now: float) -> list[Effect]:
        """As ``LeaseTable.release``; an awaited lease is reclaimed first, by the lane that
        shows its secret."""
        holder = self.holder
        if (
            holder is not None
            and holder.state == "awaiting"
            and holder.lease == lease
            and acts_for(lane, holder.lane)
        ):
            return [Reject(req, lane, "not_holder", f"lease {lease} must be reclaimed first")]
        return LeaseTable.release(self, req, lane, lease, now)  # once a lease cycle

    def abandon(
        self,
        req: ReqKey,
        lane: Lane,
        now: float,
        *,
        reason: str,
        keep_as: Awaited | None = None,
        until: float = 0.0,
    ) -> list[Effect]:
        """As ``LeaseTable.abandon``. ``keep_as`` (for the lane of a lost convention member):
        the lease is not dropped but awaited as ``keep_as`` until ``until``, as a restart's
        holder is (``await_reclaim``); the lane's waiters are cancelled all the same."""
        holder = self.holder
        if holder is None or holder.lane != lane or keep_as is None:
            return super().abandon(req, lane, now, reason=reason)
        left = None if holder.hold_deadline is None else holder.hold_deadline - now
        holder.state, holder.lane, holder.reclaim_hold_ms = "awaiting", keep_as, left
        holder.hold_deadline = until
        kept = self._diagnostic("keep for reclaim", holder, now, reason)
        return [kept, *self._cancel_lane(req, lane, now, reason, ())]

    def came_back(self, lane: Lane, now: float) -> list[Effect]:
        """``lane`` speaks again, whose lease was kept when its member was lost: that member
        was only paused or cut off, and its lane is told the lease is gone (as it would
        have been at the loss without a grace; its client may have moved on meanwhile), so
        the lease is dropped now and the next waiter granted. Only another lane (its client,
        reconnected elsewhere) reclaims a kept lease."""
        holder = self.holder
        if holder is None or holder.state != "awaiting" or not isinstance(holder.lane, Awaited):
            return []
        if not lane or holder.lane.kept_for != lane:
            return []
        self.holder = None
        self.counters["abandons"] += 1
        return [self._diagnostic("abandon", holder, now, "its lane came back"), *self._promote(now)]

    def tick(self, now: float) -> list[Effect]:
        """As ``LeaseTable.tick``; an awaited holder whose grace ended (or whose recovery's
        abort deadline passed: a recovery does not wait for the grace) leaves the path free,
        the waiters due before that timed out first."""
        holder = self.holder
        if holder is None or holder.state != "awaiting":
            return super().tick(now)
        effects: list[Effect] = []
        due = holder.hold_deadline
        if holder.abort_deadline is not None and holder.abort_deadline <= now:
            due = holder.abort_deadline  # a recovery does not wait for the grace
        if due is not None and due <= now:
            effects += self._expire_waiters(due, now, strictly_before=True)
            effects += self._expire_awaited(holder, now)
        return effects + self._expire_waiters(now, now) + self._promote(now)

    def _expire_awaited(self, holder: Holder, now: float) -> list[Effect]:
        """The awaited holder did not come back in time: the path is free again."""
        self.holder = None
        self.counters["reclaims_expired"] += 1
        return [self._diagnostic("reclaim grace ended for", holder, now, "not reclaimed")]

    def shutdown(
        self,
        now: float,
        *,
        code: RejectCode = "shutting_down",
        detail: str = "the service is stopping",
        reason: RevokeReason = "shutdown",
    ) -> list[Effect]:
        """As ``LeaseTable.shutdown``; an awaited holder is dropped silently (nobody to tell:
        its lease record stays for the next grace)."""
        if self.holder is not None and self.holder.state == "awaiting":
            self.holder = None
        return super().shutdown(now, code=code, detail=detail, reason=reason)

    def check_write(
        self, lane: Lane, lease: str, fence: int, *, purpose: Purpose | None = None
    ) -> tuple[RejectCode, str] | None:
        """As ``LeaseTable.check_write``; nobody writes under an awaited lease before its
        reclaim."""
        holder = self.holder
        if (
            holder is not None
            and holder.state == "awaiting"
            and holder.lease == lease
            and holder.fence == fence
        ):
            return ("stale_fence", f"lease {lease} must be reclaimed first (the service restarted)")
        return LeaseTable.check_write(self, lane, lease, fence, purpose=purpose)  # twice a write


# The core's restart deciding: over the table and the lease record's book it owns -----------


def await_recorded(
    table: AwaitingTable,
    book: ReclaimBook,
    record: LeaseRecord,
    now: float,
    until: float,
    wall_ms: float,
) -> tuple[HeldRecord | None, bool]:
    """The lease record found at activation: the holder it names, awaited in ``table`` until
    ``until`` (the end of the service's grace; None: nobody, or the grace is over), and
    whether a holder lost the file because the grace is over (counted ``reclaims_expired``;
    the book's record is then the one to write back)."""
    held, lost = book.activate(record, now, until)
    if held is not None:
        left = None if held.hold_until_ms is None else held.hold_until_ms - wall_ms
        table.await_reclaim(
            held.lease,
            held.fence,
            held.lane,
            list(held.purposes),
            held.priority,
            now,
            until=until,
            hold_ms=left,
        )
        log.info(
            "%s: awaiting the reclaim of lease %s (lane %s, fence %d) for %d ms",
            table.path,
            held.lease,
            held.lane,
            held.fence,
            max(0, int(until - now)),
        )
    if lost:
        table.counters["reclaims_expired"] += 1
        log.warning("%s: the lease of the last holder was not reclaimed in time", table.path)
    return held, lost


def reclaim(
    table: AwaitingTable,
    book: ReclaimBook,
    req: ReqKey,
    lane: Lane,
    lane_name: str,
    ticket: ReclaimTicket,
    ino: int,
    size: int,
    now: float,
) -> list[Effect]:
    """A lease held before a restart, asked back by ``lane`` (named ``lane_name``) with
    ``ticket``: the same lease, or ``reclaim_refused`` (the record refuses it: ``ino`` and
    ``size`` are the transcript's now).

    Shown with its secret under the lane name the record names, a lease still held by
    another lane moves (its holder's member died before this owner noticed it)."""
    why = book.refusal(ticket, ino, size)
    if why is not None:
        return [table.refuse_reclaim(req, lane, why)]
    book.issue(ticket.lease, ticket.secret)
    held = book.record.held
    takeover = held is not None and held.lane == lane_name
    return table.reclaim(req, lane, ticket.lease, ticket.fence, now, takeover=takeover)


def resent(table: AwaitingTable, book: ReclaimBook, lane: Lane, req: Append) -> DoneAppend | None:
    """An append resent after a restart (same ``aid``) that was written under its lease, still
    current: its first answer, from the record (None: not written, or not under the lease)."""
    if req.fence is None or req.aid is None or req.lease is None:
        return None
    done = book.answered(req.lease, req.aid)
    if done is None or table.check_write(lane, req.lease, req.fence) is not None:
        return None
    return done


def keep_for_reclaim(
    table: AwaitingTable,
    book: ReclaimBook,
    req: ReqKey,
    lane: str,
    lane_name: str,
    now: float,
    reason: str,
    keep_ms: int,
) -> list[Effect] | None:
    """The lane ``lane`` of a lost convention member is abandoned: a lease it holds that the
    lease record names (its holder can show the secret) is kept ``keep_ms`` for a reclaim
    through another lane, as a restart's holder is awaited (its requests dropped all the
    same): the abandon's effects; None when nothing is kept (the caller abandons)."""
    holder, recorded = table.holder, book.record.held
    if keep_ms <= 0 or holder is None or recorded is None or recorded.lease != holder.lease:
        return None
    if holder.lane != lane:
        return None
    kept = Awaited(lane_name, kept_for=lane)
    return table.abandon(req, lane, now, reason=reason, keep_as=kept, until=now + keep_ms)
