"""The owner side of a convention: other members' lanes that use this member's paths.

:class:`Serving` is part of :class:`sessionlane.actors.federation.Federation` (the Registry's side
of a convention). It serves the calls other members forward here, acknowledges their beats, and
when one of them is lost (``OriginLost``) abandons what its lanes waited for here, and what
they held too unless ``reclaim_grace_ms`` > 0: then each lease stays held for its holder's
reclaim (through the restarted member, or any other) until the grace ends, when the file
drops it as before. A dead member's lanes never keep a path past that. It owns the table of
origins; nothing else reads it.
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
from sessionlane.messages.internal import AbandonForReclaim, LaneCall, LaneRef
from sessionlane.messages.wire import Abandon, Status

__all__ = ["Serving", "ServingHost"]

log = logging.getLogger(__name__)


class ServingHost(Protocol):
    """What :class:`Serving` needs from the Registry it is part of."""

    def send(self, target: Any, message: Any) -> None: ...

    def serve(self, call: LaneCall) -> str | None:
        """Serve ``call`` here (never forward it); the canonical path, or None if refused."""

    def status_to(self, request: Status, reply_to: Any) -> None: ...

    def lane_closed(self, address: Any) -> None: ...

    def is_active(self, path: str) -> bool: ...


@dataclass
class _Origin:
    """Another member's Registry whose lanes use our paths."""

    address: Any
    lanes: dict[str, tuple[LaneRef, set[str]]] = field(default_factory=dict)


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
        call = msg.call
        canonical = self.host.serve(call)
        if canonical is None:
            return
        # Keyed by lane, not by address: the gateway hosts many lanes at one address.
        _, paths = self._origin(msg).lanes.setdefault(
            f"{addr_key(call.lane.address)}|{call.lane.uid}", (call.lane, set())
        )
        paths.add(canonical)
        if not call.canonical and canonical != call.path:
            resolved = Resolved(
                incarnation=self.me.incarnation, lane=call.lane.address, path=canonical
            )
            self.host.send(msg.origin, resolved)

    def on_forwarded_close(self, msg: ForwardedClose, sender: Any) -> None:
        lanes = self._origin(msg).lanes
        if msg.uid:
            lanes.pop(f"{addr_key(msg.lane)}|{msg.uid}", None)
            return  # the gateway's other lanes still use its address
        prefix = f"{addr_key(msg.lane)}|"
        for key in [k for k in lanes if k.startswith(prefix)]:
            del lanes[key]
        self.host.lane_closed(msg.lane)

    def on_forwarded_status(self, msg: ForwardedStatus, sender: Any) -> None:
        self.host.status_to(msg.request, msg.reply_to)

    def on_beat(self, msg: Beat, sender: Any) -> None:
        self._origin(msg)
        ack = BeatAck(link=msg.link, seq=msg.seq, incarnation=self.me.incarnation)
        self.host.send(msg.origin, ack)

    def on_origin_lost(self, msg: OriginLost, sender: Any) -> None:
        origin = self._origins.pop(addr_key(msg.origin), None)
        if origin is None or not origin.lanes:
            return
        kept = f"; their leases kept {self.reclaim_ms} ms for reclaim" if self.reclaim_ms else ""
        log.warning(
            "origin %s lost (%s): abandoning what its %d lanes wait for here%s",
            msg.origin,
            msg.reason,
            len(origin.lanes),
            kept,
        )
        for ref, paths in origin.lanes.values():
            for path in sorted(paths):
                if not self.host.is_active(path):
                    continue  # passivated: it held nothing
                abandon = self.abandon(ref, path, f"member lost: {msg.reason}")
                self.host.serve(LaneCall(lane=ref, path=path, canonical=True, request=abandon))

    def abandon(self, ref: LaneRef, path: str, reason: str) -> Abandon:
        """What a lost origin's lane gives up on ``path``: its waits, and its lease unless it
        is kept for its holder's reclaim (the file keeps only a lease its record names)."""
        if self.reclaim_ms <= 0:
            return Abandon(lane=ref.name, path=path, reason=reason)
        return AbandonForReclaim(lane=ref.name, path=path, reason=reason, keep_ms=self.reclaim_ms)
