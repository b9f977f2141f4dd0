"""The vocabulary of a path's lease table: its policy, its effects, its state records. Pure.

``sessionlane.actors.lease_table.LeaseTable`` is the state machine; this module holds what it
speaks and keeps: the ``LeasePolicy`` it enforces, the effects its transitions return (``Grant``,
``Queue``, ``Skip``, ``Reject``, ``Released``, ``Abandoned``, ``Revoke``, ``AbortRequest``,
``Diagnostic``, ``ReserveFences``), and its ``Holder`` and ``Waiter`` records (a holder awaited
after a restart, ``sessionlane.actors.awaited``, has an ``Awaited`` lane). ``lease_table``
re-exports all of it.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Literal

from sessionlane.messages.errors import ErrorCode
from sessionlane.messages.lean_records import lean_record
from sessionlane.messages.wire import Priority, Purpose, RevokeReason

__all__ = [
    "Abandoned",
    "AbortRequest",
    "Awaited",
    "Diagnostic",
    "Effect",
    "Grant",
    "Holder",
    "Lane",
    "LeasePolicy",
    "Queue",
    "Reject",
    "RejectCode",
    "Released",
    "ReqKey",
    "ReserveFences",
    "Revoke",
    "Skip",
    "Waiter",
    "acts_for",
]

Lane = Hashable
"""A lane's identity: unique per lane instance (never just its name)."""
ReqKey = Hashable
"""An opaque request key chosen by the caller; effects echo it."""


def acts_for(lane: Lane, holder: Lane) -> bool:
    """Whether ``lane`` may release or write under ``holder``'s lease: it is that lane, or the
    connection lane (an id ending in ``/``) of the connection ``holder`` belongs to."""
    if lane == holder:
        return True
    return isinstance(lane, str) and lane.endswith("/") and str(holder).startswith(lane)


RejectCode = Literal[
    "lease_timeout",
    "contended",
    "stale_fence",
    "not_holder",
    "queue_full",
    "unavailable",
    "shutting_down",
    "abandoned",
    "reclaim_refused",
]

_RANK: dict[Priority, int] = {"background": 0, "interactive": 1, "recovery": 2}
_RECOVERY_RANK = 3  # recovery requests go before every waiter, aged or not
_MAX_AGED_RANK = _RANK["recovery"]


@dataclass(frozen=True)
class LeasePolicy:
    """The limits a table enforces; ``None`` disables a limit."""

    max_hold_ms: int | None = 300_000
    wait_timeout_ms: int | None = 600_000
    aging_ms: int = 10_000
    max_queue: int = 256
    fence_block: int = 1024
    """How many fences one durable reservation covers."""
    recovery_grace_ms: int = 5_000
    """The grace of a recovery asked for through ``acquire(purpose="recovery")``."""

    def __post_init__(self) -> None:
        if self.fence_block < 1:
            raise ValueError("fence_block must be >= 1")


# Effects -----------------------------------------------------------------------------------


@lean_record
class Grant:
    """Answer ``req``: ``lane`` holds ``lease`` with ``fence`` (``reentrant``: nesting +1)."""

    req: ReqKey
    lane: Lane
    lease: str
    fence: int
    purpose: Purpose
    reentrant: bool = False
    waited_ms: float | None = field(default=None, compare=False)
    """How long the request queued before this grant; ``None``: granted at once."""


@lean_record
class Queue:
    """Tell ``req`` it waits at ``position`` (1-based); its final answer comes later."""

    req: ReqKey
    lane: Lane
    position: int


@lean_record
class Skip:
    """Answer ``req``: contended with ``on_contention="skip"``; no lease, no error."""

    req: ReqKey
    lane: Lane


@lean_record
class Reject:
    """Answer ``req`` with an error code."""

    req: ReqKey
    lane: Lane
    code: RejectCode | ErrorCode
    """The table's own codes, or a disk error's (a fence reservation that failed)."""
    detail: str


@lean_record
class Released:
    """Answer a release: one nesting level of ``lease`` dropped (``freed``: the last one)."""

    req: ReqKey
    lane: Lane
    lease: str
    freed: bool


@lean_record
class Abandoned:
    """Answer an abandon: the leases dropped (at most one per path) and waiters cancelled."""

    req: ReqKey
    lane: Lane
    leases: tuple[str, ...]


@lean_record
class Revoke:
    """Event for ``lane``: ``lease`` is no longer held, for ``reason``."""

    lane: Lane
    lease: str
    reason: RevokeReason


@lean_record
class AbortRequest:
    """Event for ``lane``: a recovery wants the path; release within ``grace_ms``."""

    lane: Lane
    lease: str
    grace_ms: int


@lean_record
class Diagnostic:
    """One line for the log (abandons and revocations, with held time and reason)."""

    message: str


@lean_record
class ReserveFences:
    """Persist ``ceiling`` durably BEFORE performing any effect that follows it."""

    ceiling: int


Effect = (
    Grant | Queue | Skip | Reject | Released | Abandoned | Revoke | AbortRequest | Diagnostic
) | ReserveFences


# State -------------------------------------------------------------------------------------


HolderState = Literal["held", "awaiting"]
"""``awaiting``: found in the lease record after a restart, not reclaimed yet."""


@dataclass(frozen=True)
class Awaited:
    """The lane of an awaited holder: nobody yet (``name`` is the lane name it had)."""

    name: str
    kept_for: str = ""
    """``AwaitingTable.abandon(keep_as=...)``: the lane of the lost member it was kept from."""

    def __str__(self) -> str:
        return f"{self.name} (awaiting reclaim)"


@dataclass
class Holder:
    lease: str
    fence: int
    lane: Lane
    priority: Priority
    granted_at: float
    hold_deadline: float | None
    """When the max hold ends (``awaiting``: when the reclaim grace ends)."""
    purposes: list[Purpose] = field(default_factory=list)
    """One entry per nesting level; the lease is freed when the last is released."""
    abort_deadline: float | None = None
    """Set while a recovery waits for this holder to release."""
    state: HolderState = "held"
    reclaim_hold_ms: float | None = None
    """``awaiting``: what was left of its max hold when the service stopped."""

    @property
    def purpose(self) -> Purpose:
        return self.purposes[0]


@dataclass
class Waiter:
    req: ReqKey
    lane: Lane
    purpose: Purpose
    priority: Priority
    seq: int
    enqueued_at: float
    deadline: float | None
    max_hold_ms: int | None

    def rank(self, now: float, aging_ms: int) -> int:
        if self.purpose == "recovery":
            return _RECOVERY_RANK
        base = _RANK[self.priority]
        if base >= _MAX_AGED_RANK or aging_ms <= 0:
            return base
        return min(_MAX_AGED_RANK, base + int((now - self.enqueued_at) // aging_ms))
