"""Authenticate every frame of thespian's TCP transport before anything is unpickled.

thespian 4.0.1 frames each message as ``b"<len>>" + pickle.dumps((sender, message))`` and every
receiver unpickles what arrives; the sender unpickles the ``ACK`` frame it reads back the same
way (``thespian/system/transport/streamBuffer.py`` and ``TCPTransport.py``). Any process
that can reach a port can therefore run code as the service's user. :func:`install` makes the
payload of every frame, in both directions::

    mac (32) | sender (8) | seq (8) | pickle

where ``mac`` is HMAC-SHA256 over the rest under a key derived from the service's secret,
``sender`` a random id of the sending transport (one per endpoint, per process) and ``seq`` its
frame counter. A receiver buffers the frame thespian announced, checks the MAC with
``hmac.compare_digest`` and the counter, and only then unpickles. A frame that fails is never
unpickled: an incoming connection is closed without a reply, a reply to one of our sends is
treated as a corrupted ACK (thespian closes the socket and retries). Each rejection is logged
with the peer, at most once a minute per peer host.

Before any frame, a connection must open with a hello proving the same key, and until it has,
the accepting side reads at most 64 bytes from it, closes it after a deadline, and keeps at most
a few such connections: :mod:`sessionlane.system.runtime.connection_auth`, applied by
:func:`install` with the frame patch.

Replay: a receiving process remembers, per sender id, the highest counter and which of the
:data:`REPLAY_WINDOW` counters below it it has accepted; a frame seen before, or older than the
window, is refused. So a captured frame cannot be delivered twice to the process it was sent
to, on any connection. Not covered (documented in the README): the frame could still be
delivered once to *another* process that shares the key (frames do not name their target),
and the fixed ``ACK`` frames carry no counter (forging one needs to inject into a live
connection and only tells a sender that a message arrived). A retransmission of a frame that
did arrive (thespian resends the same bytes when the ACK is lost) is refused like a replay:
the receiver acts once, and the sender sees the send fail.

The secret is held in this module's memory only. :func:`install` runs in the process that
creates the actor system, before it does; the admin is forked from it and every actor from
the admin, so all of them inherit the patched transport and the key, and so does this
process's own endpoint (``ActorSystem`` attached from here). A process that attaches from
elsewhere must install the same key first (a convention's members read it from
``cluster_key_file``).

Contract, as for ``sessionlane.system.runtime.loopback``: process-global and idempotent; a second,
different key in one process is refused (systems already started could not follow); it fails
closed, raising on any thespian but :data:`~sessionlane.system.runtime.loopback.SUPPORTED_THESPIAN`
or if a patched attribute moved, and a self-check proves an unauthenticated frame is refused before
it returns.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import os
import pickle
import secrets
import struct
import threading
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any, Literal

from sessionlane.system.runtime import connection_auth
from sessionlane.system.runtime.loopback import SUPPORTED_THESPIAN

__all__ = [
    "KEY_BYTES",
    "REPLAY_WINDOW",
    "FrameRejected",
    "authenticated_frame",
    "connection_hello",
    "install",
    "installed",
]

log = logging.getLogger(__name__)

KEY_BYTES = 32
"""Least secret length accepted (and the length of a random per-start secret)."""
REPLAY_WINDOW = 4096
"""Counters this far below the highest one seen from a sender are still accepted once
(thespian may reorder a sender's frames to one receiver when a send is retried)."""

_WINDOW_MASK = (1 << REPLAY_WINDOW) - 1
_MAC_BYTES = 32
_HEAD = struct.Struct(">8sQ")  # sender id, frame counter
_PREFIX = _MAC_BYTES + _HEAD.size
_MAX_HEADER = 20  # digits of a frame length, at most
_CONTROL_SENDER = bytes(8)  # the fixed ACK frames: authenticated, no counter
_KEY_LABEL = b"sessionlane thespian frame v1"
_MAX_SENDERS = 4096  # remembered per receiving process; the oldest is forgotten first
_LOG_EVERY_S = 60.0

Reason = Literal["not a frame", "too short", "bad mac", "replayed or too old"]

_lock = threading.Lock()
_mac_key: bytes | None = None
_fingerprint: bytes | None = None
_installer_pid = 0


class FrameRejected(Exception):
    """A frame failed authentication; nothing of it was unpickled."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason,))


def installed() -> bool:
    """Whether frames of this process (and of the systems it starts) are authenticated."""
    return _mac_key is not None


def install(secret: bytes | None = None) -> None:
    """Authenticate every thespian TCP frame of this process, and of systems it starts, with
    ``secret``; ``None``: keep the secret installed earlier, or make a random one.

    Raises ``ValueError`` for a secret shorter than :data:`KEY_BYTES`, ``RuntimeError`` if
    another secret was installed in this process, or if the patch cannot be applied to the
    installed thespian (another version, or a patched attribute moved).
    """
    global _mac_key, _fingerprint, _installer_pid
    if secret is not None and len(secret) < KEY_BYTES:
        raise ValueError(f"a transport secret needs at least {KEY_BYTES} bytes")
    with _lock:
        if _mac_key is not None:
            if secret is not None and _digest(secret) != _fingerprint:
                raise RuntimeError(
                    "thespian frames of this process are already authenticated with another"
                    " secret; refusing to switch (systems already started could not follow)"
                )
            return
        secret = secret if secret is not None else secrets.token_bytes(KEY_BYTES)
        modules = _patchable()
        key = hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest()
        _apply(modules, key)
        _self_check(modules, key)
        _mac_key, _fingerprint, _installer_pid = key, _digest(secret), os.getpid()
        log.info("thespian frames authenticated (HMAC-SHA256)")


def authenticated_frame(obj: Any, secret: bytes, *, sender: bytes, seq: int) -> bytes:
    """A whole thespian frame carrying ``obj`` as :func:`install` sends it under ``secret``.

    For tests and tools: a receiver with the same secret accepts it once.
    """
    key = hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest()
    return _sealed_frame(_Hmac(key), sender, seq, pickle.dumps(obj, pickle.HIGHEST_PROTOCOL))


def connection_hello(secret: bytes) -> bytes:
    """The bytes a connection to a port patched under ``secret`` must open with (for tests and
    tools; see :mod:`sessionlane.system.runtime.connection_auth`)."""
    return connection_auth.hello(hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest())


# The patch -----------------------------------------------------------------------------------


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(b"fingerprint:" + secret).digest()


def _patchable() -> tuple[Any, Any]:
    """thespian's transport modules, after checking that what we replace is where it was."""
    version = metadata.version("thespian")
    if version != SUPPORTED_THESPIAN:
        raise RuntimeError(
            f"{__name__} authenticates thespian {SUPPORTED_THESPIAN}'s TCP"
            f" frames but thespian {version} is installed: re-verify TCPTransport.py and"
            " streamBuffer.py before trusting it"
        )
    from thespian.system.transport import TCPTransport as tcp
    from thespian.system.transport import streamBuffer

    moved = []
    if getattr(tcp, "ReceiveBuffer", None) is not streamBuffer.ReceiveBuffer:
        moved.append("TCPTransport.ReceiveBuffer")
    for name in ("ackMsg", "ackDataErrMsg"):
        if getattr(tcp, name, None) != getattr(streamBuffer, name, None):
            moved.append(f"TCPTransport.{name}")
    method = getattr(getattr(tcp, "TCPTransport", None), "serializer", None)
    source = inspect.getsource(method) if inspect.isfunction(method) else ""
    if "toSendBuffer((self.myAddress, intent.message), serializer.dumps)" not in source:
        moved.append("TCPTransport.TCPTransport.serializer")
    common = getattr(tcp, "TCPIncoming_Common", None)
    if not inspect.isfunction(getattr(common, "addData", None)):
        moved.append("TCPIncoming_Common.addData")
    elif "ReceiveBuffer(serializer.loads)" not in inspect.getsource(vars(common)["__init__"]):
        moved.append("TCPIncoming_Common.__init__")
    moved.extend(connection_auth.check_patchable(tcp))
    if moved:
        raise RuntimeError(
            "thespian's TCP transport changed where it frames and unpickles: the"
            f" authentication patch cannot apply ({', '.join(moved)})"
        )
    return tcp, streamBuffer


def _apply(modules: tuple[Any, Any], key: bytes) -> None:
    tcp, stream = modules
    original_add = tcp.TCPIncoming_Common.addData
    mac = _Hmac(key)

    def serializer(self: Any, intent: Any) -> bytes:
        body = pickle.dumps((self.myAddress, intent.message), pickle.HIGHEST_PROTOCOL)
        sender, seq = _next_counter(self)
        return _sealed_frame(mac, sender, seq, body)

    def add_data(self: Any, data: bytes) -> None:
        original_add(self, data)
        reason = getattr(self._rData, "rejected", None)
        if reason is not None:
            _report(reason, _peer(self.socket))
            # thespian closes the connection (no reply) on an exception here.
            raise FrameRejected(reason)

    tcp.ReceiveBuffer = _buffer_class(stream.ReceiveBuffer, mac)
    tcp.ackMsg = _control_frame(key, stream.ackPacket)
    tcp.ackDataErrMsg = _control_frame(key, stream.ackDataErrPacket)
    tcp.TCPTransport.serializer = serializer
    tcp.TCPIncoming_Common.addData = add_data
    connection_auth.apply(tcp, key)


def _control_frame(key: bytes, packet: str) -> bytes:
    return _sealed_frame(_Hmac(key), _CONTROL_SENDER, 0, pickle.dumps(packet))


class _Hmac:
    """HMAC-SHA256 (RFC 2104) under one key, with the padded key's hash states computed once.

    Per frame this costs two copies of a SHA-256 state instead of keying an HMAC: about
    0.7 µs for a small frame where ``hmac.digest`` takes 2.8 µs (OpenSSL 3 re-fetches the
    digest each call). :func:`_self_check` compares it with ``hmac.digest``.
    """

    def __init__(self, key: bytes) -> None:
        padded = key.ljust(64, b"\0")  # SHA-256's block size; our keys are 32 bytes
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))

    def digest(self, *parts: bytes | memoryview) -> bytes:
        inner = self._inner.copy()
        for part in parts:
            inner.update(part)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def _sealed_frame(mac: _Hmac, sender: bytes, seq: int, body: bytes) -> bytes:
    """``<len>>`` + mac + sender + seq + body."""
    head = _HEAD.pack(sender, seq)
    length = b"%d>" % (_PREFIX + len(body))
    return b"".join((length, mac.digest(head, body), head, body))


def _next_counter(transport: Any) -> tuple[bytes, int]:
    """The sending endpoint's id and next frame counter (a fresh id in a forked child)."""
    state = transport.__dict__.get("_sessionlane_frames")
    if state is None or state[0] != os.getpid():
        state = [os.getpid(), secrets.token_bytes(8), 0]
        transport.__dict__["_sessionlane_frames"] = state
    state[2] += 1
    return state[1], state[2]


def _buffer_class(base: type, mac: _Hmac) -> type:
    class AuthenticatedReceiveBuffer(base):  # type: ignore[misc]
        """thespian's frame parser; the payload is verified before it may be unpickled."""

        def __init__(self, serializer: Callable[[bytes], Any] = pickle.loads) -> None:
            super().__init__(serializer)
            self.rejected: Reason | None = None
            self._verified: memoryview | None = None
            self._told = False

        def addMore(self, buf: bytes) -> None:
            super().addMore(buf)
            if not self._unchecked():
                return
            if self._size is None and len(self._buf) > _MAX_HEADER:
                # No length header: thespian would buffer it forever (its own check for this
                # never fires, ``_blen`` stays 1) or answer it.
                self.rejected = "not a frame"
            elif self._size is not None and self._blen == self._size:
                self._check(memoryview(self._buf))

        def _unchecked(self) -> bool:
            return self._verified is None and self.rejected is None

        def _check(self, payload: memoryview) -> None:
            if len(payload) < _PREFIX:
                self.rejected = "too short"
                return
            rest = payload[_MAC_BYTES:]
            if not hmac.compare_digest(payload[:_MAC_BYTES], mac.digest(rest)):
                self.rejected = "bad mac"
                return
            sender, seq = _HEAD.unpack_from(rest)
            if sender != _CONTROL_SENDER and not _replays.accept(sender, seq):
                self.rejected = "replayed or too old"
                return
            self._verified = rest[_HEAD.size :]

        def completed(self) -> tuple[Any, bytes] | None:
            if self._verified is None:
                if self.rejected is not None and not self._told:
                    # Only a reply to one of our sends gets here: an incoming connection
                    # with a rejected frame was closed (and reported) by add_data.
                    self._told = True
                    _report(self.rejected, "a peer we sent to")
                return None
            return pickle.loads(self._verified), self._extra

    return AuthenticatedReceiveBuffer


class _ReplayWindow:
    """Per sender id: the highest counter accepted and a bitmap of the window below it."""

    def __init__(self) -> None:
        self._seen: dict[bytes, tuple[int, int]] = {}
        self._lock = threading.Lock()  # private() endpoints may receive in several threads

    def accept(self, sender: bytes, seq: int) -> bool:
        with self._lock:
            return self._accept(sender, seq)

    def _accept(self, sender: bytes, seq: int) -> bool:
        highest, bits = self._seen.pop(sender, (0, 0))
        accepted = True
        if seq > highest:
            bits = ((bits << (seq - highest)) | 1) & _WINDOW_MASK
            highest = seq
        elif highest - seq >= REPLAY_WINDOW or bits >> (highest - seq) & 1:
            accepted = False
        else:
            bits |= 1 << (highest - seq)
        self._seen[sender] = (highest, bits)  # re-inserted: most recently used last
        if len(self._seen) > _MAX_SENDERS:
            del self._seen[next(iter(self._seen))]
        return accepted


_replays = _ReplayWindow()
_reported: dict[str, float] = {}
_suppressed: dict[str, int] = {}


def _peer(sock: Any) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except (OSError, AttributeError, ValueError):
        return "an unknown peer"
    return f"{host}:{port}"


def _report(reason: str, peer: str) -> None:
    """Log a rejected frame: once a minute per peer host, with how many were not logged."""
    # Keyed by pid too: a forked process inherits its parent's memory of what it logged.
    host = peer.rpartition(":")[0] or peer
    key = f"{os.getpid()} {host}"
    now = time.monotonic()
    last = _reported.get(key)
    if last is not None and now - last < _LOG_EVERY_S:
        _suppressed[key] = _suppressed.get(key, 0) + 1
        return
    _reported[key] = now
    more = _suppressed.pop(key, 0)
    message = (
        f"sessionlane: dropped an unauthenticated thespian frame from {peer} ({reason});"
        f" connection closed{f', {more} more from {host} not logged' if more else ''}"
    )
    _emit(message)


def _emit(message: str) -> None:
    # In the admin, the logger and every actor, logging goes through this very transport (or
    # is configured by thespian), and a rejection is found in the middle of its receive loop:
    # there it goes to thespian's own log file (``<log>.thespian.log`` beside the service's).
    if os.getpid() == _installer_pid:
        log.warning("%s", message)
        return
    from thespian.system.utilis import thesplog

    thesplog("%s", message, level=logging.WARNING)


def _self_check(modules: tuple[Any, Any], key: bytes) -> None:
    """Prove the patch took: our frames round-trip, thespian's plain ones are refused, and the
    MAC is the standard library's HMAC-SHA256."""
    tcp, stream = modules
    sample = b"sessionlane self-check"
    if _Hmac(key).digest(sample[:5], sample[5:]) != hmac.digest(key, sample, "sha256"):
        raise RuntimeError("the frame MAC is not HMAC-SHA256")
    probe = type("Probe", (), {"myAddress": None})()
    intent = type("Intent", (), {"message": "probe"})()
    frame = tcp.TCPTransport.serializer(probe, intent)
    incoming = tcp.TCPIncoming_Common(None, None)
    incoming.addData(frame)
    if incoming.data != ((None, "probe"), b""):
        raise RuntimeError("an authenticated frame did not round-trip: the patch failed")
    plain = tcp.ReceiveBuffer(tcp.serializer.loads)
    plain.addMore(stream.toSendBuffer((None, "probe")))
    ack = tcp.ReceiveBuffer(tcp.serializer.loads)
    ack.addMore(tcp.ackMsg)
    if plain.rejected is None or plain._verified is not None or ack.completed() is None:
        raise RuntimeError("thespian would still unpickle an unauthenticated frame")
