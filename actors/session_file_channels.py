"""The direct channels of a SessionFile: how the gateway reaches a file without the actor chain.

``FileChannels`` is a part of ``sessionlane.actors.session_file.SessionFile`` that owns the file's
``ChannelServer`` (``sessionlane.actors.file_channels``, the sockets themselves) and what connects
it to the actor: the offer, reply frames, the flush retry. The actor serves the calls it reports and
abandons the lanes of the channels it reports closed.

The gateway reaches a file over a direct channel (``sessionlane.messages.channel``) instead of the
actor chain: it asks through the Registry (``OpenChannel``, counted like a call), and the file
answers with a ``ChannelOffer`` naming its ``ChannelServer``, opened on the first such
request, or, where no socket can serve the asker (another host, a base that cannot watch
sockets), the file's own actor: a carried channel (``sessionlane.actors.carried``), whose
connections are served by the same code. Channel calls run through exactly the code of a
``LaneCall``, with the connection (a ``ChannelRef``) as the lane's address; every message to
such a lane becomes a reply frame on that connection, queued, and written once at the end of
the actor's turn. They are not
counted in ``received`` (that number is compared with what the Registry forwarded), so an
open channel keeps the file from asking to be passivated, and a channel that closes abandons
its lanes' leases and requests. The server's sockets are watched always; the always-readable
pipe of group commit only while a pass is being ended (``sessionlane.actors.session_file_commit``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

from sessionlane.actors._shell import addr_key
from sessionlane.actors.ahead import BoundAhead
from sessionlane.actors.carried import CarriedPeers, CarriedRef
from sessionlane.actors.file_channels import ChannelClosed, ChannelEvent, ChannelRef, ChannelServer
from sessionlane.messages import trusted
from sessionlane.messages.carried import CarriedCalls, CarriedLost, CarriedReplies
from sessionlane.messages.channel import reply_frame
from sessionlane.messages.internal import (
    ChannelOffer,
    DirectAhead,
    FileReply,
    LaneCall,
    LaneRef,
    OpenChannel,
)
from sessionlane.messages.reply_maps import reply_frame_bytes
from sessionlane.messages.wire import Direct, DirectOffer, Error, Granted

__all__ = ["FLUSH_RETRY_S", "FileChannels", "channel_call", "refused_offer"]

log = logging.getLogger(__name__)

FLUSH_RETRY_S = 0.002
"""How soon channel output a full socket buffer refused is written again."""


def refused_offer(msg: OpenChannel, canonical: str | None, reason: str, code: Any) -> ChannelOffer:
    """The answer to ``msg`` when this file offers no channel (its calls come the actor way)."""
    return ChannelOffer(
        path=msg.path, nonce=msg.nonce, canonical=canonical, reason=reason, code=code
    )


_MAX_LANE_REFS = 4096
"""Lane references kept for reuse (``channel_call``); past this many the cache starts over."""


def channel_call(
    path: str, conn: ChannelRef, call: Any, refs: dict[tuple[Any, ...], LaneRef] | None = None
) -> LaneCall:
    """The ``LaneCall`` a channel call is served as (the connection is the lane's address).

    ``refs``: the ``LaneRef`` of each (connection, uid, name, priority) already made, reused
    (it is frozen): a lane sends many calls on one channel, and each validated ``LaneRef``
    costs about as much as the ``LaneCall`` around it."""
    key = (conn, call.uid, call.name, call.priority)
    lane = refs.get(key) if refs is not None else None
    if lane is None:
        lane = LaneRef(uid=call.uid, name=call.name, address=conn, priority=call.priority)
        if refs is not None:
            if len(refs) >= _MAX_LANE_REFS:
                refs.clear()  # a serial is never reused: dropping old ones loses nothing
            refs[key] = lane
    return trusted.lane_call(lane, path, True, call.request)


class FileChannels:
    """The channel listener of one open file, opened on first use, and its output.

    ``enabled`` and ``watch`` say whether channels may be offered at all; ``accepting`` is
    asked for each new connection (a retiring file accepts none).
    """

    def __init__(
        self,
        path: str,
        incarnation: int,
        *,
        idle_ms: int = 0,
        enabled: bool,
        watch: bool,
        accepting: Callable[[], bool],
        clock: Callable[[], float] = lambda: 0.0,
        direct: bool = True,
    ) -> None:
        self.path = path
        self.clock = clock
        self.direct = direct
        self.incarnation = incarnation
        self.idle_ms = idle_ms
        self.enabled = enabled
        self.watch = watch
        self.accepting = accepting
        self.server: ChannelServer | None = None
        self.carried = CarriedPeers(path, incarnation, addr_key, accepting)
        """The carried connections (``sessionlane.actors.carried``): other hosts, and every
        peer where no socket can be watched."""
        self.carried_out: list[tuple[Any, CarriedReplies]] = []
        """Carried messages the shell has still to send (``take_carried``)."""
        self.flush_armed = False
        self.closed = 0  # channels closed so far (numbers the abandons they cause)
        self.calls = 0  # calls served from channels (the ``channel_calls`` counter)
        self.lane_refs: dict[tuple[Any, ...], LaneRef] = {}
        """The lanes of the channels' calls, made once (``channel_call``)."""

    def offer(self, msg: OpenChannel, me: Any) -> ChannelOffer:
        """The answer to ``msg``: the listener's address (opened now if need be), or a
        carried channel to ``me`` (this file's actor) where no socket can serve the asker."""
        if self.server is None and not msg.carried:
            reason = self.cannot_open()
            if reason:
                log.debug("offering a carried channel to %s: %s", self.path, reason)
        if self.server is None or msg.carried:
            return ChannelOffer(
                path=msg.path,
                nonce=msg.nonce,
                canonical=self.path,
                file=me,
                token=self.carried.token,
                incarnation=self.incarnation,
                idle_ms=self.idle_ms,
            )
        return ChannelOffer(
            path=msg.path,
            nonce=msg.nonce,
            canonical=self.path,
            address=self.server.address,
            token=self.server.token,
            incarnation=self.incarnation,
            idle_ms=self.idle_ms,
        )

    def adopt(self, listener: socket.socket, bound: BoundAhead) -> bool:
        """Serve ``listener``, bound ahead of this actor (``sessionlane.actors.ahead``),
        whose first connections already wait in its backlog; False (and it is closed, so those
        are refused and ask again) where no socket may be offered."""
        if self.server is not None or not self.watch or not self.enabled:
            listener.close()
            return False
        self.server = ChannelServer.adopt(
            listener, bound, self.path, self.incarnation, self.accepting, self.clock
        )
        return True

    def cannot_open(self) -> str:
        """Open the listener; why it cannot be opened, or "" once it is."""
        if not self.watch:
            return "this actor system cannot watch sockets"
        if not self.enabled:
            return "channels are turned off"
        try:
            self.server = ChannelServer.open(
                self.path, self.incarnation, accepting=self.accepting, clock=self.clock
            )
        except OSError as exc:
            log.error("cannot open a channel listener for %s: %s", self.path, exc)
            return f"cannot open a channel listener: {exc}"
        return ""

    def offer_direct(self, call: LaneCall) -> DirectOffer | Error:
        """The answer to a client's ``direct`` (forwarded by the gateway through its lane):
        a ticket for this file's listener, or why there is none (``unavailable``)."""
        request = call.request
        assert isinstance(request, Direct)
        reason = self.cannot_open() if self.server is None else ""
        if not reason and not self.direct:
            reason = "direct channels are turned off"
        if not reason and (request.peer_uid is None or request.max_frame_bytes is None):
            reason = "the request did not come through the gateway"
        if self.server is None or reason:
            detail = f"no direct channel to {self.path}: {reason}"
            return Error(id=request.id, code="unavailable", detail=detail, path=self.path)
        lane = call.lane
        ticket = self.server.tickets.mint(lane.uid, request, self.path, self.clock(), lane.priority)
        return DirectOffer(
            id=request.id, address=self.server.address, ticket=ticket, path=self.path
        )

    def take_tickets(self, tickets: Iterable[DirectAhead]) -> None:
        """Hold the tickets the Registry minted ahead for the asks that activated this file
        (``FileInit.tickets``) as if this file had minted them; none where no direct channel
        can be offered (the client's hello is then refused, and it uses the gateway)."""
        if self.server is None or not self.direct:
            return
        for ahead in tickets:
            self.server.tickets.mint(
                ahead.gateway_lane,
                ahead.request,
                self.path,
                self.clock(),
                ahead.priority,
                ticket=ahead.ticket,
            )

    def close_direct(self, gateway_lane: str | None) -> list[ChannelClosed]:
        """The direct channels of ``gateway_lane`` (it was abandoned), or all of them (None:
        the file is idle), closed now."""
        return self.server.close_direct(gateway_lane) if self.server is not None else []

    def on_carried(self, msg: CarriedCalls, sender: Any) -> list[ChannelEvent]:
        """What a carried message brought: calls, and its channel closed (if it did)."""
        return self.carried.on_message(msg, sender)

    def on_carried_lost(self, msg: CarriedLost) -> list[CarriedRef]:
        """The convention member of some carried peers is lost: their channels close once
        what is queued for them now (the abandons of their lanes) has gone."""
        return self.carried.close_peers(msg.peers, msg.reason)

    def take_carried(self) -> list[tuple[Any, CarriedReplies]]:
        """The carried messages to send now (``(address, message)``, in order)."""
        out, self.carried_out = self.carried_out, []
        return out + self.carried.take_output()

    def on_ready(self, ready: list[int]) -> list[ChannelEvent]:
        """What the ready channel sockets brought: calls, and channels that closed."""
        return self.server.on_ready(ready) if self.server is not None else []

    def next_closed(self) -> int:
        """A fresh number for the abandon a closed channel causes."""
        self.closed += 1
        return self.closed

    def flush(self) -> tuple[list[ChannelClosed], bool]:
        """Write the output: the connections found closed, and whether to arm a flush retry."""
        if self.server is None:
            return [], False
        try:
            left = self.server.flush()
        except Exception:
            log.exception("writing the channels of %s failed", self.path)
            left = True
        arm = left and not self.flush_armed
        if arm:
            self.flush_armed = True
        return list(self.server.closed_since_last()), arm

    def flush_due(self) -> None:
        """The flush retry fired (the end of the turn writes what is left)."""
        self.flush_armed = False

    def close(self) -> None:
        """The actor is exiting: write what is left if the sockets take it, then close them;
        the carried peers' last output and their close wait in ``take_carried``."""
        self.carried_out += self.carried.close("the file's actor closed the channel")
        if self.server is not None:
            with contextlib.suppress(OSError):
                self.server.flush()  # best effort: the last replies of a passivated file
            self.server.close()
            self.server = None

    def send(self, address: ChannelRef, message: FileReply) -> None:
        """``message`` as a reply frame on its channel (dropped if it closed)."""
        if isinstance(address, CarriedRef):
            self.carried.send(address, reply_frame(message.lane, message.message))
        elif self.server is not None:
            # A grant is written before the turn's other replies: its holder's next request
            # is the next step of the hand-off chain; a released reply, say, is not.
            first = isinstance(message.message, Granted)
            if self.server.is_direct(address):
                self.server.send(address, reply_frame_bytes(message.message), first=first)
            else:
                self.server.send(address, reply_frame(message.lane, message.message), first=first)

    def fds(self) -> list[int]:
        return self.server.fds() if self.server is not None else []

    def input_waiting(self) -> bool:
        """Whether input may be waiting for this pass: a socket is readable now, or a carried
        connection is open (its frames come in thespian messages, which no poll can see)."""
        if self.carried.connections():
            return True
        return self.server is not None and self.server.readable()

    def connections(self) -> int:
        sockets = self.server.connections() if self.server is not None else 0
        return sockets + self.carried.connections()
