"""The owner side of a convention: other members' lanes that use this member's paths.

:class:`Serving` is part of :class:`sessionlane.actors.federation.Federation` (the Registry's side
of a convention). It has the files other members' lanes first contact offer them a carried
channel (``Forwarded``: the Registry activates the file, which answers the lane's actor with a
``ChannelOffer``; the lane's calls then go to the file directly, as channel frames carried by
thespian's authenticated transport), acknowledges their beats, and when an origin is lost
(``OriginLost``) has each file close the channels of that origin's lanes, which abandons what
they waited for there, and what they held too unless ``reclaim_grace_ms`` > 0: then each lease
stays held for its holder's reclaim through another lane (the client reconnected to the
restarted member, or to any other) until the grace ends, or until its own lane speaks again
(the member was only paused or cut off), when the file drops it as before. A dead member's
lanes never keep a path past that. It owns the table of origins (which link actors each
origin's channels serve, on which paths); nothing else reads it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from sessionlane.actors._shell import addr_key
from sessionlane.messages.convention import (
    Beat,
    BeatAck,
    Forwarded,
    ForwardedClose,
    ForwardedStatus,
    Hop,
    Member,
    OriginLost,
    Resolved,
)
from sessionlane.messages.internal import OpenChannel
from sessionlane.messages.wire import Status

__all__ = ["Serving", "ServingHost"]

log = logging.getLogger(__name__)


class ServingHost(Protocol):
    """What :class:`Serving` needs from the Registry it is part of."""

    def send(self, target: Any, message: Any) -> None: ...

    def open_here(self, msg: OpenChannel) -> str | None:
        """Have the file offer ``msg.reply_to`` a channel here (never forward it); the
        canonical path, or None if refused (and answered)."""

    def drop_peers(self, path: str, peers: list[Any], reason: str, keep_ms: int = 0) -> None:
        """Have the file of ``path`` close the channels of ``peers`` (link actors), keeping
        their lanes' leases ``keep_ms`` for their holders' reclaim."""

    def status_to(self, request: Status, reply_to: Any) -> None: ...

    def lane_closed(self, address: Any) -> None: ...

    def is_active(self, path: str) -> bool: ...


@dataclass
class _Origin:
    """Another member's Registry whose lanes use our paths."""

    address: Any
    peers: dict[str, tuple[Any, set[str]]] = field(default_factory=dict)
    """addr_key(link actor) -> (its address, the canonical paths it was offered)."""


class Serving:
    """The origins whose lanes use our paths, and the handlers of their messages."""

    def __init__(self, host: ServingHost, me: Member, *, reclaim_grace_ms: int = 0) -> None:
        self.host = host
        self.me = me
        self.reclaim_ms = reclaim_grace_ms
        """How long a lost origin's leases stay held for their holders' reclaim (0: none)."""
        self._origins: dict[str, _Origin] = {}  # addr_key(origin registry) -> state

    def _origin(self, msg: Hop) -> _Origin:
        key = addr_key(msg.origin)
        found = self._origins.get(key)
        if found is None:
            found = self._origins[key] = _Origin(msg.origin)
        return found

    def on_forwarded(self, msg: Forwarded, sender: Any) -> None:
        asker = msg.open.reply_to
        canonical = self.host.open_here(msg.open)
        if canonical is None:
            return
        # Keyed by the link's actor: a gateway's lanes share one channel per file.
        _, paths = self._origin(msg).peers.setdefault(addr_key(asker), (asker, set()))
        paths.add(canonical)
        if canonical != msg.open.path:
            resolved = Resolved(incarnation=self.me.incarnation, lane=asker, path=canonical)
            self.host.send(msg.origin, resolved)

    def on_forwarded_close(self, msg: ForwardedClose, sender: Any) -> None:
        self._origin(msg).peers.pop(addr_key(msg.lane), None)
        self.host.lane_closed(msg.lane)

    def on_forwarded_status(self, msg: ForwardedStatus, sender: Any) -> None:
        self.host.status_to(msg.request, msg.reply_to)

    def on_beat(self, msg: Beat, sender: Any) -> None:
        self._origin(msg)
        ack = BeatAck(link=msg.link, seq=msg.seq, incarnation=self.me.incarnation)
        self.host.send(msg.origin, ack)

    def on_origin_lost(self, msg: OriginLost, sender: Any) -> None:
        origin = self._origins.pop(addr_key(msg.origin), None)
        if origin is None or not origin.peers:
            return
        kept = f"; their leases kept {self.reclaim_ms} ms for reclaim" if self.reclaim_ms else ""
        log.warning(
            "origin %s lost (%s): closing the channels of its %d lane actors%s",
            msg.origin,
            msg.reason,
            len(origin.peers),
            kept,
        )
        by_path: dict[str, list[Any]] = {}
        for address, paths in origin.peers.values():
            for path in paths:
                by_path.setdefault(path, []).append(address)
        for path in sorted(by_path):
            if self.host.is_active(path):  # a passivated file held nothing
                reason = f"member lost: {msg.reason}"
                self.host.drop_peers(path, by_path[path], reason, keep_ms=self.reclaim_ms)
