"""Bound what an unauthenticated connection to a thespian port can cost, and prove the key first.

thespian 4.0.1 accepts every connection to an actor's port, reads whatever length the peer
announces (``b"10000000000>"``) into a ``bytes`` buffer that grows by ``+=`` (quadratic CPU),
keeps an idle connection for 7 minutes, and turns a failed ``accept`` (``EMFILE``) into a
``Thespian__UpdateWork`` handed to the actor's message handler, which kills the actor
(``AttributeError: ... has no attribute 'sender'``; ``TCPTransport._acceptNewIncoming``).
:mod:`sessionlane.system.runtime.transport_auth` checks each frame's MAC, but only once the
announced frame has arrived. :func:`apply`, called by its ``install``, adds, per connection:

* **A hello before anything else.** The side that connects sends :data:`HELLO_BYTES` bytes
  first, ``magic | nonce (16) | time (ms) | HMAC``, under the key the frames use. The side that
  accepts reads exactly that many bytes (never more) and checks the MAC, that the time is within
  :data:`HELLO_FRESH_S` of its clock, and that the nonce was not seen before; only then does it
  read a frame. A connection whose hello fails is closed unread.
* **A deadline.** A connection that has not proven the key within :data:`HELLO_DEADLINE_S` is
  closed (sshd's ``LoginGraceTime``, PostgreSQL's ``authentication_timeout``).
* **A cap.** At most :data:`MAX_UNPROVEN` connections per process wait for their hello; a new
  one beyond that closes the oldest waiting one. Ours send their hello with their first frame,
  so they prove the key within a round trip and seldom wait; strangers that sit idle are the
  oldest and go first (sshd's ``MaxStartups`` drops at random instead; here the oldest is the
  one that has had the longest to speak).
* **No fatal accept.** Out of descriptors (``EMFILE``/``ENFILE``), the process closes the oldest
  waiting connection and, failing that, accepts the pending one on a reserved descriptor and
  closes it at once (so the listening socket does not spin), logging at most once a minute.
  A send that cannot get a socket for the same reason is retried after a pause (thespian
  aborted it: "xmit UNcaught exception", and the message was lost).

Freshness without a round trip: thespian sends a message's bytes as soon as its connection
is up, so the accepting side cannot send a challenge first without rewriting thespian's
transmit state machine. The nonce and the time stand in for it: a hello replayed within
:data:`HELLO_FRESH_S` carries a nonce already seen and is refused; an older one is refused by
its time. Hosts of one convention need clocks within :data:`HELLO_FRESH_S` of each other.
The reply direction is covered by the per-frame MAC: every ACK and every frame a connector
reads back is checked before it is unpickled.

Like the other patches of ``sessionlane.system.runtime``, it applies to thespian 4.0.1 only
and raises if a method it replaces moved.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import inspect
import logging
import os
import secrets
import socket
import struct
import threading
import time
from collections import OrderedDict
from datetime import timedelta
from typing import Any

__all__ = [
    "HELLO_BYTES",
    "HELLO_DEADLINE_S",
    "HELLO_FRESH_S",
    "MAX_UNPROVEN",
    "apply",
    "hello",
]

log = logging.getLogger(__name__)

_MAGIC = b"SLHELO1\0"
_BODY = struct.Struct(">8s16sQ")  # magic, nonce, milliseconds since the epoch
_MAC_BYTES = 32
HELLO_BYTES = _BODY.size + _MAC_BYTES
"""Bytes an accepting side reads from a connection before it has proven the key: 64."""
HELLO_DEADLINE_S = 10.0
"""Seconds a connection may take to prove the key before it is closed."""
HELLO_FRESH_S = 60.0
"""How far a hello's time may be from the receiver's clock."""
MAX_UNPROVEN = 64
"""Connections per process that may wait for their hello at once."""
_KEY_LABEL = b"sessionlane thespian hello v1"
_MAX_NONCES = 1 << 16
_LOG_EVERY_S = 60.0
_OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def hello(key: bytes, *, nonce: bytes | None = None, now: float | None = None) -> bytes:
    """The bytes a connection opens with under ``key`` (the frame key's secret)."""
    nonce = secrets.token_bytes(16) if nonce is None else nonce
    millis = int((time.time() if now is None else now) * 1000)
    body = _BODY.pack(_MAGIC, nonce, millis)
    return body + hmac.digest(_hello_key(key), body, "sha256")


def _hello_key(secret: bytes) -> bytes:
    return hmac.digest(secret, _KEY_LABEL, "sha256")


class _Nonces:
    """Nonces of accepted hellos, kept for twice the freshness window; when full, the oldest is
    forgotten and hellos no newer than it are refused (so nothing forgotten can be replayed)."""

    def __init__(self) -> None:
        self._seen: OrderedDict[bytes, int] = OrderedDict()
        self._floor = 0
        self._lock = threading.Lock()

    def accept(self, nonce: bytes, millis: int, now: float) -> bool:
        now_ms = int(now * 1000)
        if abs(now_ms - millis) > HELLO_FRESH_S * 1000:
            return False
        with self._lock:
            if millis <= self._floor:
                return False
            horizon = now_ms - int(2 * HELLO_FRESH_S * 1000)
            while self._seen and next(iter(self._seen.values())) < horizon:
                self._seen.popitem(last=False)
            if nonce in self._seen:
                return False
            self._seen[nonce] = millis
            if len(self._seen) > _MAX_NONCES:
                _, oldest = self._seen.popitem(last=False)
                self._floor = max(self._floor, oldest)
            return True


class _Verifier:
    def __init__(self, secret: bytes) -> None:
        self._key = _hello_key(secret)
        self.nonces = _Nonces()

    def check(self, data: bytes) -> str | None:
        """Why ``data`` (a whole hello) is refused, or ``None``."""
        body, mac = data[: _BODY.size], data[_BODY.size :]
        if not hmac.compare_digest(mac, hmac.digest(self._key, body, "sha256")):
            return "bad hello" if body.startswith(_MAGIC) else "no hello"
        _, nonce, millis = _BODY.unpack(body)
        if not self.nonces.accept(nonce, millis, time.time()):
            return "stale or replayed hello"
        return None


# The patch -----------------------------------------------------------------------------------


def check_patchable(tcp: Any) -> list[str]:
    """What moved in thespian's TCP transport that :func:`apply` replaces or relies on."""
    moved = []
    transport = getattr(tcp, "TCPTransport", None)
    accept = getattr(transport, "_acceptNewIncoming", None)
    if not inspect.isfunction(accept) or "self.socket.accept" not in inspect.getsource(accept):
        moved.append("TCPTransport._acceptNewIncoming")
    readable = getattr(transport, "_handleReadableIncoming", None)
    if not inspect.isfunction(readable) or "inc.remainingSize()" not in inspect.getsource(readable):
        moved.append("TCPTransport._handleReadableIncoming")
    xmit = getattr(transport, "_next_XMIT_1", None)
    if not inspect.isfunction(xmit) or "intent.socket.connect(" not in inspect.getsource(xmit):
        moved.append("TCPTransport._next_XMIT_1")
    names = ("TCPIncoming", "TCPIncomingPersistent", "ExpirationTimer", "ActorAddress", "opsKey")
    for name in names:
        if getattr(tcp, name, None) is None:
            moved.append(f"TCPTransport.{name}")
    if not isinstance(getattr(tcp, "MAX_INCOMING_SOCKET_PERIOD", None), timedelta):
        moved.append("TCPTransport.MAX_INCOMING_SOCKET_PERIOD")
    return moved


def apply(tcp: Any, secret: bytes) -> None:
    """Patch thespian's ``TCPTransport`` module ``tcp`` in place (see the module docstring)."""
    verifier = _Verifier(secret)
    original_readable = tcp.TCPTransport._handleReadableIncoming
    original_xmit_1 = tcp.TCPTransport._next_XMIT_1
    proven_period = tcp.MAX_INCOMING_SOCKET_PERIOD

    def handle_readable(self: Any, inc: Any, has_exclusive_flag: bool = False) -> Any:
        # thespian calls this when the socket is readable, or when its deadline has passed.
        pending = inc.__dict__.get("_sessionlane_hello")
        if pending is None:
            return original_readable(self, inc, has_exclusive_flag=has_exclusive_flag)
        if inc._expires.view().expired():
            _report(f"closed a connection from {_peer(inc.socket)}: no hello in time")
            inc.close()
            return None
        try:
            data = inc.socket.recv(HELLO_BYTES - len(pending))
        except (BlockingIOError, InterruptedError):
            return inc
        except OSError:
            data = b""
        reason = _hello_read(verifier, pending, data)
        if reason is not None:
            if data:  # an empty read is a peer that went away: nothing to report
                _report(f"refused a connection from {_peer(inc.socket)} ({reason})")
            inc.close()
            return None
        if len(pending) == HELLO_BYTES:
            del inc.__dict__["_sessionlane_hello"]
            inc._expires = tcp.ExpirationTimer(proven_period)
        return inc

    def accept_new_incoming(self: Any) -> None:
        self._check_indicators()
        if os.getpid() not in _spare_fd:
            with contextlib.suppress(OSError):  # out of them already: the next accept retries
                reserve_descriptor()
        try:
            sock, _ = self.socket.accept()
        except OSError as error:
            if error.errno in _OUT_OF_FDS:
                _out_of_descriptors(self, tcp)
            elif error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ECONNABORTED):
                _report(f"accepting a connection failed: {error}")
            return
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # only slower (Nagle); thespian ignores EINVAL too
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        kind = tcp.TCPIncomingPersistent if hasattr(self, "_openSockets") else tcp.TCPIncoming
        inc = kind(tcp.ActorAddress(None), sock)
        inc.__dict__["_sessionlane_hello"] = bytearray()
        inc._expires = tcp.ExpirationTimer(timedelta(seconds=HELLO_DEADLINE_S))
        _make_room(self, MAX_UNPROVEN - 1)
        self._incomingSockets[sock.fileno()] = inc

    def next_xmit_1(self: Any, intent: Any) -> Any:
        # A message goes out on a socket we open (it starts with a hello) or on one already
        # proven (reused); a retry re-enters here with the hello-prefixed bytes we set.
        sent = intent.__dict__.get("_sessionlane_sent")
        body = sent[1] if sent is not None and intent.serMsg is sent[0] else intent.serMsg
        open_sockets = getattr(self, "_openSockets", {})
        reused = tcp.opsKey(intent.targetAddr) in open_sockets
        intent.serMsg = body
        intent.__dict__["_sessionlane_sent"] = (body, body)
        try:
            result = original_xmit_1(self, intent)
        except OSError as error:
            # thespian aborts the send on EMFILE from its new socket (the message is lost):
            # free what strangers hold, and retry the send after a pause instead.
            if error.errno not in _OUT_OF_FDS or getattr(intent, "socket", None) is not None:
                raise
            _make_room(self, 0)
            _report_out_of_descriptors(
                f"out of file descriptors: a send to {intent.targetAddr} will be retried"
            )
            intent.backoffPause(True)
            intent.stage = self._XMITStepRetry
            return self._nextTransmitStep(intent)
        if (
            not reused
            and getattr(intent, "socket", None) is not None
            and intent.stage == self._XMITStepSendData
            and intent.amtSent == 0
        ):
            intent.serMsg = hello(secret) + body
            intent.__dict__["_sessionlane_sent"] = (intent.serMsg, body)
        return result

    tcp.TCPTransport._handleReadableIncoming = handle_readable
    tcp.TCPTransport._acceptNewIncoming = accept_new_incoming
    tcp.TCPTransport._next_XMIT_1 = next_xmit_1


def _unproven(transport: Any) -> list[tuple[int, Any]]:
    return [
        (fd, inc)
        for fd, inc in transport._incomingSockets.items()
        if "_sessionlane_hello" in inc.__dict__
    ]


def _hello_read(verifier: _Verifier, pending: bytearray, data: bytes) -> str | None:
    """Add ``data`` to a connection's hello so far; why it is refused, or ``None``."""
    if not data:
        return "closed"
    pending += data
    if pending[: len(_MAGIC)] != _MAGIC[: len(pending)]:
        return "no hello"
    if len(pending) < HELLO_BYTES:
        return None
    return verifier.check(bytes(pending))


def _make_room(transport: Any, keep: int) -> int:
    """Close the oldest connections still waiting for their hello until ``keep`` are left."""
    waiting = _unproven(transport)
    excess = len(waiting) - keep
    if excess <= 0:
        return 0
    waiting.sort(key=lambda item: item[1]._expires.view().remaining())
    for fd, inc in waiting[:excess]:
        del transport._incomingSockets[fd]
        inc.close()
    _report(f"closed {excess} connection(s) that had not proven the key: {len(waiting)} waiting")
    return excess


_spare_fd: dict[int, int] = {}  # pid -> a descriptor kept open to give up when out of them


def reserve_descriptor() -> None:
    """Keep one descriptor in reserve in this process, to refuse a connection when out of them."""
    if os.getpid() not in _spare_fd:
        _spare_fd[os.getpid()] = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def _out_of_descriptors(transport: Any, tcp: Any) -> None:
    """``accept`` failed for want of descriptors: free one, never die."""
    if _make_room(transport, 0):
        _report_out_of_descriptors(
            "out of file descriptors: closed the connections waiting for their hello"
        )
        return
    spare = _spare_fd.pop(os.getpid(), None)
    if spare is not None:
        os.close(spare)
        try:
            sock, _ = transport.socket.accept()
            sock.close()
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                reserve_descriptor()
    transport.close_oldest_idle_sockets(3)
    _report_out_of_descriptors("out of file descriptors: refused a connection")


def _peer(sock: Any) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except (OSError, AttributeError, ValueError):
        return "an unknown peer"
    return f"{host}:{port}"


_reported: dict[tuple[int, str], float] = {}
_suppressed: dict[tuple[int, str], int] = {}


def _report_out_of_descriptors(message: str) -> None:
    """:func:`_report` with the spare descriptor given up while it writes: thespian's log opens
    its file for every line, and a line it could not write would still count as this minute's
    report (the next ones suppressed)."""
    spare = _spare_fd.pop(os.getpid(), None)
    if spare is None:
        _report(message)
        return
    os.close(spare)
    try:
        _report(message)
    finally:
        with contextlib.suppress(OSError):
            reserve_descriptor()


def _report(message: str) -> None:
    """Log at WARNING, at most once a minute per kind of message and process."""
    kind = (os.getpid(), message.split(" from ")[0].split(":")[0])
    now = time.monotonic()
    last = _reported.get(kind)
    if last is not None and now - last < _LOG_EVERY_S:
        _suppressed[kind] = _suppressed.get(kind, 0) + 1
        return
    _reported[kind] = now
    more = _suppressed.pop(kind, 0)
    text = f"sessionlane: {message}" + (f" ({more} more not logged)" if more else "")
    from thespian.system.utilis import thesplog

    thesplog("%s", text, level=logging.WARNING)
