"""The asyncio client: the shape of ``system.client``, with every call that does I/O awaited.

    import sessionlane

    async with sessionlane.connect_async("tcp://127.0.0.1:7420") as sl:  # or: await connect_async()
        lane = sl.lane("agent:main:heartbeat", priority="background")
        async with lane.lease(path, purpose="prompt", on_contention="skip") as lease:
            if lease is not None:
                await lease.append({"type": "message", "text": "hi"})

A reader task routes each reply to the future of its request id (``queued`` replies are
skipped) and applies events (``revoked``, ``abort_requested``, ``external_change``) to the
leases through the shared ``ClientCore``; it sends a keepalive whenever nothing was sent for
``keepalive`` seconds. If the connection breaks, every lease on it is revoked (reason
``connection_lost``): its next use raises ``LeaseRevoked`` and writes nothing. The next call
reconnects, with bounded retries. An acquire abandoned by its caller (cancelled, or no reply in
time) is released if its grant arrives later, so a cancelled task never pins a path.

Addresses, defaults, the refused-connection rule, the checks before sending (``InvalidRecord``,
``TooLarge``) and logging are those of the sync client (``system.client``).

One client belongs to one event loop; it is not thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

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
    RequestId,
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

__all__ = [
    "AppendResult",
    "AsyncLane",
    "AsyncLease",
    "AsyncSessionLane",
    "BadFrame",
    "Contended",
    "InvalidRecord",
    "LeaseRevoked",
    "LeaseTimeout",
    "NotHolder",
    "PathNotAllowed",
    "QueueFull",
    "SessionLaneError",
    "ShuttingDown",
    "StaleFence",
    "TooLarge",
    "TooManyFiles",
    "Unauthorized",
    "Unavailable",
    "connect_async",
]

log = library_logger("system.client")  # the public package's name: what users configure

_REPLY_MARGIN_S = 10.0
"""How much longer than its own timeout a request may take before the service is deemed gone."""
_READ_BYTES = 256 * 1024
_MAX_FRAME_BYTES = 64 * 1024 * 1024
_CLOSE_WAIT_S = 1.0
_RETRYABLE = (ConnectionRefusedError, FileNotFoundError, ConnectionResetError)
"""Connect failures worth retrying: nobody listening yet (a service restarting)."""


def connect_async(
    address: str | None = None,
    token: str | None = None,
    *,
    timeout: float = 30.0,
    keepalive: float = 5.0,
    reconnect_for: float = 0.0,
    max_record_bytes: int | None = MAX_RECORD_BYTES,
    max_frame_bytes: int | None = MAX_FRAME_BYTES,
) -> AsyncSessionLane:
    """A client for ``address``; ``await`` it or enter it with ``async with`` to connect.

    The arguments are ``system.client.connect``'s: no address means ``$SESSIONLANE_LISTEN``,
    else ``tcp://127.0.0.1:7420``; a refused connect raises ``Unavailable`` at once unless
    ``reconnect_for`` (seconds) asks to keep trying; ``timeout`` bounds the connect and every
    reply (beyond a request's own wait timeout).
    """
    return AsyncSessionLane(
        default_address() if address is None else address,
        token,
        timeout=timeout,
        keepalive=keepalive,
        reconnect_for=reconnect_for,
        max_record_bytes=max_record_bytes,
        max_frame_bytes=max_frame_bytes,
    )


@dataclass(eq=False)
class _Connection:
    """One open stream: its reader task and the futures of its requests in flight."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    generation: int
    last_sent: float
    pending: dict[RequestId, asyncio.Future[Reply]] = field(default_factory=dict)
    orphans: set[RequestId] = field(default_factory=set)
    """Requests whose caller stopped waiting; a late grant to one of them is released."""
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task[None] | None = None
    background: set[asyncio.Task[None]] = field(default_factory=set)
    lost: str | None = None
    """Why the connection ended, once it has."""


class AsyncSessionLane:
    """One connection to a sessionlane service, for asyncio. Usable as an async context manager."""

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
        self._conn: _Connection | None = None
        self._connecting = asyncio.Lock()
        self._closed = False
        self._generation = 0

    # Connection ----------------------------------------------------------------------------

    def __await__(self) -> Generator[Any, None, AsyncSessionLane]:
        return self._connected().__await__()

    async def _connected(self) -> AsyncSessionLane:
        await self.reconnect()
        return self

    async def __aenter__(self) -> AsyncSessionLane:
        return await self._connected()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._conn is not None

    async def reconnect(self) -> None:
        """(Re)open the connection if it is down, with bounded retries on refusal."""
        async with self._connecting:
            if self._closed:
                raise Unavailable("the connection was closed")
            if self._conn is not None:
                return
            retrying = AsyncRetrying(
                stop=stop_after_delay(self.reconnect_for),
                wait=wait_exponential(multiplier=0.05, max=1.0),
                retry=retry_if_exception_type(_RETRYABLE),
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        await self._open()
            except OSError as exc:
                raise Unavailable(f"cannot reach sessionlane at {self.address}: {exc}") from exc

    async def _open(self) -> None:
        kind, where = parse_address(self.address)
        if kind == "unix":
            opening = asyncio.open_unix_connection(where)
        else:
            opening = asyncio.open_connection(*where)
        reader, writer = await asyncio.wait_for(opening, self.timeout)
        self._generation += 1
        loop = asyncio.get_running_loop()
        conn = _Connection(reader, writer, self._generation, last_sent=loop.time())
        self._conn = conn
        conn.task = asyncio.create_task(
            self._read_loop(conn), name=f"sessionlane-client-{conn.generation}"
        )
        try:
            hello = Hello(client=client_name(), token=self.token)
            welcome = raise_if_error(await self._exchange(conn, hello, self.timeout))
        except BaseException:
            self._lost(conn, "hello failed")
            raise
        self.server = getattr(welcome, "server", None)

    async def close(self) -> None:
        """Close the connection: the service abandons this connection's leases."""
        self._closed = True
        conn = self._conn
        if conn is not None:
            self._lost(conn, "closed by the client", revoked="connection_closed")
        self.core.lost("connection_closed")
        if conn is None:
            return
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(conn.writer.wait_closed(), _CLOSE_WAIT_S)
        if conn.task is not None:
            conn.task.cancel()
            await asyncio.wait([conn.task], timeout=_CLOSE_WAIT_S)

    async def _read_loop(self, conn: _Connection) -> None:
        frames = FrameReader(_MAX_FRAME_BYTES)
        loop = asyncio.get_running_loop()
        reason = "connection closed by the service"
        try:
            while True:
                # The service hears from us only when we send: keep alive by what we sent,
                # not by what we received (a holder fed events may send nothing for long).
                due = conn.last_sent + self.keepalive - loop.time()
                if due <= 0:
                    # Not awaiting the drain: the reader must keep reading whatever happens.
                    # A frame is written whole, so this never splits another one.
                    conn.writer.write(frame(Keepalive(id=f"ka{conn.generation}")))
                    conn.last_sent = loop.time()
                    continue
                try:
                    async with asyncio.timeout(due):
                        data = await conn.reader.read(_READ_BYTES)
                except TimeoutError:
                    continue
                if not data:
                    break
                for body in frames.feed(data):
                    self._deliver(conn, decode_reply(body))
        except (OSError, SessionLaneError) as exc:
            reason = f"connection lost: {exc}"
        except Exception as exc:  # a bug must not leave requests waiting on a dead reader
            log.exception("sessionlane client reader failed")
            reason = f"reader failed: {exc!r}"
        except asyncio.CancelledError:
            self._lost(conn, "reader cancelled")
            raise
        self._lost(conn, reason)

    def _deliver(self, conn: _Connection, reply: Reply) -> None:
        if reply.id is None:
            self.core.on_event(reply)
            return
        future = conn.pending.get(reply.id)
        if future is None:
            self._orphan_reply(conn, reply)
        elif reply.type != "queued" and not future.done():
            future.set_result(reply)

    def _orphan_reply(self, conn: _Connection, reply: Reply) -> None:
        """A reply nobody waits for: release the lease if it grants one to a gone caller."""
        if reply.type == "queued" or reply.id not in conn.orphans:
            return
        conn.orphans.discard(reply.id)
        if isinstance(reply, Granted):
            log.info("releasing lease %s: its acquire was given up", reply.lease)
            release = Release(id=f"orphan{reply.id}", lease=reply.lease)
            task = asyncio.create_task(self._send_quietly(conn, release))
            conn.background.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(conn.background.discard)

    def _lost(self, conn: _Connection, reason: str, *, revoked: str = "connection_lost") -> None:
        """``conn`` is over: revoke its leases, fail its requests, close it. Idempotent."""
        if conn.lost is not None:
            return
        conn.lost = reason
        if self._conn is conn:
            self._conn = None
            self.core.lost(revoked)
        conn.writer.close()
        for future in conn.pending.values():
            if not future.done():
                future.set_exception(Unavailable(f"connection lost before the reply ({reason})"))
                future.exception()  # retrieved: its awaiter raises it; no "never retrieved"
        if not self._closed:
            log.warning("sessionlane %s: %s", self.address, reason)

    # Requests ------------------------------------------------------------------------------

    async def _send(self, conn: _Connection, message: Any) -> None:
        await self._send_frame(conn, frame(message))

    async def _send_frame(self, conn: _Connection, data: bytes) -> None:
        async with conn.send_lock:
            if conn.lost is not None:
                raise Unavailable(f"not connected ({conn.lost})")
            conn.last_sent = asyncio.get_running_loop().time()
            try:
                conn.writer.write(data)
                await conn.writer.drain()
            except (OSError, RuntimeError) as exc:
                # The stream is unusable: report it lost now, so its leases are revoked
                # before this error surfaces.
                self._lost(conn, f"send failed: {exc}")
                raise Unavailable(f"send failed: {exc}") from exc

    async def _send_quietly(self, conn: _Connection, message: Any) -> None:
        with contextlib.suppress(Unavailable):
            await self._send(conn, message)

    async def _exchange(self, conn: _Connection, message: Any, timeout: float) -> Reply:
        """Send ``message`` on ``conn`` with a fresh id; await its final reply."""
        rid = self.core.next_id()
        data = check_frame(frame(message.model_copy(update={"id": rid})), self.max_frame_bytes)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        conn.pending[rid] = future
        try:
            await self._send_frame(conn, data)
            limit = timeout + _REPLY_MARGIN_S
            try:
                return await asyncio.wait_for(future, limit)
            except TimeoutError:
                raise Unavailable(f"no reply to {message.type} within {limit:.0f} s") from None
        finally:
            del conn.pending[rid]
            if not future.done() or future.cancelled():
                conn.orphans.add(rid)

    async def _request(
        self, message: Any, *, timeout: float | None = None, connect: bool = True
    ) -> Reply:
        """Send ``message`` and await its final reply.

        ``connect``: reconnect first if the connection is down (not for a lease's requests:
        the lease died with the connection that granted it).
        """
        if self._closed:
            raise Unavailable("the connection was closed")
        conn = self._conn
        if conn is None and not connect:
            raise Unavailable("not connected")
        if conn is None:
            await self.reconnect()
            conn = self._conn
            if conn is None:
                raise Unavailable("not connected")
        return await self._exchange(conn, message, self.timeout if timeout is None else timeout)

    # Public API ----------------------------------------------------------------------------

    def lane(self, name: str, priority: Priority = "interactive") -> AsyncLane:
        """A lane of this connection (created on the service at its first request)."""
        return AsyncLane(self, name, priority)

    async def recover(
        self, path: str, reason: str = "stuck", grace: float = 5.0, *, lane: str = "recovery"
    ) -> AsyncLease:
        """Take a recovery lease on ``path``: the holder is asked to abort, then revoked."""
        path = anchor(path)
        request = Recover(lane=lane, path=path, reason=reason, grace_ms=int(grace * 1000))
        reply = raise_if_error(await self._request(request, timeout=grace + self.timeout), path)
        assert isinstance(reply, Granted), reply
        return self._lease(reply, lane)

    async def status(self, path: str | None = None) -> StatusReply:
        """Holders, queues, fences and counters (of ``path`` only, if given)."""
        request = Status(path=anchor(path) if path else None)
        reply = raise_if_error(await self._request(request), path)
        assert isinstance(reply, StatusReply), reply
        return reply

    def _records(self, records: Sequence[Any], *, allow_empty: bool = False) -> list[Any]:
        """``records`` checked before sending (``InvalidRecord``; see ``check_records``)."""
        return check_records(
            records, max_record_bytes=self.max_record_bytes, allow_empty=allow_empty
        )

    def _lease(self, granted: Granted, lane: str) -> AsyncLease:
        state = LeaseState(granted.lease, granted.path, granted.fence, granted.purpose)
        return AsyncLease(self, self.core.track(state), lane)


class AsyncLane:
    """A named lane on one connection. The same name on two connections is two lanes."""

    def __init__(self, sl: AsyncSessionLane, name: str, priority: Priority):
        self.sl = sl
        self.name = name
        self.priority = priority

    @contextlib.asynccontextmanager
    async def lease(
        self,
        path: str,
        purpose: Purpose = "prompt",
        wait_timeout: float | None = 60.0,
        max_hold: float | None = None,
        on_contention: OnContention = "wait",
    ) -> AsyncIterator[AsyncLease | None]:
        """Hold ``path`` for the ``async with`` block; yields None when skipped."""
        lease = await self.acquire(
            path, purpose, wait_timeout=wait_timeout, max_hold=max_hold, on_contention=on_contention
        )
        try:
            yield lease
        finally:
            if lease is not None:
                await lease.release(quiet=True)

    async def acquire(
        self,
        path: str,
        purpose: Purpose = "prompt",
        *,
        wait_timeout: float | None = 60.0,
        max_hold: float | None = None,
        on_contention: OnContention = "wait",
    ) -> AsyncLease | None:
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
        reply = await self.sl._request(request, timeout=acquire_wait(wait_timeout))
        reply = raise_if_error(reply, path)
        if isinstance(reply, Skipped):
            return None
        assert isinstance(reply, Granted), reply
        return self.sl._lease(reply, self.name)

    async def append(
        self, path: str, *records: dict[str, Any], durability: Durability | None = None
    ) -> AppendResult:
        """A short write without a lease: queued like a ``write`` lease, never interleaved."""
        path = anchor(path)
        checked = self.sl._records(records)
        request = Append(lane=self.name, path=path, records=checked, durability=durability)
        return append_result(raise_if_error(await self.sl._request(request), path))

    async def abandon(self, path: str | None = None, reason: str | None = None) -> list[str]:
        """Drop this lane's leases and queued requests (on ``path`` only, if given)."""
        request = Abandon(lane=self.name, path=anchor(path) if path else None, reason=reason)
        reply = raise_if_error(await self.sl._request(request), path)
        assert isinstance(reply, Abandoned), reply
        self.sl.core.abandoned(reply.leases)
        return reply.leases


class AsyncLease(LeaseView):
    """A granted lease. Writes carry its fence; a revoked lease refuses to write.

    ``id``, ``fence``, ``path``, ``purpose``, ``abort_requested``, ``revoked`` and
    ``external_changes`` come from ``LeaseView``; events update them as they arrive.
    """

    def __init__(self, sl: AsyncSessionLane, state: LeaseState, lane: str):
        super().__init__(state, lane)
        self.sl = sl

    async def append(
        self, *records: dict[str, Any], durability: Durability | None = None
    ) -> AppendResult:
        """Append records durably under this lease; all or nothing."""
        self.check_usable()
        checked = self.sl._records(records)
        request = Append(lease=self.id, fence=self.fence, records=checked, durability=durability)
        return append_result(await self._call(request))

    async def rewrite(self, records: Sequence[dict[str, Any]]) -> int:
        """Replace the whole file atomically (compaction leases); returns the line count."""
        self.check_usable()
        checked = self.sl._records(records, allow_empty=True)
        reply = await self._call(Rewrite(lease=self.id, fence=self.fence, records=checked))
        assert isinstance(reply, Rewritten), reply
        return reply.lines

    async def release(self, *, quiet: bool = False) -> None:
        """Release one level of the lease. ``quiet``: a lease already gone is not an error."""
        if self.level_released:
            return
        try:
            if quiet and self.state.revoked is not None:
                return
            self.check_usable()
            await self._call(Release(lease=self.id))
        except (NotHolder, LeaseRevoked, Unavailable):
            if not quiet:
                raise
        finally:
            self.level_released = True
            self.sl.core.untrack(self.state)

    async def _call(self, message: Any) -> Reply:
        try:
            reply = await self.sl._request(message, connect=False)
        except Unavailable as exc:
            error = self.unreachable(exc)
            if error is exc:
                raise
            raise error from exc
        return self.checked(reply)
