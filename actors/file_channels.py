"""The SessionFile's end of its channels: a non-blocking Unix socket server. No thespian.

The gateway connects to a SessionFile over an ``AF_UNIX`` stream socket in the abstract
namespace (see ``sessionlane.messages.channel``). ``ChannelServer`` owns the listener and every
accepted connection (each an ``sessionlane.actors.endpoint`` ``Acceptor`` and ``FramedSocket``: the
same reading, writing and budgets as the gateway's); the actor drives it from its own loop,
single-threaded and never blocking:

* ``receiveMessage`` watches ``fds()`` (``ThespianWatch``) and hands the ready ones from a
  ``WatchMessage`` to ``on_ready``, which accepts, reads, checks the hello and returns events:
  a ``ChannelCallEvent`` per call, a ``ChannelClosed`` per authenticated connection it closed;
* replies are queued with ``send`` and written by ``flush`` once per actor turn, so a group
  commit releasing many replies costs one ``send`` per connection;
* a connection ``flush`` (or ``send``) had to close, because its peer is gone or stopped
  reading, is reported once by ``closed_since_last()``, which the actor calls after ``flush``.
  Every close of an authenticated connection is reported exactly once, by one of the two.

A connection must first send a hello with the server's token (``hmac.compare_digest``); it is
then welcomed, unless the server stopped ``accepting`` (the file is being passivated), in
which case it is closed without a welcome and the gateway goes back to the Registry. A
connection closed before its hello lost nothing and is reported to nobody.
"""

from __future__ import annotations

import hmac
import logging
import os
import select
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from sessionlane.actors.ahead import BACKLOG, BoundAhead, bind
from sessionlane.actors.direct_channels import DirectBinding, DirectTickets, direct_request
from sessionlane.actors.endpoint import Acceptor, FramedSocket, close_level
from sessionlane.messages.channel import (
    ChannelCall,
    ChannelDirectHello,
    ChannelHello,
    decode_from_gateway,
    direct_welcome_frame,
    welcome_frame,
)
from sessionlane.messages.client_frames import MAX_CLIENT_OUTPUT_BYTES
from sessionlane.messages.codec import FrameDecodeError, decode_request, frame
from sessionlane.messages.lean_records import lean_record
from sessionlane.messages.wire import Alive, Error, Keepalive

__all__ = ["ChannelCallEvent", "ChannelClosed", "ChannelEvent", "ChannelRef", "ChannelServer"]

log = logging.getLogger(__name__)

MAX_HELLO_BYTES = 4 * 1024
"""The largest frame accepted before the hello: an unauthenticated peer buffers no more."""
MAX_FRAME_BYTES = 64 * 1024 * 1024
"""The largest frame accepted after the hello."""
MAX_OUTPUT_BYTES = 256 * 1024 * 1024
"""A connection whose unread output exceeds this is closed: its gateway stopped reading."""
_READ_BUDGET = 4 * 1024 * 1024
"""Bytes read from one connection per ``on_ready``: the rest waits for the next select."""
_ACCEPT_BUDGET = BACKLOG
_MAX_UNGREETED = 8
"""Connections allowed to wait for their hello at once; the oldest goes when one more comes.

The gateway says hello in the same write as it connects, so only a stranger (any local user
can reach an abstract socket) keeps one waiting: this bounds what it can hold open."""


@dataclass(frozen=True, slots=True)
class ChannelRef:
    """One accepted connection. Hashable; a serial is never reused within a server."""

    serial: int


@lean_record
class ChannelCallEvent:
    """A call frame arrived on an authenticated connection."""

    conn: ChannelRef
    call: ChannelCall


@lean_record
class ChannelClosed:
    """An authenticated connection is closed: nothing more comes from it or reaches it."""

    conn: ChannelRef


ChannelEvent = ChannelCallEvent | ChannelClosed


@dataclass(eq=False)
class _Conn:
    ref: ChannelRef
    end: FramedSocket
    peer_uid: int | None = None
    welcomed: bool = False
    direct: DirectBinding | None = None
    """Set once a client's direct hello redeemed a ticket."""


class ChannelServer:
    """A file's channel listener and its connections. Not thread-safe; never blocks."""

    def __init__(
        self,
        listener: socket.socket,
        name: str,
        token: str,
        path: str,
        incarnation: int,
        accepting: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = lambda: 0.0,
    ):
        self._acceptor = Acceptor(listener, _ACCEPT_BUDGET)
        self._open = True
        self._name = name
        self._token = token
        self._path = path
        self._incarnation = incarnation
        self._conns: dict[int, _Conn] = {}  # fd -> connection
        self._by_ref: dict[ChannelRef, _Conn] = {}
        self._serial = 0
        self._dirty: dict[ChannelRef, None] = {}  # connections with output, in writing order
        self._closed: list[ChannelClosed] = []  # closed by send/flush, not reported yet
        self.accepting = accepting
        """Asked at each hello; False while the file is being passivated: the hello is
        answered by closing."""
        self.tickets = DirectTickets()
        """The direct-channel tickets minted for this file's clients."""
        self.clock = clock
        """Monotonic milliseconds, for the tickets' expiry."""

    @classmethod
    def open(
        cls,
        path: str,
        incarnation: int,
        accepting: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = lambda: 0.0,
    ) -> ChannelServer:
        """Listen on a fresh abstract name; ``OSError`` if no socket can be made."""
        bound, _, _ = BoundAhead.fresh()
        return cls.adopt(bind(bound), bound, path, incarnation, accepting, clock)

    @classmethod
    def adopt(
        cls,
        listener: socket.socket,
        bound: BoundAhead,
        path: str,
        incarnation: int,
        accepting: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = lambda: 0.0,
    ) -> ChannelServer:
        """Serve ``listener``, bound ahead on ``bound.name`` (``sessionlane.actors.ahead``):
        the connections already waiting in its backlog are accepted like any later one."""
        return cls(listener, bound.name, bound.token, path, incarnation, accepting, clock)

    @property
    def address(self) -> str:
        """The abstract name without its leading NUL: peers connect to ``"\\0" + address``."""
        return self._name

    @property
    def token(self) -> str:
        """What a peer's hello must carry."""
        return self._token

    def fds(self) -> list[int]:
        """The listener and every connection (to watch for reading)."""
        if not self._open:
            return []
        return [self._acceptor.fd, *self._conns]

    def readable(self) -> bool:
        """Whether the listener or a connection has input waiting now (a poll that does not
        wait: the actor asks it to end a group-commit pass without a transport pass)."""
        if not self._open:
            return False
        poller = select.poll()
        for fd in self.fds():
            poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))

    def connections(self) -> int:
        """Authenticated connections (those that said hello and were welcomed)."""
        return sum(1 for conn in self._conns.values() if conn.welcomed)

    # Input ---------------------------------------------------------------------------------

    def on_ready(self, ready: list[int]) -> list[ChannelEvent]:
        """Accept and read what ``ready`` (fds from a ``WatchMessage``) says is waiting.

        Fds that are not this server's are ignored. Events are in arrival order per
        connection; a connection closed while reading ends with its ``ChannelClosed``.
        """
        events: list[ChannelEvent] = []
        readable = [self._conns[fd] for fd in ready if fd in self._conns]
        for conn in readable:
            self._read(conn, events)
        if self._open and self._acceptor.fd in ready:
            for conn in self._accept():
                self._read(conn, events)  # a hello sent right after connecting: no extra select
        return events

    def _accept(self) -> list[_Conn]:
        accepted: list[_Conn] = []
        round = self._acceptor.accept(lambda sock, _: self._take(sock, accepted))
        self._acceptor.resume()  # the peer waits in the backlog; the next select retries
        if round.error is not None:
            log.warning("cannot accept a channel to %s: %s", self._path, round.error)
        return accepted

    def _take(self, sock: socket.socket, accepted: list[_Conn]) -> None:
        # Another user's process may only show a direct ticket minted for its uid: its
        # connection waits for its hello like any other. The cap below counts the service's
        # own user and the others apart, so strangers never push out the gateway's hello.
        uid = _peer_uid(sock)
        stranger = uid is not None and uid != os.getuid()
        waiting = [
            c
            for c in self._by_ref.values()
            if not c.welcomed and (c.peer_uid is not None and c.peer_uid != os.getuid()) == stranger
        ]
        if len(waiting) >= _MAX_UNGREETED:
            self._close(waiting[0], "too many connections without a hello", logging.WARNING)
        self._serial += 1
        end = FramedSocket(
            sock,
            MAX_FRAME_BYTES,
            first_frame=MAX_HELLO_BYTES,
            read_budget=_READ_BUDGET,
            max_output=MAX_OUTPUT_BYTES,
        )
        conn = _Conn(ChannelRef(self._serial), end, uid)
        self._conns[end.fd] = conn
        self._by_ref[conn.ref] = conn
        accepted.append(conn)

    def _read(self, conn: _Conn, events: list[ChannelEvent]) -> None:
        got = conn.end.read()
        try:
            for body in got.bodies:
                if conn.direct is not None:
                    self._direct_frame(conn, conn.direct, body, events)
                else:
                    self._frame(conn, body, events)
        except FrameDecodeError as exc:
            self._drop(conn, events, f"FrameDecodeError: {exc}", logging.WARNING)
            return
        except _Refused as exc:
            self._drop(conn, events, exc.reason, exc.level)
            return
        if got.too_large is not None:
            if conn.direct is not None:  # said, as the gateway says it, before the close
                conn.end.queue(frame(Error(code="too_large", detail=got.too_large.detail)))
                conn.end.flush()
            self._drop(conn, events, f"TooLarge: {got.too_large}", logging.WARNING)
        elif got.ended is not None:
            reason = "closed by the peer" if got.error is None else got.ended
            self._drop(conn, events, reason, close_level(got.error))

    def _frame(self, conn: _Conn, body: bytes, events: list[ChannelEvent]) -> None:
        frame = decode_from_gateway(body)
        if not conn.welcomed:
            self._hello(conn, frame)
        elif isinstance(frame, ChannelCall):
            events.append(ChannelCallEvent(conn.ref, frame))
        else:
            raise FrameDecodeError("a second hello")

    def _hello(self, conn: _Conn, hello: ChannelHello | ChannelDirectHello | ChannelCall) -> None:
        if isinstance(hello, ChannelDirectHello):
            self._direct_hello(conn, hello)
            return
        if not isinstance(hello, ChannelHello):
            raise _Refused("a call before the hello", logging.WARNING)
        if conn.peer_uid is not None and conn.peer_uid != os.getuid():
            raise _Refused(f"a gateway hello from uid {conn.peer_uid}", logging.WARNING)
        if not hmac.compare_digest(hello.token.encode(), self._token.encode()):
            raise _Refused("wrong token", logging.WARNING)
        if not self.accepting():
            raise _Refused("not accepting: the file is being passivated", logging.DEBUG)
        conn.welcomed = True
        self._queue(conn, welcome_frame(self._path, self._incarnation))

    def _direct_hello(self, conn: _Conn, hello: ChannelDirectHello) -> None:
        if not self.accepting():
            raise _Refused("not accepting: the file is being passivated", logging.DEBUG)
        binding = self.tickets.redeem(hello.ticket, conn.peer_uid, self.clock())
        if isinstance(binding, str):
            raise _Refused(f"direct channel refused: {binding}", logging.WARNING)
        conn.direct = binding
        conn.welcomed = True
        conn.end.reader.max_frame_bytes = binding.max_frame_bytes
        conn.end.max_output = MAX_CLIENT_OUTPUT_BYTES
        self._queue(conn, direct_welcome_frame(self._path, binding.lane))

    def _direct_frame(
        self, conn: _Conn, binding: DirectBinding, body: bytes, events: list[ChannelEvent]
    ) -> None:
        """A client's frame on its direct channel: a call of its lane, or an error frame."""
        try:
            request = decode_request(body)
        except FrameDecodeError as exc:
            self._queue(conn, frame(Error(id=exc.request_id, code="bad_frame", detail=exc.detail)))
            return
        if isinstance(request, Keepalive):
            self._queue(conn, frame(Alive(id=request.id)))
            return
        call = direct_request(binding, request)
        if isinstance(call, Error):
            self._queue(conn, frame(call))
        else:
            events.append(ChannelCallEvent(conn.ref, call))

    def is_direct(self, conn: ChannelRef) -> bool:
        """Whether ``conn`` is a client's direct channel (its replies are wire frames)."""
        found = self._by_ref.get(conn)
        return found is not None and found.direct is not None

    def close_direct(self, gateway_lane: str | None) -> list[ChannelClosed]:
        """Close the direct channels (and forget the tickets) of ``gateway_lane``, which was
        abandoned (its connection to the gateway is gone, or its client abandoned the path),
        or every direct channel (None: the file is idle)."""
        if gateway_lane is not None:
            self.tickets.drop_for(gateway_lane)
        why = "idle" if gateway_lane is None else "its gateway lane was abandoned"
        closed: list[ChannelClosed] = []
        for conn in list(self._by_ref.values()):
            binding = conn.direct
            if binding is not None and gateway_lane in (None, binding.gateway_lane):
                event = self._close(conn, why, logging.DEBUG)
                if event is not None:
                    closed.append(event)
        return closed

    # Output --------------------------------------------------------------------------------

    def send(self, conn: ChannelRef, data: bytes, *, first: bool = False) -> None:
        """Queue ``data`` for ``conn``; dropped silently if that connection is gone.

        ``first``: ``flush`` writes this connection before the others (a grant: its holder's
        next request is the hand-off's critical path, the other replies are not); otherwise
        connections are written in the order their output was queued. Each connection's own
        frames keep their order either way."""
        target = self._by_ref.get(conn)
        if target is not None and target.welcomed:
            self._queue(target, data, first=first)

    def _queue(self, conn: _Conn, data: bytes, *, first: bool = False) -> None:
        if first:
            self._dirty.pop(conn.ref, None)
            self._dirty = {conn.ref: None, **self._dirty}
        else:
            self._dirty.setdefault(conn.ref)
        if not conn.end.queue(data):
            self._close_later(conn, "the peer stopped reading", logging.WARNING)

    def flush(self) -> bool:
        """Write every buffered output without blocking; True if some is left to write.

        A connection whose peer is gone is closed; ``closed_since_last()`` reports it.
        """
        left = False
        for ref in list(self._dirty):
            conn = self._by_ref.get(ref)
            if conn is None:
                self._dirty.pop(ref, None)
                continue
            error = conn.end.flush()
            if error is not None:
                self._close_later(conn, f"send failed: {error}", close_level(error))
            if conn.end.out and ref in self._by_ref:
                left = True
            else:
                self._dirty.pop(ref, None)
        return left

    def closed_since_last(self) -> list[ChannelClosed]:
        """Authenticated connections ``send``/``flush`` closed since the previous call."""
        closed, self._closed = self._closed, []
        return closed

    # Closing -------------------------------------------------------------------------------

    def _drop(self, conn: _Conn, events: list[ChannelEvent], reason: str, level: int) -> None:
        """Close ``conn``; an authenticated one is reported by a ``ChannelClosed`` in ``events``."""
        closed = self._close(conn, reason, level)
        if closed is not None:
            events.append(closed)

    def _close(self, conn: _Conn, reason: str, level: int) -> ChannelClosed | None:
        """Close ``conn``; the event that reports it, if it was authenticated."""
        if self._by_ref.pop(conn.ref, None) is None:
            return None
        self._dirty.pop(conn.ref, None)
        self._conns.pop(conn.end.fd, None)
        conn.end.close()
        state = "after its hello" if conn.welcomed else "before its hello"
        log.log(level, "channel %d to %s closed %s: %s", conn.ref.serial, self._path, state, reason)
        return ChannelClosed(conn.ref) if conn.welcomed else None

    def _close_later(self, conn: _Conn, reason: str, level: int) -> None:
        """Close ``conn`` outside ``on_ready``: ``closed_since_last()`` reports it."""
        closed = self._close(conn, reason, level)
        if closed is not None:
            self._closed.append(closed)

    def close(self) -> None:
        """Close the listener and every connection (nothing is reported). Idempotent."""
        for conn in list(self._conns.values()):
            conn.end.close()
        self._conns.clear()
        self._by_ref.clear()
        self._dirty.clear()
        self._closed.clear()
        self._open = False
        self._acceptor.close()


class _Refused(Exception):
    """A hello that is not accepted: close the connection, logging ``reason`` at ``level``."""

    def __init__(self, reason: str, level: int):
        super().__init__(reason)
        self.reason = reason
        self.level = level


_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _peer_uid(sock: socket.socket) -> int | None:
    """The uid of the peer process (abstract sockets have no file permissions), or None where
    the system does not say (not Linux: the token or ticket alone guards the channel)."""
    try:
        _, uid, _ = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
    except (OSError, AttributeError):
        return None
    return int(uid)
