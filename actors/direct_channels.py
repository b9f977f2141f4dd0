"""A local client's direct channel to a SessionFile: tickets, bindings, and what it may send.

See ``docs/direct-channel.md``. The gateway stays the only admission point: a client it
admitted asks it for a direct channel to a path for one of its lanes (``direct``); the gateway
forwards that, through the client's lane, to the file, with the uid it admitted and its frame
limit. The file mints a **ticket** (random, single use, valid :data:`TICKET_TTL_MS`) bound to
that lane and uid, and the gateway hands it back (``direct_offer``). The client connects to the
file's channel listener (``sessionlane.actors.file_channels``) and says the ticket; the listener
redeems it only if the connecting process runs as the admitted uid (``SO_PEERCRED``: any local
user can reach an abstract socket). The connection is then **bound**: every request on it acts
as one lane of the file's own (``DirectBinding.uid``: the gateway lane's uid plus ``#d`` and a
serial), which ``lease_types.acts_for`` treats as a lane of the same client connection.

What a bound connection may send (:func:`direct_request`): ``acquire`` of this path on the bound
lane, ``append`` and ``rewrite`` by lease (pipelined ``after`` included), a lane-less ``append``
of this path by the bound lane (queued, as through the gateway, with the gateway lane's
priority, which the ticket carries), ``release``, ``keepalive``. Everything else is refused
with an error frame, changing nothing. Pure: no I/O, no clock of its own.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from sessionlane.messages.channel import ChannelCall
from sessionlane.messages.client_frames import record_refusal
from sessionlane.messages.wire import (
    Acquire,
    Append,
    Direct,
    Error,
    Priority,
    Release,
    Request,
    Rewrite,
)

__all__ = [
    "MAX_TICKETS",
    "TICKET_TTL_MS",
    "DirectBinding",
    "DirectTickets",
    "direct_request",
    "mint_ticket",
]

TICKET_TTL_MS = 10_000.0
"""How long a minted ticket may be redeemed."""
MAX_TICKETS = 64
"""Unredeemed tickets kept per file; minting one more drops the oldest."""


@dataclass(frozen=True, slots=True)
class DirectBinding:
    """What a redeemed ticket binds its connection to."""

    gateway_lane: str
    """The uid of the gateway lane that asked (its abandon closes the channel)."""
    uid: str
    """The file-side lane uid of the channel's requests."""
    lane: str
    """The lane's name (acquires must name it)."""
    paths: frozenset[str]
    """The spellings of the path an acquire may name: the asked one and the canonical one."""
    peer_uid: int
    max_frame_bytes: int
    priority: Priority = "interactive"
    """The gateway lane's priority: what a lane-less append (a short write lease) queues with,
    as it would through the gateway."""


@dataclass(frozen=True, slots=True)
class _Ticket:
    binding: DirectBinding
    expires: float


def mint_ticket() -> str:
    """A new ticket: 24 random bytes, URL-safe."""
    return secrets.token_urlsafe(24)


class DirectTickets:
    """The tickets a file minted and not yet redeemed. Not thread-safe."""

    def __init__(self) -> None:
        self._tickets: dict[str, _Ticket] = {}
        self._serial = 0

    def mint(
        self,
        gateway_lane: str,
        request: Direct,
        canonical: str,
        now: float,
        priority: Priority = "interactive",
        ticket: str = "",
    ) -> str:
        """A fresh ticket for ``request`` (forwarded by the gateway: ``peer_uid`` and
        ``max_frame_bytes`` are set), valid until ``now`` + :data:`TICKET_TTL_MS`;
        ``priority``: the gateway lane's. ``ticket``: one the Registry minted ahead for a new
        file (``FileInit.tickets``), taken as this file's own; else a new one."""
        assert request.peer_uid is not None and request.max_frame_bytes is not None
        for key in [k for k, t in self._tickets.items() if t.expires <= now]:
            del self._tickets[key]
        while len(self._tickets) >= MAX_TICKETS:
            del self._tickets[next(iter(self._tickets))]
        self._serial += 1
        binding = DirectBinding(
            gateway_lane=gateway_lane,
            uid=f"{gateway_lane}#d{self._serial}",
            lane=request.lane,
            paths=frozenset({request.path, canonical}),
            peer_uid=request.peer_uid,
            max_frame_bytes=request.max_frame_bytes,
            priority=priority,
        )
        ticket = ticket or mint_ticket()
        self._tickets[ticket] = _Ticket(binding, now + TICKET_TTL_MS)
        return ticket

    def redeem(self, ticket: str, peer_uid: int | None, now: float) -> DirectBinding | str:
        """The binding of ``ticket`` shown by a process of ``peer_uid`` (None: unknown), or
        why it is refused. A ticket is gone after its first use, right or wrong uid."""
        found = None
        for key in self._tickets:  # compare_digest over every key: no timing on a prefix
            if hmac.compare_digest(key.encode(), ticket.encode()):
                found = key
        if found is None:
            return "unknown, used or expired ticket"
        held = self._tickets.pop(found)
        if held.expires <= now:
            return "expired ticket"
        if peer_uid is None or peer_uid != held.binding.peer_uid:
            return f"ticket of uid {held.binding.peer_uid} shown by uid {peer_uid}"
        return held.binding

    def drop_for(self, gateway_lane: str) -> None:
        """Forget the unredeemed tickets of ``gateway_lane`` (it was abandoned)."""
        for key in [k for k, t in self._tickets.items() if t.binding.gateway_lane == gateway_lane]:
            del self._tickets[key]

    def __len__(self) -> int:
        return len(self._tickets)


def direct_request(binding: DirectBinding, request: Request) -> ChannelCall | Error:
    """What a request on a channel bound by ``binding`` becomes: the call the file serves,
    or the error that answers it (nothing else happens)."""
    refusal = record_refusal(request)
    if refusal is not None:
        return refusal
    match request:
        case Acquire() if request.lane != binding.lane:
            detail = f"this direct channel is bound to lane {binding.lane!r}, not {request.lane!r}"
            return Error(id=request.id, code="bad_frame", detail=detail)
        case Acquire() if request.path not in binding.paths:
            detail = f"this direct channel serves {sorted(binding.paths)[0]}, not {request.path}"
            return Error(id=request.id, code="bad_frame", detail=detail)
        case Acquire() if request.reclaim is not None:
            detail = "a reclaim goes through the gateway, not a direct channel"
            return Error(id=request.id, code="bad_frame", detail=detail)
        case Acquire():
            priority: Priority = request.priority or (
                "recovery" if request.purpose == "recovery" else "interactive"
            )
            return ChannelCall(binding.uid, binding.lane, priority, request)
        case Append() if request.lease is None and request.lane != binding.lane:
            detail = f"this direct channel is bound to lane {binding.lane!r}, not {request.lane!r}"
            return Error(id=request.id, code="bad_frame", detail=detail)
        case Append() if request.lease is None and request.path not in binding.paths:
            detail = f"this direct channel serves {sorted(binding.paths)[0]}, not {request.path}"
            return Error(id=request.id, code="bad_frame", detail=detail)
        case Append() if request.lease is None:  # a short write lease, queued with the lane's
            return ChannelCall(binding.uid, binding.lane, binding.priority, request)
        case Append() | Rewrite() | Release():
            return ChannelCall(binding.uid, binding.lane, "interactive", request)
    detail = f"{request.type} is not taken on a direct channel (send it to the gateway)"
    return Error(id=request.id, code="bad_frame", detail=detail)
