"""A lane's leases on another member's files, kept across that member's restart. Pure: no I/O.

In a convention a lease on a file of another member is held through this lane's member. When
that owner member is lost (killed, restarted, cut off), the file's actor with it, the lane
does not give the lease up at once: it keeps the reclaim secret the grant carried and, as a
client riding out a restart of its own service does (``docs/restarts.md``), asks the owner for
the lease back (``Acquire.reclaim``) on its holder's behalf. Its link asks for a channel
again, saying its first call is a reclaim (``OpenChannel.reclaim``), and the Registry's
federation holds that first contact until the owner answers again
(``Federation.route_open``), for at most the reclaim grace plus ``member_timeout_ms``; the
reclaim then goes over the new channel. Granted: the same lease and fence, the appends that were in
flight at the loss are sent again with their ``aid`` (the owner answers one it already wrote
from its lease record), then the requests the agent made meanwhile. Refused, or too late: the
holder is told ``revoked`` (``actor_restart``), as it was before this existed.

The holder's agent is told nothing while it works; its requests on the lease wait in its
member meanwhile. If the owner tells the holder itself (``revoked`` ``member_lost``), the
reclaim ends there and that is the one event.

:class:`HolderReclaims` keeps the tickets (one per lease granted with a secret to a lane of
one client connection) and the reclaims in progress; the connection's lanes
(:class:`sessionlane.actors.lane_state.LaneState`) drive it. :class:`HeldReclaims` is the
Registry's part: the first contacts of those reclaims, waiting for their member.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from sessionlane.messages.internal import ChannelOffer, LaneRequest, OpenChannel
from sessionlane.messages.wire import (
    Acquire,
    Granted,
    Priority,
    Purpose,
    ReclaimTicket,
)

__all__ = ["RECLAIM_ID", "HeldReclaims", "HolderReclaims", "LaneLike", "Reclaiming"]

RECLAIM_ID = "_reclaim"
"""The prefix of the ids of the lane's own requests for a reclaim (the acquire, and the release
of a reclaim granted too late): their answers go to the lane, never to its agent."""


class LaneLike(Protocol):
    """What a reclaim needs of the lanes of one connection (``LaneState``)."""

    @property
    def uid(self) -> str: ...

    def request(self, req: LaneRequest) -> None: ...

    def resend(self, rid: Any, path: str) -> None:
        """Send the pending request ``rid`` again (its lease is back)."""

    def unknown(self, rid: Any, lease: str, path: str) -> None:
        """Answer the pending write ``rid``: its outcome is unknown (its lease is gone)."""


@dataclass
class _Ticket:
    path: str
    lane: str
    """The name of the lane that holds the lease; ``uid``, its uid."""
    uid: str
    purpose: Purpose
    priority: Priority | None
    fence: int
    secret: str
    depth: int = 1


@dataclass
class Reclaiming:
    """A lease whose owner was lost, being asked back by the lane that holds it."""

    lease: str
    path: str
    acquire: Acquire
    """The reclaim, sent by the holding lane (``holder``)."""
    holder: str
    sent: bool = False
    waiting: list[tuple[LaneLike, Any]] = field(default_factory=list)
    """The appends (with an ``aid``) of the connection's lanes in flight at the loss, by lane
    and request id: sent again once the lease is back, answered ``unknown_outcome`` if not."""
    held: list[tuple[LaneLike, LaneRequest]] = field(default_factory=list)
    """The agent's requests for the lease made meanwhile, in order: sent once it is decided."""

    def wait(self, lane: LaneLike, rid: Any) -> None:
        if not any(entry is lane and r == rid for entry, r in self.waiting):
            self.waiting.append((lane, rid))

    def back(self) -> None:
        """The lease is back: what waited goes on."""
        for lane, rid in self.waiting:
            lane.resend(rid, self.path)
        for lane, req in self.held:
            lane.request(req)

    def lost(self) -> None:
        """The lease is gone: writes in flight have an unknown outcome; the requests made
        meanwhile go on (the owner refuses them: nothing is written)."""
        for lane, rid in self.waiting:
            lane.unknown(rid, self.lease, self.path)
        for lane, req in self.held:
            lane.request(req)


class HolderReclaims:
    """The reclaim tickets of the leases of one client connection's lanes (shared by them: a
    request naming only a lease may come through another lane of the connection than the one
    holding it), and the reclaims in progress."""

    def __init__(self) -> None:
        self.tickets: dict[str, _Ticket] = {}
        self.reclaiming: dict[str, Reclaiming] = {}
        self.by_rid: dict[str, Reclaiming] = {}
        self.ids = 0

    def granted(self, lane: LaneLike, name: str, path: str, reply: Granted, request: Any) -> None:
        """``reply`` answered ``lane``'s ``request``: keep what a reclaim would show."""
        known = self.tickets.get(reply.lease)
        if known is not None:
            known.depth += 1
            return
        if reply.secret is None:
            return  # a service that issues no secrets: nothing to reclaim with
        priority = getattr(request, "priority", None)
        self.tickets[reply.lease] = _Ticket(
            path, name, lane.uid, reply.purpose, priority, reply.fence, reply.secret
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
        found = self.reclaiming.pop(lease, None)
        if found is not None:
            self.by_rid.pop(str(found.acquire.id), None)
        return found

    def start(self, lease: str) -> Reclaiming | None:
        """The reclaim of ``lease``, begun now if it is not under way (None: no secret is
        known, it cannot be taken back)."""
        found = self.reclaiming.get(lease)
        if found is not None:
            return found
        ticket = self.tickets.get(lease)
        if ticket is None:
            return None
        acquire = Acquire(
            id=self.next_id(),
            lane=ticket.lane,
            path=ticket.path,
            purpose=ticket.purpose,
            priority=ticket.priority,
            reclaim=ReclaimTicket(lease=lease, fence=ticket.fence, secret=ticket.secret),
        )
        found = self.reclaiming[lease] = Reclaiming(lease, ticket.path, acquire, ticket.uid)
        self.by_rid[str(acquire.id)] = found
        return found

    def answered(self, rid: Any) -> Reclaiming | None:
        """The reclaim ``rid`` answers, taken out of the ones in progress (None: an answer to
        a reclaim already decided or given up)."""
        found = self.by_rid.pop(rid, None) if isinstance(rid, str) else None
        if found is not None:
            self.reclaiming.pop(found.lease, None)
        return found

    def next_id(self) -> str:
        """An id for a request of the lane's own, answered to the lane, never to its agent."""
        self.ids += 1
        return f"{RECLAIM_ID}{self.ids}"

    @staticmethod
    def is_reclaim_id(rid: Any) -> bool:
        return isinstance(rid, str) and rid.startswith(RECLAIM_ID)

    def holding_back(self, lease: str | None) -> Reclaiming | None:
        return self.reclaiming.get(lease) if lease is not None else None


class HeldReclaims:
    """The Registry's side (``Federation``): first contacts (``OpenChannel``) of links whose
    first call is a reclaim, held until the lost member answers again, or until they give up.
    One per link actor and path: a link asking again (its open timed out) replaces its own."""

    def __init__(self) -> None:
        self.opens: dict[tuple[str, str], tuple[float, OpenChannel, Any]] = {}

    def __bool__(self) -> bool:
        return bool(self.opens)

    def hold(self, key: str, msg: OpenChannel, asker: Any, until: float) -> None:
        """Hold ``msg`` of ``asker`` (``key``: its ``addr_key``); a re-ask keeps the deadline."""
        held = self.opens.get((key, msg.path))
        self.opens[(key, msg.path)] = (held[0] if held else until, msg, asker)

    def cancel(self, key: str, path: str) -> bool:
        """The link asked again without a reclaim (its lane let the path go): drop its hold."""
        return self.opens.pop((key, path), None) is not None

    def take(self) -> list[tuple[float, OpenChannel, Any]]:
        """All of them, to be sent, held again or refused."""
        opens, self.opens = list(self.opens.values()), {}
        return opens

    @staticmethod
    def refusal(msg: OpenChannel, why: str) -> ChannelOffer:
        return ChannelOffer(path=msg.path, nonce=msg.nonce, reason=why, code="unavailable")
