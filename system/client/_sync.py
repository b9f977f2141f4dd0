"""The public Python client (synchronous). ``connect_async`` is the asyncio twin, same shape.

    import sessionlane

    with sessionlane.connect("tcp://127.0.0.1:7420") as sl:
        lane = sl.lane("agent:main:heartbeat", priority="background")
        with lane.lease(path, purpose="prompt", on_contention="skip") as lease:
            if lease is not None:
                lease.append({"type": "message", "text": "hi"})

Addresses: ``HOST:PORT``, ``tcp://HOST:PORT`` or ``unix:///path``; none given means
``$SESSIONLANE_LISTEN``, else ``tcp://127.0.0.1:7420``. A refused connection (nothing
listening) raises ``Unavailable`` at once unless ``reconnect_for`` asks to keep trying.

Every failure is a ``SessionLaneError``. Records that could not be stored (not a JSON object,
a set, bytes, a non-string key, NaN, over ``max_record_bytes``) raise ``InvalidRecord``, and a
batch over ``max_frame_bytes`` raises ``TooLarge``, before anything is sent: the connection and
its leases stay usable.

A background thread reads replies and events and sends keepalives while the connection is
idle. If the connection breaks, every lease on it is reported lost: its next use raises
``LeaseRevoked`` and writes nothing. The next call reconnects. Warnings go to the module's
logger (``system.client``) only, never to the host's stderr.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from messages.codec import FrameReader, decode_reply, frame
from messages.errors import (
    BadFrame,
    Contended,
    InvalidRecord,
    LeaseRevoked,
    LeaseTimeout,
    NotHolder,
    PathNotAllowed,
    QueueFull,
    SessionLaneError,
    ShuttingDown,
    StaleFence,
    TooLarge,
    TooManyFiles,
    Unauthorized,
    Unavailable,
)
from messages.wire import (
    Abandon,
    Abandoned,
    Acquire,
    Append,
    Durability,
    Granted,
    Hello,
    Keepalive,
    OnContention,
    Priority,
    Purpose,
    Recover,
    Release,
    Reply,
    Rewrite,
    Rewritten,
    Skipped,
    Status,
    StatusReply,
)
from system.client._core import (
    MAX_FRAME_BYTES,
    MAX_RECORD_BYTES,
    AppendResult,
    ClientCore,
    LeaseState,
    LeaseView,
    acquire_request,
    acquire_wait,
    anchor,
    append_result,
    check_frame,
    check_records,
    client_name,
    default_address,
    library_logger,
    parse_address,
    raise_if_error,
    token_text,
)

if TYPE_CHECKING:
    from system.client._async import AsyncSessionLane

__all__ = [
    "AppendResult",
    "BadFrame",
    "Contended",
    "InvalidRecord",
    "Lane",
    "Lease",
    "LeaseRevoked",
    "LeaseTimeout",
    "NotHolder",
    "PathNotAllowed",
    "QueueFull",
    "SessionLane",
    "SessionLaneError",
    "ShuttingDown",
    "StaleFence",
    "TooLarge",
    "TooManyFiles",
    "Unauthorized",
    "Unavailable",
    "connect",
    "connect_async",
]

log = library_logger("system.client")  # the public package's name: what users configure

_REPLY_MARGIN_S = 10.0
"""How much longer than its own timeout a request may take before the service is deemed gone."""


def connect(
    address: str | None = None,
    token: str | None = None,
    *,
    timeout: float = 30.0,
    keepalive: float = 5.0,
    reconnect_for: float = 0.0,
    max_record_bytes: int | None = MAX_RECORD_BYTES,
    max_frame_bytes: int | None = MAX_FRAME_BYTES,
) -> SessionLane:
    """Open a connection to ``address`` (default: ``$SESSIONLANE_LISTEN``, else
    ``tcp://127.0.0.1:7420``).

    ``token``: the service's token (surrounding whitespace, e.g. a file's trailing newline,
    is ignored). ``timeout`` bounds the connect and every reply (beyond a request's own wait).
    ``reconnect_for``: how long a connect (this one, and each reconnect after a lost
    connection) keeps retrying while refused; 0, the default, raises ``Unavailable`` at once.
    ``max_record_bytes`` / ``max_frame_bytes``: the limits checked before sending (the
    service's defaults; set them to the service's values if it raised its own, or None to
    leave the check to the service). A malformed address raises ``ValueError``.
    """
    sl = SessionLane(
        default_address() if address is None else address,
        token,
        timeout=timeout,
        keepalive=keepalive,
        reconnect_for=reconnect_for,
        max_record_bytes=max_record_bytes,
        max_frame_bytes=max_frame_bytes,
    )
    sl.reconnect()
    return sl


def connect_async(
    address: str | None = None, token: str | None = None, **kwargs: Any
) -> AsyncSessionLane:
    """The asyncio client: ``async with connect_async(addr) as sl`` or ``await connect_async``."""
    from system.client._async import connect_async as _connect_async

    return _connect_async(address, token, **kwargs)


class _Waiter:
    __slots__ = ("event", "replies")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.replies: list[Reply] = []


class SessionLane:
    """One connection to a sessionlane service. Thread-safe; usable as a context manager."""

    def __init__(
        self,
        address: str,
        token: str | None,
        *,
        timeout: float,
        keepalive: float,
        reconnect_for: float,
        max_record_bytes: int | None = MAX_RECORD_BYTES,
        max_frame_bytes: int | None = MAX_FRAME_BYTES,
    ):
        parse_address(address)  # a malformed address fails here, not at the first call
        self.address = address
        self.token = token_text(token)
        self.timeout = timeout
        self.keepalive = keepalive
        self.reconnect_for = reconnect_for
        self.max_record_bytes = max_record_bytes
        self.max_frame_bytes = max_frame_bytes
        self.core = ClientCore()
        self.server: str | None = None
        self._lock = threading.Lock()  # sends, id allocation, waiters
        self._connecting = threading.Lock()  # one reconnect at a time
        self._sock: socket.socket | None = None
        self._last_sent = time.monotonic()
        self._reader: threading.Thread | None = None
        self._waiters: dict[Any, _Waiter] = {}
        self._orphans: set[Any] = set()  # acquires whose caller stopped waiting
        self._closed = False
        self._generation = 0

    # Connection ----------------------------------------------------------------------------

    def reconnect(self) -> None:
        """(Re)open the connection, with bounded retries on refusal."""
        with self._connecting:
            if self._sock is None:  # another thread may have reconnected meanwhile
                self._reconnect()

    def _reconnect(self) -> None:
        # With reconnect_for 0 this is one attempt: a refusal raises at once.
        retrying = Retrying(
            stop=stop_after_delay(self.reconnect_for),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            retry=retry_if_exception_type(
                (ConnectionRefusedError, FileNotFoundError, ConnectionResetError)
            ),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self._open()
        except OSError as exc:
            raise Unavailable(f"cannot reach sessionlane at {self.address}: {exc}") from exc

    def _open(self) -> None:
        kind, where = parse_address(self.address)
        family = (
            socket.AF_UNIX
            if kind == "unix"
            else (socket.AF_INET6 if ":" in where[0] else socket.AF_INET)
        )
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(where)
        except OSError:
            sock.close()
            raise
        if kind == "tcp":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._generation += 1
            self._sock = sock
            generation = self._generation
        self._reader = threading.Thread(
            target=self._read_loop, args=(sock, generation), name="sessionlane-client", daemon=True
        )
        self._reader.start()
        try:
            hello = Hello(client=client_name(), token=self.token)
            welcome = raise_if_error(self._request(hello, connect=False))
        except BaseException:
            self._drop(sock, generation, "hello failed")
            raise
        self.server = getattr(welcome, "server", None)

    def close(self) -> None:
        """Close the connection: the service abandons this connection's leases."""
        self._closed = True
        with self._lock:
            sock, self._sock = self._sock, None
            # Before the socket goes: the reader would report the close as a lost connection.
            self.core.lost("connection_closed")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def __enter__(self) -> SessionLane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_loop(self, sock: socket.socket, generation: int) -> None:
        reader = FrameReader(64 * 1024 * 1024)
        reason = "connection closed by the service"
        # Wait for input with a selector, not a socket timeout: the timeout would also cut
        # sends short (a large append would fail mid-frame after ``keepalive`` seconds).
        selector = selectors.DefaultSelector()
        selector.register(sock, selectors.EVENT_READ)
        try:
            while sock.fileno() >= 0:  # ``close()`` may close it under us
                data = sock.recv(256 * 1024) if selector.select(self.keepalive) else None
                if data == b"":
                    break
                # The service hears from us only when we send: keep alive by what we sent,
                # not by what we received (a holder fed events may send nothing for long).
                if time.monotonic() - self._last_sent >= self.keepalive:
                    self._send_quietly(sock, Keepalive(id=f"ka{generation}"))
                for body in reader.feed(data or b""):
                    self._deliver(decode_reply(body))
        except (OSError, ValueError, SessionLaneError) as exc:  # ValueError: a closed socket
            reason = f"connection lost: {exc}"
        except Exception as exc:  # a bug must not leave requests waiting on a dead reader
            log.exception("sessionlane client reader failed")
            reason = f"reader failed: {exc!r}"
        finally:
            selector.close()
        self._drop(sock, generation, reason)
        sock.close()

    def _send_quietly(self, sock: socket.socket, message: Any) -> None:
        with self._lock, contextlib.suppress(OSError):
            self._last_sent = time.monotonic()
            sock.sendall(frame(message))

    def _drop(self, sock: socket.socket, generation: int, reason: str) -> None:
        """Shut ``sock`` down for good and report its connection lost.

        Shut down, not closed: that wakes the reader thread, which closes the socket when it
        leaves (closing it here could leave the reader waiting on a vanished descriptor).
        """
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        self._lost(generation, reason)

    def _deliver(self, reply: Reply) -> None:
        if reply.id is None:
            with self._lock:
                self.core.on_event(reply)
            return
        release: Release | None = None
        with self._lock:
            waiter = self._waiters.get(reply.id)
            if waiter is not None:
                waiter.replies.append(reply)
                waiter.event.set()
            elif reply.id in self._orphans and reply.type != "queued":
                self._orphans.discard(reply.id)
                if isinstance(reply, Granted):
                    release = Release(id=f"orphan{reply.id}", lease=reply.lease)
            sock = self._sock
        if release is not None and sock is not None:
            log.warning("releasing lease %s granted after its caller gave up", release.lease)
            self._send_quietly(sock, release)

    def _lost(self, generation: int, reason: str) -> None:
        with self._lock:
            if generation != self._generation:
                return
            first = self._sock is not None
            self._sock = None
            self.core.lost()
            for waiter in self._waiters.values():
                waiter.event.set()
        if first and not self._closed:
            log.warning("sessionlane %s: %s", self.address, reason)

    # Requests ------------------------------------------------------------------------------

    def _request(
        self,
        message: Any,
        *,
        timeout: float | None = None,
        final: bool = True,
        connect: bool = True,
    ) -> Reply:
        """Send ``message`` with a fresh id; wait for its final reply (``queued`` skipped).

        ``connect``: reconnect first if the connection is down (not for ``hello`` itself,
        which runs inside a reconnect).
        """
        if self._closed:
            raise Unavailable("the connection was closed")
        if self._sock is None and connect:
            self.reconnect()
        with self._lock:
            rid = self.core.next_id()
            waiter = self._waiters[rid] = _Waiter()
            sock = self._sock
            generation = self._generation
        try:
            if sock is None:
                raise Unavailable("not connected")
            data = check_frame(frame(message.model_copy(update={"id": rid})), self.max_frame_bytes)
            try:
                with self._lock:
                    self._last_sent = time.monotonic()
                    sock.sendall(data)
            except OSError as exc:
                # The connection is unusable (and a partly sent frame would corrupt it):
                # report it lost now, so its leases are revoked before this error surfaces.
                self._drop(sock, generation, f"send failed: {exc}")
                raise Unavailable(f"send failed: {exc}") from exc
            limit = (timeout if timeout is not None else self.timeout) + _REPLY_MARGIN_S
            while True:
                if not waiter.event.wait(limit):
                    if isinstance(message, Acquire | Recover):
                        with self._lock:  # a grant that still comes must not pin the path
                            self._orphans.add(rid)
                    raise Unavailable(f"no reply to {message.type} within {limit:.0f} s")
                with self._lock:
                    waiter.event.clear()
                    replies, waiter.replies = waiter.replies, []
                    gone = self._sock is not sock
                for reply in replies:
                    if reply.type != "queued" or not final:
                        return reply
                if gone:
                    raise Unavailable("connection lost before the reply arrived")
        finally:
            with self._lock:
                self._waiters.pop(rid, None)

    # Public API ----------------------------------------------------------------------------

    def lane(self, name: str, priority: Priority = "interactive") -> Lane:
        """A lane of this connection (created on the service at its first request)."""
        return Lane(self, name, priority)

    def recover(
        self, path: str, reason: str = "stuck", grace: float = 5.0, *, lane: str = "recovery"
    ) -> Lease:
        """Take a recovery lease on ``path``: the holder is asked to abort, then revoked."""
        path = anchor(path)
        reply = raise_if_error(
            self._request(
                Recover(lane=lane, path=path, reason=reason, grace_ms=int(grace * 1000)),
                timeout=grace + self.timeout,
            ),
            path,
        )
        assert isinstance(reply, Granted)
        return self._lease(reply, lane)

    def status(self, path: str | None = None) -> StatusReply:
        reply = raise_if_error(self._request(Status(path=anchor(path) if path else None)), path)
        assert isinstance(reply, StatusReply)
        return reply

    def _records(self, records: Sequence[Any], *, allow_empty: bool = False) -> list[Any]:
        """``records`` checked before sending (``InvalidRecord``; see ``check_records``)."""
        return check_records(
            records, max_record_bytes=self.max_record_bytes, allow_empty=allow_empty
        )

    def _lease(self, granted: Granted, lane: str) -> Lease:
        state = LeaseState(granted.lease, granted.path, granted.fence, granted.purpose)
        with self._lock:
            state = self.core.track(state)
        return Lease(self, state, lane)


class Lane:
    """A named lane on one connection. The same name on two connections is two lanes."""

    def __init__(self, sl: SessionLane, name: str, priority: Priority):
        self.sl = sl
        self.name = name
        self.priority = priority

    @contextlib.contextmanager
    def lease(
        self,
        path: str,
        purpose: Purpose = "prompt",
        wait_timeout: float | None = 60.0,
        max_hold: float | None = None,
        on_contention: OnContention = "wait",
    ) -> Iterator[Lease | None]:
        """Hold ``path`` for the ``with`` block; yields None when skipped."""
        lease = self.acquire(
            path, purpose, wait_timeout=wait_timeout, max_hold=max_hold, on_contention=on_contention
        )
        try:
            yield lease
        finally:
            if lease is not None:
                lease.release(quiet=True)

    def acquire(
        self,
        path: str,
        purpose: Purpose = "prompt",
        *,
        wait_timeout: float | None = 60.0,
        max_hold: float | None = None,
        on_contention: OnContention = "wait",
    ) -> Lease | None:
        """Acquire without a ``with`` block; release the lease yourself."""
        path = anchor(path)
        request = acquire_request(
            self.name,
            self.priority,
            path,
            purpose,
            wait_timeout=wait_timeout,
            max_hold=max_hold,
            on_contention=on_contention,
        )
        reply = raise_if_error(self.sl._request(request, timeout=acquire_wait(wait_timeout)), path)
        if isinstance(reply, Skipped):
            return None
        assert isinstance(reply, Granted), reply
        return self.sl._lease(reply, self.name)

    def append(
        self, path: str, *records: dict[str, Any], durability: Durability | None = None
    ) -> AppendResult:
        """A short write without a lease: queued like a ``write`` lease, never interleaved."""
        path = anchor(path)
        reply = raise_if_error(
            self.sl._request(
                Append(
                    lane=self.name,
                    path=path,
                    records=self.sl._records(records),
                    durability=durability,
                )
            ),
            path,
        )
        return append_result(reply)

    def abandon(self, path: str | None = None, reason: str | None = None) -> list[str]:
        """Drop this lane's leases and queued requests (on ``path`` only, if given)."""
        reply = raise_if_error(
            self.sl._request(
                Abandon(lane=self.name, path=anchor(path) if path else None, reason=reason)
            ),
            path,
        )
        assert isinstance(reply, Abandoned)
        with self.sl._lock:
            self.sl.core.abandoned(reply.leases)
        return reply.leases


class Lease(LeaseView):
    """A granted lease. Writes carry its fence; a revoked lease refuses to write.

    ``id``, ``fence``, ``path``, ``purpose``, ``abort_requested``, ``revoked`` and
    ``external_changes`` come from ``LeaseView``; events update them as they arrive.
    """

    def __init__(self, sl: SessionLane, state: LeaseState, lane: str):
        super().__init__(state, lane)
        self.sl = sl

    def append(
        self, *records: dict[str, Any], durability: Durability | None = None
    ) -> AppendResult:
        """Append records durably under this lease; all or nothing."""
        self.check_usable()
        checked = self.sl._records(records)
        return append_result(
            self._call(
                Append(lease=self.id, fence=self.fence, records=checked, durability=durability)
            )
        )

    def rewrite(self, records: Sequence[dict[str, Any]]) -> int:
        """Replace the whole file atomically (compaction leases); returns the line count."""
        self.check_usable()
        checked = self.sl._records(records, allow_empty=True)
        reply = self._call(Rewrite(lease=self.id, fence=self.fence, records=checked))
        assert isinstance(reply, Rewritten)
        return reply.lines

    def release(self, *, quiet: bool = False) -> None:
        """Release one level of the lease. ``quiet``: a lease already gone is not an error."""
        if self.level_released:
            return
        try:
            if quiet and self.state.revoked is not None:
                return
            self.check_usable()
            self._call(Release(lease=self.id))
        except (NotHolder, LeaseRevoked, Unavailable):
            if not quiet:
                raise
        finally:
            self.level_released = True
            with self.sl._lock:
                self.sl.core.untrack(self.state)

    def _call(self, message: Any) -> Reply:
        try:
            # Never on a new connection: the lease died with the one that granted it.
            reply = self.sl._request(message, connect=False)
        except Unavailable as exc:
            error = self.unreachable(exc)
            if error is exc:
                raise
            raise error from exc
        if isinstance(reply, Skipped):  # pragma: no cover - not a reply to writes
            raise Unavailable("unexpected reply")
        return self.checked(reply)
