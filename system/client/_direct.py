"""The client's direct channels to the files' processes (``docs/direct-channel.md``).

``DirectRoutes`` is the part of ``ClientCore`` that knows which requests go on which direct
channel: an acquire and a lane-less append on the channel of their (path, lane), a lease's
writes and release on the channel that granted it, everything else on the gateway's
connection. No I/O. ``open_sync`` and
``open_async`` open one channel for the two surfaces: connect to the file's abstract socket,
check its process runs as the service's user (``SO_PEERCRED``) before anything is sent, show
the ticket, read the welcome.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Generic, TypeVar

from sessionlane.messages.channel import decode_direct_welcome, direct_hello_frame
from sessionlane.messages.codec import FrameReader
from sessionlane.messages.errors import Unauthorized, Unavailable
from sessionlane.messages.wire import Acquire, Append, DirectOffer
from sessionlane.system.gateway import peercred
from sessionlane.system.gateway.admission import MAX_HELLO_BYTES

__all__ = ["DirectRoutes", "DirectUnknown", "Key", "open_async", "open_sync"]

L = TypeVar("L")
RETRY_S = 30.0
"""How long a (path, lane) whose direct channel could not be had uses the gateway before the
client asks again (a file being passivated refuses, the next one may not)."""
Key = tuple[str, str]
"""(path as the client sent it, lane name)."""


class DirectUnknown(Unavailable):
    """The service refused the hello's ``direct`` field (it is older than direct channels):
    connect again without it."""


class DirectRoutes(Generic[L]):
    """Which direct channel (a ``Link``) each request goes on. Not thread-safe."""

    def __init__(self, ask: bool) -> None:
        self.ask = ask
        """Whether the hello asks for direct channels (until a service refuses the field)."""
        self.offered = False
        """The last welcome offered direct channels (and the service's uid is known)."""
        self.links: dict[Key, L] = {}
        """The open direct channels."""
        self.refused: dict[Key, float] = {}
        """(path, lane) whose direct channel could not be had, and until when not to ask."""
        self.leases: dict[str, L] = {}
        """The leases granted on a direct channel, and that channel."""

    def hello_refused(self, code: str, detail: str) -> bool:
        """Whether an error answering the hello is an older service refusing ``direct``
        (asked no more by this client)."""
        if self.ask and code == "bad_frame" and "direct" in detail:
            self.ask = False
            return True
        return False

    def welcomed(self, offered: bool) -> None:
        """A new gateway connection was welcomed (``offered``: with direct channels)."""
        self.offered = offered
        self.refused.clear()

    def key(self, request: Any, now: float) -> Key | None:
        """The (path, lane) whose direct channel ``request`` would go on, if it may have one
        and none is open: an acquire (not a reclaim) or a lane-less append, on a connection
        that offered them."""
        if not self.offered:
            return None
        key = _lane_path(request)
        if key is None or key in self.links or self.refused.get(key, now) > now:
            return None
        return key

    @staticmethod
    def opens_channel(request: Any) -> bool:
        """Does ``request`` go on its (path, lane)'s channel (an acquire, a lane-less append)
        rather than on the channel of a lease?"""
        return _lane_path(request) is not None

    def refuse(self, key: Key, now: float) -> None:
        """No direct channel for ``key``: its requests use the gateway for :data:`RETRY_S`."""
        self.refused[key] = now + RETRY_S

    def route(self, request: Any) -> L | None:
        """The direct channel ``request`` goes on, or None (the gateway's connection)."""
        key = _lane_path(request)
        if key is not None:
            return self.links.get(key)
        lease = getattr(request, "lease", None)
        return None if lease is None else self.leases.get(lease)

    def lost(self, link: L) -> list[str] | None:
        """``link`` ended: the leases it took with it, or None if it is no direct channel."""
        keys = [key for key, found in self.links.items() if found is link]
        if not keys:
            return None
        for key in keys:
            del self.links[key]
        gone = [lease for lease, found in self.leases.items() if found is link]
        for lease in gone:
            del self.leases[lease]
        return gone

    def held(self, lane: str, path: str | None) -> list[str]:
        """The leases held on the direct channels of ``lane`` (to ``path`` only, if given)."""
        links = [
            link
            for (where, name), link in self.links.items()
            if name == lane and (path is None or where == path)
        ]
        return [lease for lease, link in self.leases.items() if link in links]


def _lane_path(request: Any) -> Key | None:
    """The (path, lane) of a request that goes on its lane's direct channel to its path: an
    acquire (a reclaim goes through the gateway) or a lane-less append (a short write lease);
    None for any other."""
    if isinstance(request, Acquire):
        return (request.path, request.lane) if request.reclaim is None else None
    if isinstance(request, Append) and request.lease is None:
        assert request.lane is not None and request.path is not None  # the wire says so
        return (request.path, request.lane)
    return None


def _owner_refusal(sock: socket.socket, expected: int | None) -> None:
    owner = peercred.peer_uid(sock)
    if owner is None or owner != expected:
        raise Unauthorized(f"the direct channel's peer runs as uid {owner}, not {expected}")


def open_sync(offer: DirectOffer, expected: int | None, timeout: float) -> socket.socket:
    """A welcomed direct channel to ``offer``'s file, its process owned by ``expected``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect("\0" + offer.address)
        _owner_refusal(sock, expected)
        sock.sendall(direct_hello_frame(offer.ticket))
        frames = FrameReader(MAX_HELLO_BYTES)
        bodies: list[bytes] = []
        while not bodies:
            data = sock.recv(MAX_HELLO_BYTES)
            if not data:
                raise Unavailable("the file closed the direct channel at its hello")
            bodies = frames.feed(data)
        decode_direct_welcome(bodies[0])
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


async def open_async(
    offer: DirectOffer, expected: int | None, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``open_sync`` for asyncio: the welcomed channel's streams."""
    opening = asyncio.open_unix_connection("\0" + offer.address)
    reader, writer = await asyncio.wait_for(opening, timeout)
    try:
        _owner_refusal(writer.get_extra_info("socket"), expected)
        writer.write(direct_hello_frame(offer.ticket))
        frames = FrameReader(MAX_HELLO_BYTES)
        bodies: list[bytes] = []
        async with asyncio.timeout(timeout):
            while not bodies:
                data = await reader.read(MAX_HELLO_BYTES)
                if not data:
                    raise Unavailable("the file closed the direct channel at its hello")
                bodies = frames.feed(data)
        decode_direct_welcome(bodies[0])
    except BaseException:
        writer.close()
        raise
    return reader, writer
