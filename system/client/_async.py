"""The asyncio client: the shape of ``sessionlane.system.client``, with every call that does I/O
awaited.

    import sessionlane

    async with sessionlane.connect_async("tcp://127.0.0.1:7420") as sl:  # or: await connect_async()
        lane = sl.lane("agent:main:heartbeat", priority="background")
        async with lane.lease(path, purpose="prompt", on_contention="skip") as lease:
            if lease is not None:
                await lease.append({"type": "message", "text": "hi"})

A reader task routes each reply to the future of its request and applies events to the leases;
it sends a keepalive whenever nothing was sent for ``keepalive`` seconds. If the connection
breaks, every lease on it is revoked (``connection_lost``): its next use raises ``LeaseRevoked``
and writes nothing. The next call reconnects, with bounded retries. An acquire abandoned by its
caller (cancelled, or no reply in time) is released if its grant arrives later, so a cancelled
task never pins a path.

Addresses, defaults, the refused-connection rule, the checks before sending (``InvalidRecord``,
``TooLarge``) and logging are those of the sync client (``sessionlane.system.client``): both are
the shared ``ClientCore`` (``_core``) and operations (``_ops``); this module is the stream and task
half, driving them with awaited calls.

One client belongs to one event loop; it is not thread-safe. (About 640 lines: the asyncio
twin of ``_sync``, the stream and task half of every call, pipelines and direct channels.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tenacity import AsyncRetrying

from sessionlane.messages.codec import FrameReader, decode_reply
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
    INCOMING_FRAME_BYTES,
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
from sessionlane.system.client._direct import DirectUnknown, open_async
from sessionlane.system.client._records import MAX_FRAME_BYTES, MAX_RECORD_BYTES
from sessionlane.system.client._verify import (
    OWNER_LOOKUP_DELAYS,
    owner_pending,
    peer_gone,
    refuse_self_connection,
    service_refusal,
)
from sessionlane.system.gateway import peercred

__all__ = ["AsyncLane", "AsyncLease", "AsyncSessionLane", "connect_async"]

R = TypeVar("R")
_READ_BYTES = 256 * 1024
_SEND_BYTES = 256 * 1024
"""A pipeline's frames go out in writes of about this size."""
_CLOSE_WAIT_S = 1.0


def connect_async(
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
) -> AsyncSessionLane:
    """A client for ``address``; ``await`` it or enter it with ``async with`` to connect.

    The arguments are ``sessionlane.system.client.connect``'s: no address means
    ``$SESSIONLANE_LISTEN``, else ``tcp://127.0.0.1:7420``; a refused connect raises
    ``Unavailable`` at once unless ``reconnect_for`` (seconds) asks to keep trying; ``timeout``
    bounds the connect and every reply (beyond a request's own wait timeout). A malformed address
    raises ``ValueError``. ``service_user``: who must run the service, as for ``connect``.
    """
    return AsyncSessionLane(
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


@dataclass(eq=False)
class _Stream:
    """One open stream and the tasks that serve it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while a frame is written and drained."""
    task: asyncio.Task[None] | None = None
    """The reader task."""
    background: set[asyncio.Task[None]] = field(default_factory=set)
    """Sends nobody awaits (the loop keeps only weak references to tasks)."""


_Link = Link["asyncio.Future[Reply]", _Stream]


class AsyncSessionLane:
    """One connection to a sessionlane service, for asyncio. Usable as an async context manager."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.core: ClientCore[asyncio.Future[Reply], _Stream] = ClientCore(settings)
        self._connecting = asyncio.Lock()
        self._opening = asyncio.Lock()  # one direct channel opened at a time
        self._revivals: set[asyncio.Task[None]] = set()  # reclaims running in the background

    def __repr__(self) -> str:
        state = "closed" if self.core.closed else "connected" if self.connected else "idle"
        return f"<sessionlane.AsyncSessionLane {self.settings.address} {state}>"

    @property
    def server(self) -> str | None:
        """The service's name and version, from its welcome."""
        return self.core.server

    @property
    def connected(self) -> bool:
        """A connection is open (the next call would not need to reconnect)."""
        return self.core.link is not None

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

    async def reconnect(self, deadline: float | None = None, seen: int | None = None) -> None:
        """(Re)open the connection if it is down, with bounded retries on refusal.

        ``deadline`` (``core.clock`` time): the caller's budget, which bounds the wait for
        another task's reconnect and the retries (``OutOfBudget``). ``seen``: the failed
        reconnects the caller knew of (``ClientCore.connect_plan``; None: now)."""
        if seen is None:
            seen = self.core.connect_failures
        wait = None if deadline is None else max(0.0, deadline - self.core.clock())
        try:
            await asyncio.wait_for(self._connecting.acquire(), wait)
        except TimeoutError:
            raise self.core.out_of_budget() from None
        try:
            if self.core.closed:
                raise Unavailable("the connection was closed")
            if self.core.link is not None:
                return
            window, whole = self.core.connect_plan(deadline, seen)
            try:
                async for attempt in AsyncRetrying(**self.settings.retry_policy(window)):
                    with attempt:
                        try:
                            await self._open()
                        except DirectUnknown:  # an older service: once more, not asking
                            await self._open()
            except OSError as exc:
                if not whole:
                    raise self.core.out_of_budget() from exc
                error = self.settings.unreachable(exc)
                self.core.reconnect_failed(error)
                raise error from exc
        finally:
            self._connecting.release()

    async def _open(self) -> None:
        kind, where = parse_address(self.settings.address)
        if kind == "unix":
            opening = asyncio.open_unix_connection(where)
        else:
            opening = asyncio.open_connection(*where)
        reader, writer = await asyncio.wait_for(opening, self.settings.timeout)
        try:
            sock = writer.get_extra_info("socket")
            refuse_self_connection(sock)
            owner = peercred.peer_uid(sock)
            for delay in OWNER_LOOKUP_DELAYS:
                if not owner_pending(sock, owner):
                    break
                await asyncio.sleep(delay)
                owner = peercred.peer_uid(sock)
            if owner is None and peer_gone(sock):  # retried: nothing was sent
                raise ConnectionResetError(
                    "the service closed the connection before it was identified"
                )
            refusal = service_refusal(self.settings, owner)
            if refusal is not None:
                raise Unauthorized(refusal)
            self.core.service_uid = owner
            link, hello = self.core.opened(
                _Stream(reader, writer), asyncio.get_running_loop().time()
            )
        except BaseException:
            writer.close()
            raise
        link.transport.task = asyncio.create_task(
            self._read_loop(link), name=f"sessionlane-client-{link.generation}"
        )
        try:
            reply = await self._exchange(link, ops.Call(hello))
            proof = self.core.challenged(link, reply)
            if proof is not None:
                reply = await self._exchange(link, ops.Call(proof))
            self.core.welcomed(link, reply)
        except BaseException as exc:
            lost = link.lost is not None
            self._drop(link, "hello failed")
            if lost and isinstance(exc, Unavailable) and not isinstance(exc, DirectUnknown):
                # Dropped before the welcome: a service still starting, worth a retry.
                raise ConnectionResetError(exc.detail) from exc
            raise

    async def close(self) -> None:
        """Close the connection: the service abandons this connection's leases."""
        link = self.core.link
        waiters = self.core.close()
        for direct in self.core.direct_links():
            self._drop(direct, "closed by the client")
        if link is None:
            return
        self._fail(waiters, link)
        stream = link.transport
        stream.writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(stream.writer.wait_closed(), _CLOSE_WAIT_S)
        if stream.task is not None:
            stream.task.cancel()
            await asyncio.wait([stream.task], timeout=_CLOSE_WAIT_S)

    async def _read_loop(self, link: _Link) -> None:
        """The reader task of ``link``: replies and events in, keepalives out, until lost."""
        stream = link.transport
        frames = FrameReader(INCOMING_FRAME_BYTES)
        loop = asyncio.get_running_loop()
        reason = "connection closed by the service"
        try:
            while True:
                wait, keepalive = self.core.keepalive(link, loop.time())
                if keepalive is not None:
                    # Not awaiting the drain: the reader must keep reading whatever happens.
                    # A frame is written whole, so this never splits another one.
                    stream.writer.write(keepalive)
                try:
                    async with asyncio.timeout(wait):
                        data = await stream.reader.read(_READ_BYTES)
                except TimeoutError:
                    continue
                if not data:
                    break
                for body in frames.feed(data):
                    self._deliver(link, decode_reply(body))
        except (OSError, SessionLaneError) as exc:
            reason = f"connection lost: {exc}"
        except Exception as exc:  # a bug must not leave requests waiting on a dead reader
            log.exception("sessionlane client reader failed")
            reason = f"reader failed: {exc!r}"
        except asyncio.CancelledError:
            self._drop(link, "reader cancelled")
            raise
        self._drop(link, reason, ask=True)  # the service's side ended it (or the reader failed)
        self._revive_soon()

    def _revive_soon(self) -> None:
        """Leases suspended by a lost connection: reclaim them now, in the background, so a
        holder busy elsewhere (waiting on its model) does not miss the service's grace."""
        if self.core.closed or not self.core.suspended():
            return
        task = asyncio.create_task(self._revive_all(), name="sessionlane-reclaim")
        self._revivals.add(task)
        task.add_done_callback(self._revivals.discard)

    async def _revive_all(self) -> None:
        try:
            await self._run(ops.revive_all(self.core))
        except SessionLaneError as exc:
            log.warning("sessionlane %s: reclaim failed: %s", self.settings.address, exc)

    def _deliver(self, link: _Link, reply: Reply) -> None:
        action = self.core.received(link, reply)
        if isinstance(action, Answer):
            if not action.waiter.done():
                action.waiter.set_result(action.reply)
        elif isinstance(action, Send):
            task = asyncio.create_task(self._send_quietly(link, action.data))
            link.transport.background.add(task)
            task.add_done_callback(link.transport.background.discard)

    def _drop(self, link: _Link, reason: str, *, ask: bool = False) -> None:
        """``link`` is over: close it and report it lost. Idempotent."""
        link.transport.writer.close()
        gateway = link is self.core.link
        self._fail(self.core.lost(link, reason, ask=ask), link)
        probe = self.core.probe()  # a direct channel closed under held leases: ask why
        if probe is not None and self.core.link is not None:
            task = asyncio.create_task(self._send_quietly(self.core.link, probe))
            self.core.link.transport.background.add(task)
            task.add_done_callback(self.core.link.transport.background.discard)
        for direct in self.core.direct_links() if gateway else []:  # they go with it
            self._drop(direct, f"the gateway connection ended ({reason})")

    def _fail(self, waiters: list[asyncio.Future[Reply]], link: _Link) -> None:
        """Fail the requests that ``link``, now lost, will never answer."""
        for future in waiters:
            if not future.done():
                future.set_exception(self.core.lost_error(link))
                future.exception()  # retrieved: its awaiter raises it; no "never retrieved"

    # Requests ------------------------------------------------------------------------------

    async def _send(self, link: _Link, data: bytes) -> None:
        stream = link.transport
        async with stream.send_lock:
            if link.lost is not None:
                raise Unavailable(f"not connected ({link.lost})")
            try:
                stream.writer.write(data)
                await stream.writer.drain()
            except (OSError, RuntimeError) as exc:
                # The stream is unusable: report it lost now, so its leases are revoked
                # before this error surfaces.
                self._drop(link, f"send failed: {exc}")
                raise NotSent(f"send failed: {exc}") from exc

    async def _send_quietly(self, link: _Link, data: bytes) -> None:
        with contextlib.suppress(Unavailable):
            await self._send(link, data)

    async def _run(self, op: Generator[ops.Call | ops.Batch, Any, R]) -> R:
        """Drive ``op`` to its result, awaiting each of its calls in turn."""
        outcome: Any = None
        try:
            while True:
                step = ops.advance(op, outcome)
                seen = self.core.connect_failures  # as the op saw the state it checked
                if isinstance(step, ops.Finished):
                    result: R = step.value
                    return result
                if isinstance(step, ops.Batch):
                    outcome = await self._pipeline(step)
                    continue
                try:
                    outcome = await self._call(step, seen)
                except SessionLaneError as exc:
                    outcome = exc
        finally:
            op.close()

    async def _call(self, call: ops.Call, seen: int) -> Reply:
        if call.after:
            await asyncio.sleep(call.after)
        link = self.core.link_for(call.reconnect)
        if link is None:
            await self.reconnect(call.deadline, seen)
            link = self.core.link_for(reconnect=False)
        assert link is not None
        direct = await self._direct_for(link, call.request)
        if direct is None:
            return await self._exchange(link, call)
        try:
            return await self._exchange(direct, call)
        except NotSent:
            if not self.core.resend_unsent(direct, call.request):
                raise
        except ConnectionLost:
            if not self.core.resend_on_loss(direct, call.request):
                raise
        # The file closed an idle channel as the request went: nothing came of it there.
        return await self._exchange(await self._direct_for(link, call.request) or link, call)

    async def _direct_for(self, link: _Link, request: Any) -> _Link | None:
        """The direct channel ``request`` goes on, opened now if it may have one; None: the
        gateway's connection (also when one could not be opened: logged at debug)."""
        found = self.core.direct.route(request)
        if found is not None or self.core.direct.key(request, self.core.clock()) is None:
            return found
        async with self._opening:
            found = self.core.direct.route(request)
            key = self.core.direct.key(request, self.core.clock())
            if found is not None or key is None:
                return found
            try:
                return await self._open_direct(link, key)
            except (OSError, ValueError, TimeoutError, SessionLaneError) as exc:
                self.core.direct_refusal(key, str(exc))
                return None

    async def _open_direct(self, link: _Link, key: tuple[str, str]) -> _Link:
        """Ask the gateway for a ticket, connect to the file, show it (docs/direct-channel.md)."""
        path, lane = key
        offer = await self._exchange(link, ops.Call(Direct(lane=lane, path=path)))
        if not isinstance(offer, DirectOffer):
            raise Unavailable(f"direct channel not offered: {offer}")
        reader, writer = await open_async(offer, self.core.service_uid, self.settings.timeout)
        loop = asyncio.get_running_loop()
        direct = self.core.direct_opened(key, _Stream(reader, writer), loop.time())
        direct.transport.task = asyncio.create_task(
            self._read_loop(direct), name=f"sessionlane-direct-{direct.generation}"
        )
        return direct

    async def _exchange(self, link: _Link, call: ops.Call) -> Reply:
        """Send ``call``'s request on ``link``; await its final reply."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        rid, data = self.core.request(link, call.request, future, loop.time())
        try:
            await self._send(link, data)
            limit = self.settings.reply_limit(call.timeout)
            try:
                return await asyncio.wait_for(future, limit)
            except TimeoutError:
                raise self.core.no_reply(call.request, limit) from None
        finally:
            if not future.done() or future.cancelled():
                self.core.given_up(link, rid, call.request)

    async def _pipeline(self, batch: ops.Batch) -> list[Reply | SessionLaneError]:
        """Send ``batch``'s requests, a window at a time; their outcomes in order."""
        pipe = pipelines.Pipe(batch)
        try:
            link = self.core.link_for(reconnect=False)
        except Unavailable as exc:
            return [exc]
        assert link is not None
        if batch.requests:
            link = self.core.direct.route(batch.requests[0]) or link
        loop = asyncio.get_running_loop()
        sent: deque[tuple[Any, asyncio.Future[Reply], Any]] = deque()
        limit = self.settings.reply_limit(None)
        try:
            while True:
                chunk = pipe.to_send()
                frames: list[bytes] = []
                for index, request in enumerate(chunk):
                    future: asyncio.Future[Reply] = loop.create_future()
                    try:
                        rid, data = self.core.request(
                            link, request, future, loop.time(), pipelines.append_frame
                        )
                    except SessionLaneError as exc:  # too large, or the link is gone
                        pipe.not_sent(len(chunk) - index, exc)
                        break
                    sent.append((rid, future, request))
                    frames.append(data)
                for group in pipelines.grouped(frames, _SEND_BYTES):
                    with contextlib.suppress(Unavailable):  # the lost link fails ``sent``
                        await self._send(link, group)
                if not sent:
                    return pipe.result()
                rid, future, request = sent[0]
                try:
                    pipe.answered(await asyncio.wait_for(asyncio.shield(future), limit))
                except SessionLaneError as exc:
                    pipe.answered(exc)
                except TimeoutError:
                    for _, _, request_ in sent:
                        pipe.answered(self.core.no_reply(request_, limit))
                    return pipe.result()
                sent.popleft()
                # and every answer already in after it (they come in groups)
                while sent and sent[0][1].done():
                    _, future, _ = sent.popleft()
                    failure = future.exception()
                    if failure is not None and not isinstance(failure, SessionLaneError):
                        raise failure
                    pipe.answered(failure if failure is not None else future.result())
        finally:
            for rid, future, request in sent:
                if not future.done():
                    self.core.given_up(link, rid, request)

    # Public API ----------------------------------------------------------------------------

    def lane(self, name: str, priority: Priority = "interactive") -> AsyncLane:
        """A lane of this connection (created on the service at its first request)."""
        return AsyncLane(self, name, priority)

    async def recover(
        self, path: str, reason: str = "stuck", grace: float = 5.0, *, lane: str = "recovery"
    ) -> AsyncLease:
        """Take a recovery lease on ``path``: the holder is asked to abort, then revoked."""
        state = await self._run(ops.recover(self.core, path, reason, grace, lane))
        return AsyncLease(self, state, lane)

    async def status(self, path: str | None = None) -> StatusReply:
        """Holders, queues, fences and counters (of ``path`` only, if given)."""
        return await self._run(ops.status(path))


class AsyncLane:
    """A named lane on one connection. The same name on two connections is two lanes."""

    def __init__(self, sl: AsyncSessionLane, name: str, priority: Priority):
        check_lane(name, priority)  # at ``lane()``, not at the first request
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
        state = await self.sl._run(
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
        return None if state is None else AsyncLease(self.sl, state, self.name)

    async def append(
        self, path: str, *records: dict[str, Any], durability: Durability | None = None
    ) -> AppendResult:
        """A short write without a lease: queued like a ``write`` lease, never interleaved."""
        return await self.sl._run(
            ops.lane_append(self.sl.core, self.name, path, records, durability)
        )

    async def abandon(self, path: str | None = None, reason: str | None = None) -> list[str]:
        """Drop this lane's leases and queued requests (on ``path`` only, if given)."""
        return await self.sl._run(ops.abandon(self.sl.core, self.name, path, reason))


class AsyncLease(ops.LeaseView):
    """A granted lease. Writes carry its fence; a revoked lease refuses to write.

    ``id``, ``fence``, ``path``, ``purpose``, ``abort_requested``, ``revoked`` and
    ``external_changes`` come from ``LeaseView``; events update them as they arrive.
    """

    def __init__(self, sl: AsyncSessionLane, state: LeaseState, lane: str):
        super().__init__(state, lane)
        self.sl = sl

    async def append(
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
        return await self.sl._run(op)

    async def append_pipelined(
        self,
        records: Sequence[dict[str, Any]],
        *,
        window: int = 64,
        durability: Durability | None = None,
        release: bool = False,
    ) -> list[AppendResult]:
        """Append the records, up to ``window`` of them in flight at once, in groups (one
        append of up to a quarter of the window each, written all or nothing).

        The asyncio twin of ``Lease.append_pipelined``: results in order, and on a failure
        ``PipelineBroken`` saying which were written; none after the failed one is.
        ``release``: the last append also releases this level of the lease once durable; a
        pipeline that stops before it leaves the lease held."""
        op = pipelines.lease_append_pipelined(
            self.sl.core, self, records, window, durability, release
        )
        return await self.sl._run(op)

    async def rewrite(self, records: Sequence[dict[str, Any]]) -> int:
        """Replace the whole file atomically (compaction leases); returns the line count."""
        return await self.sl._run(ops.rewrite(self.sl.core, self, records))

    async def release(self, *, quiet: bool = False) -> None:
        """Release one level of the lease. ``quiet``: a lease already gone is not an error."""
        await self.sl._run(ops.release(self.sl.core, self, quiet))
