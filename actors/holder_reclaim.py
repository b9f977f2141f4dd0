"""A lane's leases on another member's files, kept across that member's restart. Pure: no I/O.

In a convention a lease on a file of another member is held through this lane's member. When
that owner member is lost (killed, restarted, cut off), the file's actor with it, the lane
does not give the lease up at once: it keeps the reclaim secret the grant carried and, as a
client riding out a restart of its own service does (``docs/restarts.md``), asks the owner for
the lease back (``Acquire.reclaim``) on its holder's behalf. The Registry's federation holds
that acquire until the owner answers again (``Federation.route``), for at most the reclaim
grace plus ``member_timeout_ms``. Granted: the same lease and fence, the appends that were in
flight at the loss are sent again with their ``aid`` (the owner answers one it already wrote
from its lease record), then the requests the agent made meanwhile. Refused, or too late: the
holder is told ``revoked`` (``actor_restart``), as it was before this existed.

:class:`HolderReclaims` keeps the tickets (one per lease granted to the lane with a secret)
and the reclaims in progress; :class:`sessionlane.actors.lane_state.LaneState` drives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sessionlane.messages.internal import LaneCall, LaneRequest
from sessionlane.messages.wire import (
    Abandon,
    Acquire,
    Error,
    Granted,
    Priority,
    Purpose,
    ReclaimTicket,
)

__all__ = ["RECLAIM_ID", "HeldReclaims", "HolderReclaims", "Reclaiming"]

RECLAIM_ID = "_reclaim"
"""The prefix of the ids of the lane's own reclaim acquires (never shown to its agent)."""


@dataclass
class _Ticket:
    path: str
    purpose: Purpose
    priority: Priority | None
    fence: int
    secret: str
    depth: int = 1


@dataclass
class Reclaiming:
    """A lease of the lane whose owner was lost, being asked back."""

    lease: str
    path: str
    rid: str
    """The id of the reclaim acquire in flight."""
    resend: list[Any] = field(default_factory=list)
    """Ids of the lane's appends (with an ``aid``) in flight at the loss: sent again once the
    lease is back, answered ``unknown_outcome`` if it is not."""
    held: list[LaneRequest] = field(default_factory=list)
    """The agent's requests for the lease made meanwhile, in order: sent once it is decided."""


class HolderReclaims:
    """The reclaim tickets of one lane's leases, and its reclaims in progress."""

    def __init__(self) -> None:
        self.tickets: dict[str, _Ticket] = {}
        self.reclaiming: dict[str, Reclaiming] = {}
        self.by_rid: dict[str, Reclaiming] = {}
        self.ids = 0

    def granted(self, path: str, reply: Granted, request: Any) -> None:
        """``reply`` answered the lane's ``request``: keep what a reclaim would show."""
        known = self.tickets.get(reply.lease)
        if known is not None:
            known.depth += 1
            return
        if reply.secret is None:
            return  # a service that issues no secrets: nothing to reclaim with
        priority = getattr(request, "priority", None)
        self.tickets[reply.lease] = _Ticket(
            path, reply.purpose, priority, reply.fence, reply.secret
        )

    def released(self, lease: str) -> None:
        ticket = self.tickets.get(lease)
        if ticket is not None:
            ticket.depth -= 1
            if ticket.depth <= 0:
                del self.tickets[lease]

    def gone(self, lease: str) -> Reclaiming | None:
        """``lease`` ended (revoked, abandoned): forget it; its reclaim, if one was under way."""
        self.tickets.pop(lease, None)
        return self.stop(lease)

    def stop(self, lease: str) -> Reclaiming | None:
        found = self.reclaiming.pop(lease, None)
        if found is not None:
            self.by_rid.pop(found.rid, None)
        return found

    def start(self, lease: str, lane: str) -> tuple[Reclaiming, Acquire] | None:
        """Begin taking ``lease`` back (None: no secret known, it cannot be)."""
        ticket = self.tickets.get(lease)
        if ticket is None:
            return None
        self.ids += 1
        rid = f"{RECLAIM_ID}{self.ids}"
        found = self.reclaiming.get(lease)
        if found is None:
            found = self.reclaiming[lease] = Reclaiming(lease, ticket.path, rid)
        else:
            self.by_rid.pop(found.rid, None)
            found.rid = rid
        self.by_rid[rid] = found
        acquire = Acquire(
            id=rid,
            lane=lane,
            path=ticket.path,
            purpose=ticket.purpose,
            priority=ticket.priority,
            reclaim=ReclaimTicket(lease=lease, fence=ticket.fence, secret=ticket.secret),
        )
        return found, acquire

    def answered(self, rid: Any) -> Reclaiming | None:
        """The reclaim ``rid`` answers, taken out of the ones in progress (None: an answer to
        a reclaim already decided or given up)."""
        found = self.by_rid.pop(rid, None) if isinstance(rid, str) else None
        if found is not None:
            self.reclaiming.pop(found.lease, None)
        return found

    @staticmethod
    def is_reclaim_id(rid: Any) -> bool:
        return isinstance(rid, str) and rid.startswith(RECLAIM_ID)

    def holding_back(self, lease: str | None) -> Reclaiming | None:
        return self.reclaiming.get(lease) if lease is not None else None


class HeldReclaims:
    """The Registry's side (``Federation``): lanes' reclaims held until their lost member
    answers again, or until they give up (in arrival order)."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, LaneCall]] = []

    def __bool__(self) -> bool:
        return bool(self.calls)

    def hold(self, call: LaneCall, until: float) -> None:
        self.calls.append((until, call))

    def take(self) -> list[tuple[float, LaneCall]]:
        """All of them, to be sent, held again or refused."""
        calls, self.calls = self.calls, []
        return calls

    def cancel(self, abandon: LaneCall) -> list[LaneCall]:
        """The lane of ``abandon`` lets the path go (its agent went): its reclaims there, taken
        out, to be refused."""
        assert isinstance(abandon.request, Abandon)
        path, lane = abandon.request.path, abandon.lane
        gone: list[LaneCall] = []
        keep: list[tuple[float, LaneCall]] = []
        for until, call in self.calls:
            mine = call.lane.uid == lane.uid and call.lane.address == lane.address
            if mine and (path is None or call.path == path):
                gone.append(call)
            else:
                keep.append((until, call))
        self.calls = keep
        return gone

    @staticmethod
    def refusal(call: LaneCall, why: str) -> Error:
        return Error(id=call.request.id, code="unavailable", detail=why, path=call.path)
