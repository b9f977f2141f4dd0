"""Both ends of a carried channel: channel frames in thespian messages instead of a socket.

The protocol is the socket channel's (``sessionlane.messages.channel``: a hello with the
offer's token, then calls; a welcome, then replies); only the carrier differs
(``sessionlane.messages.carried``). A SessionFile offers a carried channel where a socket cannot
go: to a convention member on another host, and on a base that cannot watch sockets.

* ``CarriedPeers`` is the file's end, a part of ``sessionlane.actors.session_file_channels.
  FileChannels``. Each sending actor (a Lane, a gateway) is one connection, a ``CarriedRef``
  (a ``ChannelRef``, so the file serves and answers it through exactly the code of a socket
  connection). Its frames are checked by the same decoder and the same hello rule as a
  socket's; a peer that breaks the rule is closed and told so. Replies are queued and sent as
  one ``CarriedReplies`` per peer at the end of the actor's turn.
* ``CarriedEnd`` is the link's end (``sessionlane.actors.links``): queued frames go as one
  ``CarriedCalls`` per turn; closing says so to the file, which then abandons the lanes the
  channel served, as for a socket that closed.

Nothing here blocks or reads a clock; sending is the owning actor's (the file returns its
messages from ``take_output``, the link end is given its host's ``send``).
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sessionlane.actors.file_channels import (
    MAX_FRAME_BYTES,
    ChannelCallEvent,
    ChannelClosed,
    ChannelEvent,
    ChannelRef,
)
from sessionlane.messages.carried import CarriedCalls, CarriedReplies
from sessionlane.messages.channel import (
    ChannelCall,
    ChannelHello,
    decode_from_gateway,
    welcome_frame,
)
from sessionlane.messages.codec import FrameDecodeError, take_frame
from sessionlane.messages.errors import TooLarge

__all__ = ["CarriedEnd", "CarriedPeers", "CarriedRef", "split_frames"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CarriedRef(ChannelRef):
    """One carried connection: a peer actor. Never equal to a socket's ``ChannelRef``."""


def split_frames(data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> list[bytes]:
    """The frame bodies of one carried message; ``FrameDecodeError`` if it ends mid-frame."""
    buf = bytearray(data)
    bodies: list[bytes] = []
    try:
        while (body := take_frame(buf, max_bytes)) is not None:
            bodies.append(body)
    except TooLarge as exc:
        raise FrameDecodeError(str(exc)) from None
    if buf:
        raise FrameDecodeError("a carried message ends inside a frame")
    return bodies


@dataclass(eq=False)
class _Peer:
    ref: CarriedRef
    key: str
    address: Any
    out: list[bytes] = field(default_factory=list)
    closed: str = ""
    """Set by ``close_peers``: its last output goes with this reason, then it is gone."""


class _Refused(Exception):
    def __init__(self, reason: str, level: int):
        super().__init__(reason)
        self.reason = reason
        self.level = level


class CarriedPeers:
    """The carried connections of one file, keyed by their peer actor (``addr_key``)."""

    def __init__(
        self,
        path: str,
        incarnation: int,
        key: Callable[[Any], str],
        accepting: Callable[[], bool] = lambda: True,
    ) -> None:
        self._path = path
        self._incarnation = incarnation
        self._key = key
        self.accepting = accepting
        self.token = secrets.token_urlsafe(24)
        self._peers: dict[str, _Peer] = {}
        self._by_ref: dict[CarriedRef, _Peer] = {}
        self._serial = 0
        self._dirty: set[CarriedRef] = set()
        self._refusals: list[tuple[Any, str]] = []  # (address, reason): closed, to be told

    def connections(self) -> int:
        return len(self._peers)

    def on_message(self, msg: CarriedCalls, sender: Any) -> list[ChannelEvent]:
        """What ``sender``'s frames bring: calls, and its connection closed (if it was)."""
        events: list[ChannelEvent] = []
        key = self._key(sender)
        peer = self._peers.get(key)
        if msg.path != self._path:
            self._refuse(peer, sender, events, f"frames for {msg.path!r}", logging.WARNING)
            return events
        try:
            for body in split_frames(msg.frames):
                frame = decode_from_gateway(body)
                if peer is None:
                    peer = self._hello(key, sender, frame)
                elif isinstance(frame, ChannelCall):
                    events.append(ChannelCallEvent(peer.ref, frame))
                else:
                    raise FrameDecodeError("a second hello")
        except FrameDecodeError as exc:
            self._refuse(peer, sender, events, f"FrameDecodeError: {exc}", logging.WARNING)
            return events
        except _Refused as exc:
            self._refuse(peer, sender, events, exc.reason, exc.level)
            return events
        if msg.closing and peer is not None:
            self._forget(peer, events)
        return events

    def _hello(self, key: str, sender: Any, frame: ChannelHello | ChannelCall | Any) -> _Peer:
        if not isinstance(frame, ChannelHello):
            raise _Refused("a call before the hello", logging.WARNING)
        if not hmac.compare_digest(frame.token.encode(), self.token.encode()):
            raise _Refused("wrong token", logging.WARNING)
        if not self.accepting():
            raise _Refused("not accepting: the file is being passivated", logging.DEBUG)
        self._serial += 1
        peer = _Peer(CarriedRef(self._serial), key, sender)
        self._peers[key] = peer
        self._by_ref[peer.ref] = peer
        self._queue(peer, welcome_frame(self._path, self._incarnation))
        return peer

    def _refuse(
        self, peer: _Peer | None, sender: Any, events: list[ChannelEvent], reason: str, level: int
    ) -> None:
        """Close ``sender``'s connection (if any) and tell it, as a socket closed on it."""
        state = "after its hello" if peer is not None else "before its hello"
        log.log(level, "carried channel to %s closed %s: %s", self._path, state, reason)
        if peer is not None:
            self._forget(peer, events)
        self._refusals.append((sender, reason))

    def _forget(self, peer: _Peer, events: list[ChannelEvent]) -> None:
        if self._peers.get(peer.key) is peer:
            del self._peers[peer.key]
        self._by_ref.pop(peer.ref, None)
        self._dirty.discard(peer.ref)
        events.append(ChannelClosed(peer.ref))

    def close_peers(self, addresses: Iterable[Any], reason: str) -> list[CarriedRef]:
        """Close the connections of ``addresses`` (their member is lost): what is queued for
        them until the next ``take_output`` still goes, with the close and ``reason``."""
        closing: list[CarriedRef] = []
        for address in addresses:
            for peer in [p for p in self._peers.values() if p.address == address]:
                log.warning("carried channel to %s closed: %s", self._path, reason)
                del self._peers[peer.key]  # a hello from it now opens a new connection
                peer.closed = reason
                self._dirty.add(peer.ref)
                closing.append(peer.ref)
        return closing

    def send(self, ref: CarriedRef, data: bytes) -> None:
        """Queue ``data`` for ``ref``; dropped if that connection is gone."""
        peer = self._by_ref.get(ref)
        if peer is not None:
            self._queue(peer, data)

    def _queue(self, peer: _Peer, data: bytes) -> None:
        peer.out.append(data)
        self._dirty.add(peer.ref)

    def take_output(self) -> list[tuple[Any, CarriedReplies]]:
        """The messages to send now: one per peer with output, then the refusals."""
        out: list[tuple[Any, CarriedReplies]] = []
        for ref in self._dirty:
            peer = self._by_ref.get(ref)
            if peer is not None and (peer.out or peer.closed):
                frames, peer.out = b"".join(peer.out), []
                out.append((peer.address, self._replies(frames, peer.closed)))
            if peer is not None and peer.closed:
                del self._by_ref[ref]
        self._dirty.clear()
        refusals, self._refusals = self._refusals, []
        out += [(address, self._replies(b"", reason)) for address, reason in refusals]
        return out

    def close(self, reason: str) -> list[tuple[Any, CarriedReplies]]:
        """Every connection closes: its last output and the reason, one message per peer."""
        out = []
        for peer in self._by_ref.values():
            frames, peer.out = b"".join(peer.out), []
            out.append((peer.address, self._replies(frames, reason)))
        out += [(address, self._replies(b"", why)) for address, why in self._refusals]
        self._peers.clear()
        self._by_ref.clear()
        self._dirty.clear()
        self._refusals.clear()
        return out

    def _replies(self, frames: bytes, closed: str = "") -> CarriedReplies:
        return CarriedReplies(
            path=self._path, incarnation=self._incarnation, frames=frames, closed=closed
        )


class CarriedEnd:
    """A link's end of a carried channel: the frames it queues go to ``file`` once per turn."""

    fd = -1
    """Not a socket: nothing to watch (replies come as ``CarriedReplies``)."""

    def __init__(self, file: Any, path: str, send: Callable[[Any, Any], None]) -> None:
        self.file = file
        self.path = path
        self._send = send
        self.out: list[bytes] = []
        self.closed = False

    def queue(self, data: bytes) -> bool:
        self.out.append(data)
        return True

    def flush(self) -> None:
        """Send what is queued (nothing to report: a lost file is told by the Registry)."""
        if self.out and not self.closed:
            frames, self.out = b"".join(self.out), []
            self._send(self.file, CarriedCalls(path=self.path, frames=frames))

    def close(self) -> None:
        """What is queued, then the end of this channel (the file abandons its lanes)."""
        if not self.closed:
            frames, self.out = b"".join(self.out), []
            self._send(self.file, CarriedCalls(path=self.path, frames=frames, closing=True))
            self.closed = True
