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
logger (``sessionlane.system.client``) only, never to the host's stderr.

This module is the socket and thread half only: what to send and what a reply means are the
shared ``ClientCore`` (``_core``) and the operations (``_ops``), driven here with blocking
calls. Every use of the core holds ``SessionLane._lock``. (About 730 lines: the opening and
routing of direct channels, ``docs/direct-channel.md``, stay beside the connection code whose
lock and reader thread they share.)
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from tenacity import Retrying

from sessionlane.messages.codec import decode_reply
from sessionlane.messages.errors import SessionLaneError, Unauthorized, Unavailable
from sessionlane.messages.wire import (
    Direct,
    DirectOffer,
    Durability,
    OnContention,
    Priority,
    Purpose,
    Reply,
    StatusReply,
)
from sessionlane.system.client import _ops as ops
from sessionlane.system.client import _pipeline as pipelines
from sessionlane.system.client._checks import check_lane
from sessionlane.system.client._core import (
    Answer,
    AppendResult,
    ClientCore,
    ConnectionLost,
    LeaseState,
    Link,
    NotSent,
    Send,
    Settings,
    log,
    parse_address,
)
from sessionlane.system.client._direct import DirectUnknown, open_sync
from sessionlane.system.client._handover import Reading
from sessionlane.system.client._records import MAX_FRAME_BYTES, MAX_RECORD_BYTES
from sessionlane.system.client._verify import (
    OWNER_LOOKUP_DELAYS,
    owner_pending,
    peer_gone,
    refuse_self_connection,
    service_refusal,
)
from sessionlane.system.gateway import peercred

if TYPE_CHECKING:
    from sessionlane.system.client._async import AsyncSessionLane

__all__ = ["Lane", "Lease", "SessionLane", "connect", "connect_async"]

R = TypeVar("R")
_SEND_BYTES = 256 * 1024
"""A pipeline's frames go out in writes of about this size, the lock released between them."""


def connect(
    address: str | None = None,
    token: str | None = None,
    *,
    timeout: float = 30.0,
    keepalive: float = 5.0,
    reconnect_for: float = 0.0,
    max_record_bytes: int | None = MAX_RECORD_BYTES,
    max_frame_bytes: int | None = MAX_FRAME_BYTES,
    service_user: int | str | None = None,
    direct: bool = True,
) -> SessionLane:
    """Open a connection to ``address`` (default: ``$SESSIONLANE_LISTEN``, else
    ``tcp://127.0.0.1:7420``).

    ``token``: the service's token (surrounding whitespace, e.g. a file's trailing newline,
    is ignored). ``timeout`` bounds the connect and every reply (beyond a request's own wait).
    ``reconnect_for``: how long a connect (this one, and each reconnect after a lost
    connection) keeps retrying while refused; 0, the default, raises ``Unavailable`` at once.
    An acquire waits for a reconnect no longer than its own ``wait_timeout`` (``LeaseTimeout``);
    a lease the service cannot give back is lost after one such window.
    ``max_record_bytes`` / ``max_frame_bytes``: the limits checked before sending (the
    service's defaults; set them to the service's values if it raised its own, or None to
    leave the check to the service). ``service_user``: who must run the service (a uid, a
    user name, or ``"*"`` for anyone); by default, without a token, this process's user, and
    with a token nobody in particular (the service proves the token instead): see
    ``docs/security-clients.md``. A service that fails the check raises ``Unauthorized``
    before anything is sent. A malformed address or an unknown user raises ``ValueError``.
    ``direct``: take the direct channels a local service offers (``docs/direct-channel.md``):
    a lease's acquire, appends and release then go to the file's process, not through the
    gateway; False keeps every request on the one connection.
    """
    sl = SessionLane(
        Settings.of(
            address,
            token,
            timeout=timeout,
            keepalive=keepalive,
            reconnect_for=reconnect_for,
            max_record_bytes=max_record_bytes,
            max_frame_bytes=max_frame_bytes,
            service_user=service_user,
            direct=direct,
        )
    )
    sl.reconnect()
    return sl


def connect_async(
    address: str | None = None, token: str | None = None, **kwargs: Any
) -> AsyncSessionLane:
    """The asyncio client: ``async with connect_async(addr) as sl`` or ``await connect_async``."""
    from sessionlane.system.client._async import connect_async as _connect_async

    return _connect_async(address, token, **kwargs)


class _Waiter:
    """A caller blocked on one request: woken once, with its reply or its error.

    One per request, so it is a bare lock, held from the start, rather than a
    ``threading.Event`` (a ``Condition`` around a lock: 2.4 against 0.2 us to make, wake and
    wait on, ``tests/record_cost.py``; docs/hot-path.md, "Effect records and replies, the
    tenth session"). ``wake`` is called under the client's lock (a second call does nothing);
    only the caller waits and reads ``done``, which is set after the reply or error and
    before the gate opens."""

    __slots__ = ("done", "error", "gate", "reply")

    def __init__(self) -> None:
        self.gate = threading.Lock()
        self.gate.acquire()
        self.done = False
        self.reply: Reply | None = None
        self.error: SessionLaneError | None = None

    def wake(self) -> None:
        """The reply or error is in: let the caller go (again: nothing more happens)."""
        if not self.done:
            self.done = True
            self.gate.release()

    def is_set(self) -> bool:
        """Woken (``Reading.read_until`` reads until then)."""
        return self.done

    def wait(self, timeout: float) -> bool:
        """Block until woken or ``timeout`` seconds passed; whether it was woken."""
        if not self.done and self.gate.acquire(timeout=max(0.0, timeout)):
            self.gate.release()  # woken: the gate stays open for a later look
        return self.done


_Link = Link[_Waiter, socket.socket]


def _dial(settings: Settings) -> socket.socket:
    """A connected socket to ``settings.address`` (``OSError`` if refused or too slow)."""
    kind, where = parse_address(settings.address)
    if kind == "unix":
        family = socket.AF_UNIX
    else:
        family = socket.AF_INET6 if ":" in where[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(settings.timeout)
    try:
        sock.connect(where)
    except OSError:
        sock.close()
        raise
    if kind == "tcp":
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class SessionLane:
    """One connection to a sessionlane service. Thread-safe; usable as a context manager."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.core: ClientCore[_Waiter, socket.socket] = ClientCore(settings)
        self._lock = threading.Lock()  # the core, and whole frames on the socket
        self._connecting = threading.Lock()  # one reconnect at a time
        self._opening = threading.Lock()  # one direct channel opened at a time
        self._readings: dict[_Link, Reading] = {}  # who reads each open link (_handover)

    def __repr__(self) -> str:
        state = "closed" if self.core.closed else "connected" if self.connected else "idle"
        return f"<sessionlane.SessionLane {self.settings.address} {state}>"

    @property
    def server(self) -> str | None:
        """The service's name and version, from its welcome."""
        return self.core.server

    @property
    def connected(self) -> bool:
        """A connection is open (the next call would not need to reconnect)."""
        return self.core.link is not None

    # Connection ----------------------------------------------------------------------------

    def reconnect(self, deadline: float | None = None, seen: int | None = None) -> None:
        """(Re)open the connection if it is down, with bounded retries on refusal.

        ``deadline`` (``core.clock`` time): the caller's budget, which bounds the wait for
        another thread's reconnect and the retries (``OutOfBudget``). ``seen``: the failed
        reconnects the caller knew of (``ClientCore.connect_plan``; None: now)."""
        if seen is None:
            with self._lock:
                seen = self.core.connect_failures
        wait = -1.0 if deadline is None else max(0.0, deadline - self.core.clock())
        if not self._connecting.acquire(timeout=wait):
            raise self.core.out_of_budget()
        try:
            if self.core.closed:
                raise Unavailable("the connection was closed")
            if self.core.link is not None:  # another thread reconnected meanwhile
                return
            with self._lock:
                window, whole = self.core.connect_plan(deadline, seen)
            try:
                for attempt in Retrying(**self.settings.retry_policy(window)):
                    with attempt:
                        try:
                            self._open()
                        except DirectUnknown:  # an older service: once more, not asking
                            self._open()
            except OSError as exc:
                if not whole:
                    raise self.core.out_of_budget() from exc
                error = self.settings.unreachable(exc)
                with self._lock:
                    self.core.reconnect_failed(error)
                raise error from exc
        finally:
            self._connecting.release()

    def _open(self) -> None:
        sock = _dial(self.settings)
        try:
            refuse_self_connection(sock)
            owner = peercred.peer_uid(sock)
            for delay in OWNER_LOOKUP_DELAYS:
                if not owner_pending(sock, owner):
                    break
                time.sleep(delay)
                owner = peercred.peer_uid(sock)
            if owner is None and peer_gone(sock):  # retried: nothing was sent
                raise ConnectionResetError(
                    "the service closed the connection before it was identified"
                )
            refusal = service_refusal(self.settings, owner)
            if refusal is not None:
                raise Unauthorized(refusal)
            with self._lock:
                self.core.service_uid = owner
                link, hello = self.core.opened(sock, time.monotonic())
                reading = Reading(sock, partial(self._deliver_body, link), caller_reads=False)
                self._readings[link] = reading
        except BaseException:
            sock.close()
            raise
        threading.Thread(
            target=self._read_loop, args=(link, reading), name="sessionlane-client", daemon=True
        ).start()
        try:
            reply = self._exchange(link, ops.Call(hello))
            with self._lock:
                proof = self.core.challenged(link, reply)
            if proof is not None:
                reply = self._exchange(link, ops.Call(proof))
            with self._lock:
                self.core.welcomed(link, reply)
        except BaseException as exc:
            lost = link.lost is not None
            self._drop(link, "hello failed")
            if lost and isinstance(exc, Unavailable) and not isinstance(exc, DirectUnknown):
                # Dropped before the welcome: a service still starting, worth a retry.
                raise ConnectionResetError(exc.detail) from exc
            raise

    def close(self) -> None:
        """Close the connection: the service abandons this connection's leases."""
        with self._lock:
            link = self.core.link
            waiters = self.core.close()
            directs = self.core.direct_links()
        for direct in directs:
            self._drop(direct, "closed by the client")
        if link is not None:
            self._fail(waiters, link)
            with contextlib.suppress(OSError):
                link.transport.shutdown(socket.SHUT_RDWR)
            link.transport.close()

    def __enter__(self) -> SessionLane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_loop(self, link: _Link, reading: Reading) -> None:
        """The reader thread of ``link``: replies and events in, keepalives out, until lost.
        On a direct channel a caller may read its own reply meanwhile (``_handover``)."""
        sock = link.transport
        reason = "connection closed by the service"
        # Wait for input with epoll, not a socket timeout: the timeout would also cut sends
        # short (a large append would fail mid-frame after ``keepalive`` seconds).
        try:
            while link.lost is None:
                with self._lock:
                    wait, keepalive = self.core.keepalive(link, time.monotonic())
                    if keepalive is not None:
                        with contextlib.suppress(OSError):
                            sock.sendall(keepalive)
                if not reading.wait(wait):
                    continue
                with reading.lock:
                    if not reading.read_some():
                        break
        except (OSError, ValueError, SessionLaneError) as exc:  # ValueError: a closed socket
            reason = f"connection lost: {exc}"
        except Exception as exc:  # a bug must not leave requests waiting on a dead reader
            log.exception("sessionlane client reader failed")
            reason = f"reader failed: {exc!r}"
        self._drop(link, reason, ask=True)  # the service's side ended it (or the reader failed)
        with self._lock:
            self._readings.pop(link, None)
        with reading.lock:  # a caller reading gives the socket back before it is closed
            reading.close()
            sock.close()
        self._revive_soon()

    def _revive_soon(self) -> None:
        """Leases suspended by a lost connection: reclaim them now, in the background, so a
        holder busy elsewhere (waiting on its model) does not miss the service's grace."""
        with self._lock:
            if self.core.closed or not self.core.suspended():
                return
        threading.Thread(target=self._revive_all, name="sessionlane-reclaim", daemon=True).start()

    def _revive_all(self) -> None:
        try:
            self._run(ops.revive_all(self.core))
        except SessionLaneError as exc:
            log.warning("sessionlane %s: reclaim failed: %s", self.settings.address, exc)

    def _deliver_body(self, link: _Link, body: bytes) -> None:
        self._deliver(link, decode_reply(body))

    def _deliver(self, link: _Link, reply: Reply) -> None:
        with self._lock:
            action = self.core.received(link, reply)
            if isinstance(action, Answer):
                action.waiter.reply = action.reply
                action.waiter.wake()
            elif isinstance(action, Send):
                with contextlib.suppress(OSError):
                    link.transport.sendall(action.data)

    def _drop(self, link: _Link, reason: str, *, ask: bool = False) -> None:
        """Shut ``link`` down for good and report it lost.

        Shut down, not closed: that wakes the reader thread, which closes the socket when it
        leaves (closing it here could leave the reader waiting on a vanished descriptor).
        """
        with contextlib.suppress(OSError):
            link.transport.shutdown(socket.SHUT_RDWR)
        with self._lock:
            gateway = link is self.core.link
            self._fail(self.core.lost(link, reason, ask=ask), link)
            directs = self.core.direct_links() if gateway else []
            probe = self.core.probe()  # a direct channel closed under held leases: ask why
            unsent = None
            if probe is not None and self.core.link is not None:
                try:
                    self.core.link.transport.sendall(probe)
                except OSError as exc:  # the gateway's connection is gone too: that says why
                    unsent = (self.core.link, f"send failed: {exc}")
        for direct in directs:  # they go with the gateway's connection
            self._drop(direct, f"the gateway connection ended ({reason})")
        if unsent is not None:
            self._drop(*unsent)

    def _fail(self, waiters: list[_Waiter], link: _Link) -> None:
        """Wake the callers of requests that ``link``, now lost, will never answer."""
        for waiter in waiters:
            waiter.error = self.core.lost_error(link)
            waiter.wake()

    # Requests ------------------------------------------------------------------------------

    def _run(self, op: Generator[ops.Call | ops.Batch, Any, R]) -> R:
        """Drive ``op`` to its result, making each of its calls in turn."""
        outcome: Any = None
        try:
            while True:
                with self._lock:
                    step = ops.advance(op, outcome)
                    seen = self.core.connect_failures  # as the op saw the state it checked
                if isinstance(step, ops.Finished):
                    result: R = step.value
                    return result
                if isinstance(step, ops.Batch):
                    outcome = self._pipeline(step)
                    continue
                try:
                    outcome = self._call(step, seen)
                except SessionLaneError as exc:
                    outcome = exc
        finally:
            with self._lock:
                op.close()

    def _call(self, call: ops.Call, seen: int) -> Reply:
        if call.after:
            time.sleep(call.after)  # a retry while the service stops: not in a handler
        with self._lock:
            link = self.core.link_for(call.reconnect)
        if link is None:
            self.reconnect(call.deadline, seen)
            with self._lock:
                link = self.core.link_for(reconnect=False)
        assert link is not None
        direct = self._direct_for(link, call.request)
        if direct is None:
            return self._exchange(link, call)
        try:
            return self._exchange(direct, call)
        except NotSent:
            with self._lock:
                again = self.core.resend_unsent(direct, call.request)
            if not again:
                raise
        except ConnectionLost:
            with self._lock:
                again = self.core.resend_on_loss(direct, call.request)
            if not again:
                raise
        # The file closed an idle channel as the request went: nothing came of it there.
        return self._exchange(self._direct_for(link, call.request) or link, call)

    def _direct_for(self, link: _Link, request: Any) -> _Link | None:
        """The direct channel ``request`` goes on, opened now if it may have one; None: the
        gateway's connection (also when one could not be opened: logged at debug)."""
        with self._lock:
            found = self.core.direct.route(request)
            key = self.core.direct.key(request, self.core.clock())
        if found is not None or key is None:
            return found
        with self._opening:
            with self._lock:
                found = self.core.direct.route(request)
                key = self.core.direct.key(request, self.core.clock())
            if found is not None or key is None:
                return found
            try:
                return self._open_direct(link, key)
            except (OSError, ValueError, SessionLaneError) as exc:
                with self._lock:
                    self.core.direct_refusal(key, str(exc))
                return None

    def _open_direct(self, link: _Link, key: tuple[str, str]) -> _Link:
        """Ask the gateway for a ticket, connect to the file, show it (docs/direct-channel.md)."""
        path, lane = key
        offer = self._exchange(link, ops.Call(Direct(lane=lane, path=path)))
        if not isinstance(offer, DirectOffer):
            raise Unavailable(f"direct channel not offered: {offer}")
        with self._lock:
            expected = self.core.service_uid
        sock = open_sync(offer, expected, self.settings.timeout)
        with self._lock:
            direct = self.core.direct_opened(key, sock, time.monotonic())
            reading = Reading(sock, partial(self._deliver_body, direct), caller_reads=True)
            self._readings[direct] = reading
        threading.Thread(
            target=self._read_loop, args=(direct, reading), name="sessionlane-direct", daemon=True
        ).start()
        return direct

    def _exchange(self, link: _Link, call: ops.Call) -> Reply:
        """Send ``call``'s request on ``link``; wait for its final reply. On a direct channel
        whose read role is free, read that reply here instead of being woken by the reader
        thread (``_handover``): one thread wake-up and GIL hand-over less per request."""
        waiter = _Waiter()
        with self._lock:
            reading = self._readings.get(link)
        reads = reading is not None and reading.try_take()
        try:
            with self._lock:
                rid, data = self.core.request(link, call.request, waiter, time.monotonic())
                link.transport.sendall(data)
        except BaseException as exc:
            if reads:
                assert reading is not None
                reading.give_back()
            if not isinstance(exc, OSError):
                raise
            # The connection is unusable (and a partly sent frame would corrupt it): report
            # it lost now, so its leases are revoked before this error surfaces.
            self._drop(link, f"send failed: {exc}")
            raise NotSent(f"send failed: {exc}") from exc
        limit = self.settings.reply_limit(call.timeout)
        deadline = time.monotonic() + limit
        if reads:
            assert reading is not None
            try:
                reading.read_until(waiter, deadline)
            finally:
                reading.give_back()
        waiter.wait(deadline - time.monotonic())
        with self._lock:
            if not waiter.done:
                self.core.given_up(link, rid, call.request)
        if waiter.error is not None:
            raise waiter.error
        if waiter.reply is None:
            raise self.core.no_reply(call.request, limit)
        return waiter.reply

    def _pipeline(self, batch: ops.Batch) -> list[Reply | SessionLaneError]:
        """Send ``batch``'s requests, a window at a time; their outcomes in order."""
        pipe = pipelines.Pipe(batch)
        try:
            with self._lock:
                link = self.core.link_for(reconnect=False)
                if batch.requests:
                    link = self.core.direct.route(batch.requests[0]) or link
        except Unavailable as exc:
            return [exc]
        assert link is not None
        sent: deque[tuple[Any, _Waiter, Any]] = deque()
        limit = self.settings.reply_limit(None)
        while True:
            self._send_window(link, pipe, sent)
            if not sent:
                return pipe.result()
            waiter = sent[0][1]
            waiter.wait(limit)
            with self._lock:
                if not waiter.done:
                    for rid_, _, request_ in sent:
                        self.core.given_up(link, rid_, request_)
                        pipe.answered(self.core.no_reply(request_, limit))
                    return pipe.result()
            # the oldest, and every answer already in after it (they come in groups)
            while sent and sent[0][1].done:
                _, waiter, request = sent.popleft()
                pipe.answered(waiter.error or waiter.reply or self.core.no_reply(request, limit))

    def _send_window(
        self, link: _Link, pipe: pipelines.Pipe, sent: deque[tuple[Any, _Waiter, Any]]
    ) -> None:
        """Send what fills ``pipe``'s window, a few writes of whole frames (other threads'
        frames may go between them, never inside one); record each in ``sent``."""
        chunk = pipe.to_send()
        if not chunk:
            return
        frames: list[bytes] = []
        now = time.monotonic()
        with self._lock:
            for index, request in enumerate(chunk):
                waiter = _Waiter()
                try:
                    rid, data = self.core.request(
                        link, request, waiter, now, pipelines.append_frame
                    )
                except SessionLaneError as exc:  # too large, or the link is gone
                    pipe.not_sent(len(chunk) - index, exc)
                    break
                sent.append((rid, waiter, request))
                frames.append(data)
        try:
            for group in pipelines.grouped(frames, _SEND_BYTES):
                with self._lock:
                    link.transport.sendall(group)
        except OSError as exc:
            self._drop(link, f"send failed: {exc}")  # fails every request in ``sent``

    # Public API ----------------------------------------------------------------------------

    def lane(self, name: str, priority: Priority = "interactive") -> Lane:
        """A lane of this connection (created on the service at its first request)."""
        return Lane(self, name, priority)

    def recover(
        self, path: str, reason: str = "stuck", grace: float = 5.0, *, lane: str = "recovery"
    ) -> Lease:
        """Take a recovery lease on ``path``: the holder is asked to abort, then revoked."""
        return Lease(self, self._run(ops.recover(self.core, path, reason, grace, lane)), lane)

    def status(self, path: str | None = None) -> StatusReply:
        """Holders, queues, fences and counters (of ``path`` only, if given)."""
        return self._run(ops.status(path))


class Lane:
    """A named lane on one connection. The same name on two connections is two lanes."""

    def __init__(self, sl: SessionLane, name: str, priority: Priority):
        check_lane(name, priority)  # at ``lane()``, not at the first request
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
        state = self.sl._run(
            ops.acquire(
                self.sl.core,
                self.name,
                self.priority,
                path,
                purpose,
                wait_timeout=wait_timeout,
                max_hold=max_hold,
                on_contention=on_contention,
            )
        )
        return None if state is None else Lease(self.sl, state, self.name)

    def append(
        self, path: str, *records: dict[str, Any], durability: Durability | None = None
    ) -> AppendResult:
        """A short write without a lease: queued like a ``write`` lease, never interleaved."""
        return self.sl._run(ops.lane_append(self.sl.core, self.name, path, records, durability))

    def abandon(self, path: str | None = None, reason: str | None = None) -> list[str]:
        """Drop this lane's leases and queued requests (on ``path`` only, if given)."""
        return self.sl._run(ops.abandon(self.sl.core, self.name, path, reason))


class Lease(ops.LeaseView):
    """A granted lease. Writes carry its fence; a revoked lease refuses to write.

    ``id``, ``fence``, ``path``, ``purpose``, ``abort_requested``, ``revoked`` and
    ``external_changes`` come from ``LeaseView``; events update them as they arrive.
    """

    def __init__(self, sl: SessionLane, state: LeaseState, lane: str):
        super().__init__(state, lane)
        self.sl = sl

    def append(
        self,
        *records: dict[str, Any],
        durability: Durability | None = None,
        release: bool = False,
    ) -> AppendResult:
        """Append records durably under this lease; all or nothing.

        ``release``: append and release. Once the records are durable the service releases
        this level of the lease in the same step and hands the file to the next waiter; the
        lease then counts as released (the ``with`` block's exit and a later ``release()`` do
        nothing). If the append fails (refused, or its write or sync failed), nothing was
        released: the lease is still held, and released as usual."""
        op = ops.lease_append(self.sl.core, self, records, durability, release)
        return self.sl._run(op)

    def append_pipelined(
        self,
        records: Sequence[dict[str, Any]],
        *,
        window: int = 64,
        durability: Durability | None = None,
        release: bool = False,
    ) -> list[AppendResult]:
        """Append the records, up to ``window`` of them in flight at once, in groups (one
        append of up to a quarter of the window each, written all or nothing).

        Written in order and acknowledged in order: the results, one per record. If one fails,
        none after it is written (the service refuses them): ``PipelineBroken`` says which
        records were (``written``, ``failed``, ``unknown``, ``cause``). The records are checked
        before anything is sent (``InvalidRecord``). ``release``: the last append also releases
        this level of the lease once durable (as ``append(..., release=True)``); a pipeline that
        stops before its last append leaves the lease held."""
        op = pipelines.lease_append_pipelined(
            self.sl.core, self, records, window, durability, release
        )
        return self.sl._run(op)

    def rewrite(self, records: Sequence[dict[str, Any]]) -> int:
        """Replace the whole file atomically (compaction leases); returns the line count."""
        return self.sl._run(ops.rewrite(self.sl.core, self, records))

    def release(self, *, quiet: bool = False) -> None:
        """Release one level of the lease. ``quiet``: a lease already gone is not an error."""
        self.sl._run(ops.release(self.sl.core, self, quiet))
