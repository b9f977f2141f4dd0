"""The lease state machine of one path: holder, queue, fences, timers. Pure: no I/O, no clock.

Every input is a method call that takes ``now`` (milliseconds on a monotonic clock the caller
owns) and returns a list of effects for the caller (the SessionFile actor) to perform in order:
replies to send, events to deliver, fences to reserve durably before a grant goes out. The
table never sleeps and never reads a clock; ``next_deadline()`` says when the caller should
call ``tick`` again.

Its vocabulary (the policy, the effect records, the ``Holder`` and ``Waiter`` records) lives in
``sessionlane.actors.lease_types`` and is re-exported here; this module is the transitions of
the queue and the holder. It knows nothing of restarts: a holder awaited after one (or kept
for a lost member's lane) is ``sessionlane.actors.awaited.AwaitingTable``'s, which extends
this table with those transitions (a SessionFile's table is one).

Invariants (checked by the Hypothesis model in ``tests/test_lease_table_model.py``):

- at most one holder; when there is no holder the queue is empty (a free path is granted at
  once);
- fences strictly increase with every fresh grant, and a write is accepted only with the
  current holder's lease and fence;
- every request is answered exactly once: granted, skipped, or rejected with a code;
- FIFO within a priority class; a waiter is promoted one class per ``aging_ms`` waited, so a
  later arrival of the same or a lower class is never served first, and after
  ``2 * aging_ms`` no later arrival is;
- a recovery request is served before any other waiter, never beside a holder: the holder is
  asked to abort and is revoked after the grace;
- only the holder releases or writes under its lease, or the *connection lane* of the
  holder's connection: a lane id ending in ``/`` acts for every lane whose id it prefixes (a
  gateway connection's lanes are ``<connection>/<name>``, and a client's ``release`` or
  ``append`` names only its lease, not its lane: see :func:`acts_for`);
- a grant whose fence reservation failed is undone (``reservation_failed``): no holder, the
  fence counter as before it, the request answered with the error.

Why the transitions stay in one module: it is one state machine. Each transition (a public
method) reads top to bottom with the private steps it shares (grant, enqueue, promote,
revoke) a few lines away; the invariants above span all of it and the model test drives it as
one unit.
"""

from __future__ import annotations

import itertools

from sessionlane.actors.lease_types import (
    Abandoned,
    AbortRequest,
    Diagnostic,
    Effect,
    Grant,
    Holder,
    Lane,
    LeasePolicy,
    Queue,
    Reject,
    RejectCode,
    Released,
    ReqKey,
    ReserveFences,
    Revoke,
    Skip,
    Waiter,
    acts_for,
)
from sessionlane.messages.errors import ErrorCode
from sessionlane.messages.wire import OnContention, Priority, Purpose, RevokeReason

__all__ = [
    "Abandoned",
    "AbortRequest",
    "Diagnostic",
    "Effect",
    "Grant",
    "Holder",
    "LeasePolicy",
    "LeaseTable",
    "Queue",
    "Reject",
    "RejectCode",
    "Released",
    "ReserveFences",
    "Revoke",
    "Skip",
    "Waiter",
    "acts_for",
]


class LeaseTable:
    """Holder, queue and fence counter of one path.

    ``fence_floor`` is the highest fence that may have been handed out before (the persisted
    reservation ceiling): every fence this table grants is above it. Lease ids are
    ``<lease_prefix><fence>``: unique per path because fences are, and across paths when the
    prefix names the path.
    """

    def __init__(
        self, path: str, policy: LeasePolicy, fence_floor: int = 0, *, lease_prefix: str = ""
    ):
        self.path = path
        self.lease_prefix = lease_prefix
        self.policy = policy
        self.fence = fence_floor
        self.fence_ceiling = fence_floor
        self.holder: Holder | None = None
        self.waiters: list[Waiter] = []
        self.closed = False
        self._seq = itertools.count()
        self.counters: dict[str, int] = {
            "grants": 0,
            "reentrant_grants": 0,
            "queued": 0,
            "releases": 0,
            "skips": 0,
            "timeouts": 0,
            "contended": 0,
            "queue_full": 0,
            "revocations": 0,
            "abandons": 0,
            "recoveries": 0,
            "recoveries_coalesced": 0,
            "stale_fence": 0,
            "revoked_max_hold": 0,
            "revoked_recovery": 0,
            "revoked_shutdown": 0,
        }

    # Inputs --------------------------------------------------------------------------------

    def acquire(
        self,
        req: ReqKey,
        lane: Lane,
        purpose: Purpose,
        now: float,
        *,
        priority: Priority = "interactive",
        on_contention: OnContention = "wait",
        wait_timeout_ms: int | None = None,
        max_hold_ms: int | None = None,
        waited_ms: float = 0.0,
    ) -> list[Effect]:
        """A lease request. Recovery goes through ``recover``, which adds the abort protocol.

        ``waited_ms``: how long the request already waited elsewhere (before a restart): it
        queues as if it had arrived that long ago."""
        if self.closed:
            return [Reject(req, lane, "shutting_down", "the service is stopping")]
        if purpose == "recovery":  # same rules whichever door it came through
            return self.recover(req, lane, self.policy.recovery_grace_ms, now, reason="acquire")
        holder = self.holder
        if holder is not None and holder.lane == lane:
            holder.purposes.append(purpose)
            self.counters["reentrant_grants"] += 1
            return [Grant(req, lane, holder.lease, holder.fence, purpose, reentrant=True)]
        if holder is None:
            return self._grant_new(req, lane, purpose, priority, now, max_hold_ms)
        if on_contention == "fail":
            self.counters["contended"] += 1
            return [Reject(req, lane, "contended", self._busy_detail(now))]
        if on_contention == "skip":
            self.counters["skips"] += 1
            return [Skip(req, lane)]
        return self._enqueue(
            req, lane, purpose, priority, now, wait_timeout_ms, max_hold_ms, waited_ms=waited_ms
        )

    def recover(
        self, req: ReqKey, lane: Lane, grace_ms: int, now: float, *, reason: str = ""
    ) -> list[Effect]:
        """A recovery lease: never beside a holder, coalesced with one already pending."""
        if self.closed:
            return [Reject(req, lane, "shutting_down", "the service is stopping")]
        pending = any(w.purpose == "recovery" for w in self.waiters)
        running = self.holder is not None and "recovery" in self.holder.purposes
        if pending or running:
            self.counters["recoveries_coalesced"] += 1
            what = "pending" if pending else "in progress"
            return [Reject(req, lane, "contended", f"a recovery is already {what}")]
        self.counters["recoveries"] += 1
        holder = self.holder
        if holder is None:
            return self._grant_new(req, lane, "recovery", "recovery", now, None)
        effects = self._enqueue(req, lane, "recovery", "recovery", now, None, None, bound=False)
        holder.abort_deadline = now + grace_ms
        effects.append(AbortRequest(holder.lane, holder.lease, grace_ms))
        effects.append(
            Diagnostic(
                f"recovery requested path={self.path} holder_lane={holder.lane} "
                f"lease={holder.lease} held_ms={int(now - holder.granted_at)} "
                f"grace_ms={grace_ms} reason={reason or 'unspecified'}"
            )
        )
        if grace_ms == 0:
            effects += self.tick(now)
        return effects

    def release(self, req: ReqKey, lane: Lane, lease: str, now: float) -> list[Effect]:
        """Drop one nesting level of ``lease``; only its holder may."""
        holder = self.holder
        if holder is None or holder.lease != lease or not acts_for(lane, holder.lane):
            return [Reject(req, lane, "not_holder", f"lease {lease} is not held by this lane")]
        holder.purposes.pop()
        self.counters["releases"] += 1
        if holder.purposes:
            return [Released(req, lane, lease, freed=False)]
        self.holder = None
        return [Released(req, lane, lease, freed=True), *self._promote(now)]

    def abandon(self, req: ReqKey, lane: Lane, now: float, *, reason: str) -> list[Effect]:
        """Drop the lane's lease (all nesting) and cancel its waiters, at once."""
        effects: list[Effect] = []
        leases: tuple[str, ...] = ()
        holder = self.holder
        if holder is not None and holder.lane == lane:
            leases = (holder.lease,)
            self.holder = None
            self.counters["abandons"] += 1
            effects.append(self._diagnostic("abandon", holder, now, reason))
        return effects + self._cancel_lane(req, lane, now, reason, leases)

    def _cancel_lane(
        self, req: ReqKey, lane: Lane, now: float, reason: str, leases: tuple[str, ...]
    ) -> list[Effect]:
        """Cancel the lane's waiters and answer its abandon (``leases``: what it dropped)."""
        cancelled = [w for w in self.waiters if w.lane == lane]
        self.waiters = [w for w in self.waiters if w.lane != lane]
        effects: list[Effect] = [
            Reject(w.req, w.lane, "abandoned", f"lane abandoned its requests: {reason}")
            for w in cancelled
        ]
        effects.append(Abandoned(req, lane, leases))
        self._forget_orphaned_abort()
        return effects + self._promote(now)

    def tick(self, now: float) -> list[Effect]:
        """Apply every deadline that is due, in time order: wait timeouts, max hold, recovery
        grace.

        A late tick (a delayed wakeup) must not decide differently from punctual ones: a holder
        whose deadline passed before a waiter's is revoked first, so that waiter is granted, not
        timed out for a lease that was free before its deadline.
        """
        effects: list[Effect] = []
        holder = self.holder
        reason: RevokeReason | None = None
        revoke_at = now
        if holder is not None:
            if holder.abort_deadline is not None and holder.abort_deadline <= now:
                reason, revoke_at = "recovery", holder.abort_deadline
            hold_due = holder.hold_deadline
            earlier = reason is None or (hold_due is not None and hold_due < revoke_at)
            if hold_due is not None and hold_due <= now and earlier:
                reason, revoke_at = "max_hold", hold_due
        if holder is not None and reason is not None:
            effects += self._expire_waiters(revoke_at, now, strictly_before=True)
            effects += self._revoke(holder, reason, now)
            effects += self._promote(now)
        effects += self._expire_waiters(now, now)
        return effects + self._promote(now)

    def _expire_waiters(
        self, due: float, now: float, *, strictly_before: bool = False
    ) -> list[Effect]:
        """Time out the waiters whose deadline is ``due`` or earlier (before it, if strict)."""
        expired = [
            w
            for w in self.waiters
            if w.deadline is not None
            and (w.deadline < due if strictly_before else w.deadline <= due)
        ]
        effects: list[Effect] = []
        for w in expired:
            self.waiters.remove(w)
            self.counters["timeouts"] += 1
            effects.append(
                Reject(
                    w.req,
                    w.lane,
                    "lease_timeout",
                    f"not granted within {int(now - w.enqueued_at)} ms; {self._busy_detail(now)}",
                )
            )
        return effects

    def shutdown(
        self,
        now: float,
        *,
        code: RejectCode = "shutting_down",
        detail: str = "the service is stopping",
        reason: RevokeReason = "shutdown",
    ) -> list[Effect]:
        """Answer every waiter with ``code``, revoke the holder (``reason``), refuse what follows.
        Defaults: the service stops (a file lost to another owner: ``ownership_lost``)."""
        self.closed = True
        effects: list[Effect] = [Reject(w.req, w.lane, code, detail) for w in self.waiters]
        self.waiters = []
        if self.holder is not None:
            effects += self._revoke(self.holder, reason, now)
        return effects

    def reservation_failed(
        self, grant: Grant, code: ErrorCode, detail: str, now: float
    ) -> list[Effect]:
        """The fence reservation before ``grant`` failed (a full disk...): the grant is undone
        (no holder, the fence counter as before it) and its request answered with the error;
        the next waiter, if any, is granted in its place (which reserves again)."""
        holder = self.holder
        assert holder is not None and holder.lease == grant.lease, "only the grant just made"
        self.holder = None
        self.fence = self.fence_ceiling = grant.fence - 1
        self.counters["grants"] -= 1
        return [Reject(grant.req, grant.lane, code, detail), *self._promote(now)]

    def reserve_ahead(self) -> int | None:
        """The ceiling the next grant would reserve, to make durable before it is needed; None
        when fences above the counter are reserved already."""
        if self.fence < self.fence_ceiling:
            return None
        return self.fence + self.policy.fence_block

    def reserved(self, ceiling: int) -> None:
        """The fences up to ``ceiling`` were made durable ahead (``reserve_ahead``): grants up
        to it reserve none."""
        self.fence_ceiling = max(self.fence_ceiling, ceiling)

    def raise_floor(self, floor: int, now: float) -> list[Effect]:
        """Ownership moved to a sidecar whose fence store says ``floor``: grant above it; a
        holder not above it is revoked (``ownership_lost``: another service granted since)."""
        if floor <= self.fence:
            return []
        self.fence = floor
        self.fence_ceiling = max(self.fence_ceiling, floor)
        if self.holder is None:
            return []
        return self._revoke(self.holder, "ownership_lost", now) + self._promote(now)

    # Queries -------------------------------------------------------------------------------

    def check_write(
        self, lane: Lane, lease: str, fence: int, *, purpose: Purpose | None = None
    ) -> tuple[RejectCode, str] | None:
        """Why a write under (``lease``, ``fence``) must be refused, or None to accept it.

        ``purpose="compaction"`` additionally requires a compaction level in the lease.
        """
        holder = self.holder
        if holder is None or holder.lease != lease or holder.fence != fence:
            self.counters["stale_fence"] += 1
            current = f"current fence is {holder.fence}" if holder else "the path is free"
            return ("stale_fence", f"lease {lease} fence {fence} is not current; {current}")
        if not acts_for(lane, holder.lane):
            return ("not_holder", f"lease {lease} belongs to another lane")
        if purpose == "compaction" and "compaction" not in holder.purposes:
            return ("not_holder", "rewrite needs a compaction lease")
        return None

    def held_by(self, lane: Lane) -> Holder | None:
        holder = self.holder
        return holder if holder is not None and holder.lane == lane else None

    def next_deadline(self) -> float | None:
        """The earliest time at which ``tick`` has something to do."""
        times = [w.deadline for w in self.waiters if w.deadline is not None]
        holder = self.holder
        if holder is not None:
            times += [t for t in (holder.abort_deadline, holder.hold_deadline) if t is not None]
        return min(times, default=None)

    def order(self, now: float) -> list[Waiter]:
        """Waiters in the order they would be granted at ``now``."""
        aging = self.policy.aging_ms
        return sorted(self.waiters, key=lambda w: (-w.rank(now, aging), w.enqueued_at, w.seq))

    def idle(self) -> bool:
        return self.holder is None and not self.waiters

    # Internals -----------------------------------------------------------------------------

    def _grant_new(
        self,
        req: ReqKey,
        lane: Lane,
        purpose: Purpose,
        priority: Priority,
        now: float,
        max_hold_ms: int | None,
        waited_ms: float | None = None,
    ) -> list[Effect]:
        effects: list[Effect] = []
        self.fence += 1
        if self.fence > self.fence_ceiling:
            self.fence_ceiling = self.fence + self.policy.fence_block - 1
            effects.append(ReserveFences(self.fence_ceiling))
        limit = _min_limit(max_hold_ms, self.policy.max_hold_ms)
        lease = f"{self.lease_prefix}{self.fence}"
        self.holder = Holder(
            lease=lease,
            fence=self.fence,
            lane=lane,
            priority=priority,
            granted_at=now,
            hold_deadline=None if limit is None else now + limit,
            purposes=[purpose],
        )
        self.counters["grants"] += 1
        effects.append(Grant(req, lane, lease, self.fence, purpose, waited_ms=waited_ms))
        return effects

    def _enqueue(
        self,
        req: ReqKey,
        lane: Lane,
        purpose: Purpose,
        priority: Priority,
        now: float,
        wait_timeout_ms: int | None,
        max_hold_ms: int | None,
        *,
        bound: bool = True,
        waited_ms: float = 0.0,
    ) -> list[Effect]:
        if bound and len(self.waiters) >= self.policy.max_queue:
            self.counters["queue_full"] += 1
            return [Reject(req, lane, "queue_full", f"{len(self.waiters)} requests are queued")]
        timeout = wait_timeout_ms if wait_timeout_ms is not None else self.policy.wait_timeout_ms
        if purpose == "recovery":
            timeout = None  # the holder's grace bounds this wait
        waiter = Waiter(
            req=req,
            lane=lane,
            purpose=purpose,
            priority=priority,
            seq=next(self._seq),
            enqueued_at=now - max(0.0, waited_ms),
            deadline=None if timeout is None else now + timeout,
            max_hold_ms=max_hold_ms,
        )
        self.waiters.append(waiter)
        self.counters["queued"] += 1
        position = self.order(now).index(waiter) + 1
        return [Queue(req, lane, position)]

    def _forget_orphaned_abort(self) -> None:
        """No recovery waits any more: the holder's abort deadline no longer applies."""
        holder = self.holder
        if holder is not None and not any(w.purpose == "recovery" for w in self.waiters):
            holder.abort_deadline = None

    def _promote(self, now: float) -> list[Effect]:
        if self.holder is not None or not self.waiters:
            return []
        best = self.order(now)[0]
        self.waiters.remove(best)
        return self._grant_new(
            best.req,
            best.lane,
            best.purpose,
            best.priority,
            now,
            best.max_hold_ms,
            waited_ms=now - best.enqueued_at,
        )

    def _revoke(self, holder: Holder, reason: RevokeReason, now: float) -> list[Effect]:
        self.holder = None
        self.counters["revocations"] += 1
        self.counters[f"revoked_{reason}"] = self.counters.get(f"revoked_{reason}", 0) + 1
        return [
            Revoke(holder.lane, holder.lease, reason),
            self._diagnostic("revoke", holder, now, reason),
        ]

    def _diagnostic(self, what: str, holder: Holder, now: float, reason: str) -> Diagnostic:
        return Diagnostic(
            f"{what} path={self.path} lane={holder.lane} lease={holder.lease} "
            f"fence={holder.fence} purpose={holder.purpose} "
            f"held_ms={int(now - holder.granted_at)} reason={reason}"
        )

    def _busy_detail(self, now: float) -> str:
        holder = self.holder
        if holder is None:
            return f"{len(self.waiters)} waiting"
        return (
            f"held by lane {holder.lane} ({holder.purpose}) for "
            f"{int(now - holder.granted_at)} ms, {len(self.waiters)} waiting"
        )


def _min_limit(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
