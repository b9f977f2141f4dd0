"""One framed-socket endpoint: every non-blocking length-prefixed stream the service speaks.

The gateway's client connections, its links to SessionFiles and a SessionFile's channel
server (``sessionlane.actors.file_channels``) all read and write ``sessionlane.messages.codec``
frames on sockets watched by thespian's select loop (``ThespianWatch``). What they share lives
here, once:

* :class:`FramedSocket`: one connected socket. ``read`` takes at most ``read_budget`` bytes
  per wake-up (the rest waits for the next select, so one peer cannot starve the others)
  and returns the whole frames with the reason the stream ended, if it did; before the first
  frame, never more than that frame's cap is buffered (``FrameReader.room``). ``queue``
  buffers output up to ``max_output`` bytes (past it the peer is not reading: the owner
  closes it); ``flush`` writes what the socket takes without blocking; ``finish`` closes once
  the queued output is written (an error frame before a close), never by blocking.
* :class:`Acceptor`: a listener accepting at most ``budget`` connections per wake-up, and
  pausing with a growing back-off (:class:`AcceptBackoff`) when ``accept`` fails for want of
  descriptors, instead of spinning on a listener that stays readable.
* :func:`connect_unix`: a non-blocking connect to an abstract Unix name.

Framing itself (frame sizes, the first frame's cap) is pure and lives in
``sessionlane.messages.codec.FrameReader``; what a frame means is the owner's business. Nothing here
blocks, and nothing here uses thespian: the owners watch :attr:`FramedSocket.fd`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sessionlane.messages.codec import FrameReader
from sessionlane.messages.errors import TooLarge

__all__ = [
    "OUT_OF_DESCRIPTORS",
    "AcceptBackoff",
    "Accepted",
    "Acceptor",
    "FramedSocket",
    "Received",
    "close_level",
    "connect_unix",
]

RECV_BYTES = 256 * 1024
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_PEER_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN})
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)


def close_level(exc: OSError | None) -> int:
    """A peer that went away is routine; any other socket error is worth a warning."""
    if exc is None or exc.errno in _PEER_GONE:
        return logging.DEBUG
    return logging.WARNING


@dataclass
class Received:
    """What one ``read`` brought: whole frames in order, then why the stream ended, if it did.

    ``too_large``: a header announced a frame over the limit (the frames before it are in
    ``bodies``). ``ended``: the peer closed (``error`` None) or the socket failed; the
    frames received before are still in ``bodies`` and deserve handling.
    """

    bodies: list[bytes] = field(default_factory=list)
    received: int = 0
    """Bytes received (a peer that sent any is alive, whatever they make)."""
    too_large: TooLarge | None = None
    ended: str | None = None
    error: OSError | None = None


class FramedSocket:
    """One connected non-blocking stream socket carrying frames. Never blocks.

    ``fd`` stays the socket's number after it is closed (to find it in the owner's tables).
    """

    def __init__(
        self,
        sock: socket.socket,
        max_frame: int,
        *,
        first_frame: int | None = None,
        read_budget: int = RECV_BYTES,
        max_output: int | None = None,
    ):
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.reader = FrameReader(max_frame, first_frame)
        self.read_budget = read_budget
        self.max_output = max_output
        self.out = bytearray()
        self.closed = False
        self.finishing: str | None = None
        """Why ``finish`` was called: closes once ``out`` is written."""

    def read(self) -> Received:
        """Receive what is waiting, up to the budget (and the first frame's cap)."""
        got = Received()
        budget = self.read_budget
        capped = self.reader.room is not None
        while budget > 0 and not self.closed:
            room = self.reader.room
            if capped and room is None:
                break  # the first frame is whole: nothing more until its owner judged it
            size = min(budget, RECV_BYTES, room or RECV_BYTES)
            try:
                data = self.sock.recv(size)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                got.ended, got.error = f"connection error: {exc}", exc
                break
            if not data:
                got.ended = "connection closed"
                break
            budget -= len(data)
            got.received += len(data)
            bodies, got.too_large = self.reader.feed_until_error(data)
            got.bodies += bodies
            if got.too_large is not None or len(data) < size:
                break  # a short read drained the socket: no failing recv to learn it again
        return got

    def queue(self, data: bytes) -> bool:
        """Buffer ``data`` for ``flush``; False if the output is now over ``max_output``."""
        self.out += data
        return self.max_output is None or len(self.out) <= self.max_output

    def flush(self) -> OSError | None:
        """Write what the socket takes now; the error that broke it, if one did.

        A ``finish``-ed socket is closed once everything is written (or writing failed).
        """
        error = None
        while self.out and not self.closed:
            try:
                sent = self.sock.send(self.out, _NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.out.clear()
                error = exc
                break
            del self.out[:sent]
        if self.finishing is not None and (not self.out or error is not None):
            self.close()
        return error

    def finish(self, reason: str) -> bool:
        """Close once the queued output is written; True if it is closed already."""
        self.finishing = reason
        self.flush()
        return self.closed

    def close(self) -> None:
        """Close the socket now (what is queued is dropped). Idempotent."""
        self.closed = True
        self.out.clear()
        with contextlib.suppress(OSError):
            self.sock.close()


@dataclass
class AcceptBackoff:
    """When to watch a listener again after ``accept`` failed for want of descriptors.

    The first failure of an episode waits ``first_s``, each next one twice as long up to
    ``max_s``; a successful accept ends the episode.
    """

    first_s: float = 0.05
    max_s: float = 2.0
    failures: int = 0

    def failed(self) -> float:
        """Record a failure; the pause before the next attempt (seconds)."""
        self.failures += 1
        delay: float = min(self.max_s, self.first_s * 2 ** (self.failures - 1))
        return delay

    def succeeded(self) -> int:
        """Record a success; how many failures the episode it ends had (0: there was none)."""
        failures, self.failures = self.failures, 0
        return failures


@dataclass
class Accepted:
    """One ``accept`` round: how many connections, and what went wrong.

    ``pause_s``: accept failed for want of descriptors; the listener is paused (not to be
    watched) until ``Acceptor.resume`` after this many seconds (``first_pause``: the first
    failure of its episode). ``recovered``: failures the back-off episode this round ended
    had. ``error``: why accepting stopped early (logged by the owner).
    """

    count: int = 0
    pause_s: float | None = None
    first_pause: bool = False
    recovered: int = 0
    error: OSError | None = None


class Acceptor:
    """A listening socket accepting at most ``budget`` connections per wake-up."""

    def __init__(self, sock: socket.socket, budget: int, backoff: AcceptBackoff | None = None):
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.budget = budget
        self.backoff = backoff or AcceptBackoff()
        self.paused = False

    def accept(self, take: Callable[[socket.socket, Any], None]) -> Accepted:
        """Accept what waits, up to the budget, handing each socket and its peer's address
        to ``take`` at once (before the next accept uses another descriptor); pause on
        running out of descriptors."""
        round = Accepted()
        for _ in range(self.budget):
            try:
                sock, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in OUT_OF_DESCRIPTORS:
                    round.first_pause = self.backoff.failures == 0
                    round.pause_s = self.backoff.failed()
                    self.paused = True
                round.error = exc
                break
            round.recovered += self.backoff.succeeded()
            round.count += 1
            take(sock, peer)
        return round

    def resume(self) -> None:
        """Watch the listener again after a pause."""
        self.paused = False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def connect_unix(name: str) -> socket.socket:
    """A socket connected, without blocking, to the abstract Unix name ``name``.

    ``OSError`` if the connection cannot be made now: no listener (``ECONNREFUSED``), its
    backlog full (``EAGAIN``: an ``AF_UNIX`` connect never stays in progress, so there is
    nothing to watch; the caller tries again later), or no descriptor left.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect("\0" + name)
    except BaseException:
        sock.close()
        raise
    return sock
