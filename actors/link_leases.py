"""What the links keep of the leases granted through them: lease routes, and per file the one
lease still held. Pure: no I/O, no clock.

Routing is stateless. A request names its path, or a lease whose id names its file's route
(``sessionlane.actors.paths.lease_route``): ``route_of`` maps a route to the canonical path of
a file the links reach (learnt from the Registry's offers and from the grants that pass), and
the file itself checks that the lane holds the lease. A route two files collide on (64 bits:
practically never) routes nothing: their lease-only requests are refused as not held here,
never misrouted.

What the links do keep per file is the one lease granted over them that is still held
(``Grant``, followed by ``observe`` from the ``granted``, ``released``, ``revoked`` and
``abandoned`` replies that pass, and the ``appended`` of an append that released its lease,
matched by lane and request id to the append sent (``sent``: its lease, its ``aid``), each
append's release counted once however many answers it gets; one holder per path, so one
entry): what a lost channel or a
restarted file takes with it (``lost_holder``: the holder's lane reports it ``revoked``,
``actor_restart``), and why a channel whose lease is held is not closed as idle (``holds``).
Kept by ``sessionlane.actors.links.Links``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sessionlane.actors.paths import lease_route, route_of_lease
from sessionlane.messages.internal import FileReply
from sessionlane.messages.wire import Abandoned, Append, Appended, Granted, Released, Revoked

__all__ = ["Grant", "LinkLeases"]

log = logging.getLogger(__name__)


@dataclass
class Grant:
    """The lease held on a file, as the replies through the links said: who, which, how deep."""

    lane: str
    lease: str
    depth: int = 1
    releasing: dict[tuple[str, Any], str | None] = field(default_factory=dict)
    """(lane, request id) of the appends sent under this lease that release it: their ``aid``
    (forgotten at their answer)."""
    released: set[str] = field(default_factory=set)
    """The ``aid`` of each append whose release was counted: a resend of it counts nothing."""


_NOT_SENT = object()


class LinkLeases:
    """The lease routes the links know, and the lease held on each file they reach."""

    def __init__(self) -> None:
        self.grants: dict[str, Grant] = {}
        """Canonical path -> the lease held there, granted through these links."""
        self.routes: dict[str, str | None] = {}
        """Lease route -> the canonical path it names (None: two paths collide on it)."""

    def route_of(self, lease: str) -> str | None:
        """The canonical path of the file that granted ``lease``, if these links reach it."""
        route = route_of_lease(lease)
        return self.routes.get(route) if route is not None else None

    def learn_route(self, path: str) -> None:
        route = lease_route(path)
        known = self.routes.setdefault(route, path)
        if known is not None and known != path:
            log.error("lease routes of %s and %s collide: their leases are refused", known, path)
            self.routes[route] = None

    def forget_route(self, path: str) -> None:
        """The link to ``path`` is gone: its route names nothing any more."""
        if self.routes.get(lease_route(path)) == path:
            del self.routes[lease_route(path)]

    def sent(self, path: str, lane: str, request: Any) -> None:
        """``request`` of ``lane`` was sent to the file ``path``: an append that releases the
        lease held there is remembered until its answer (which names no lease)."""
        if type(request) is Append and request.release and request.lease is not None:
            grant = self.grants.get(path)
            if grant is not None and grant.lease == request.lease:
                grant.releasing[(lane, request.id)] = request.aid

    def observe(self, reply: FileReply) -> None:
        """Follow the lease held on ``reply.path`` through the replies that pass."""
        path, message = reply.path, reply.message
        grant = self.grants.get(path)
        sent: Any = _NOT_SENT
        if grant is not None and grant.releasing and message.id is not None:
            sent = grant.releasing.pop((reply.lane, message.id), _NOT_SENT)
        match message:
            case Granted(lease=lease):
                if grant is not None and grant.lease == lease:
                    grant.depth += 1
                else:  # one holder per path: any other lease there is gone
                    self.grants[path] = Grant(reply.lane, lease)
                    self.learn_route(path)
            case Released(lease=lease) if grant is not None and grant.lease == lease:
                grant.depth -= 1
                if grant.depth <= 0:
                    del self.grants[path]
            case Appended(released=True) if grant is not None and sent is not _NOT_SENT:
                # an append sent under the lease held here released one level of it (the
                # next holder's grant passed first: then ``sent`` is not this grant's); once
                # per append, however many answers its resends get
                if sent is not None:
                    if sent in grant.released:
                        return
                    grant.released.add(sent)
                grant.depth -= 1
                if grant.depth <= 0:
                    del self.grants[path]
            case Revoked(lease=lease) if grant is not None and grant.lease == lease:
                del self.grants[path]
            case Abandoned(leases=leases) if grant is not None and grant.lease in leases:
                del self.grants[path]

    def lost_holder(self, path: str) -> tuple[str, str] | None:
        """Forget the lease held on ``path`` (its file or channel is gone): (lane, lease)."""
        grant = self.grants.pop(path, None)
        return (grant.lane, grant.lease) if grant is not None else None

    def holds(self, path: str) -> bool:
        """Is a lease on ``path`` held through these links?"""
        return path in self.grants
