"""The client's two surfaces behind one blocking interface, for tests written once.

``Surface`` is what a test asks for (the ``client`` fixture, parametrised ``sync`` and
``async``): ``connect`` opens a connection through that surface and every object it hands
out is used the same way. The sync surface hands out the client's own objects. The asyncio
surface runs an event loop in a thread of its own and hands out ``Blocking`` proxies: each
call of a coroutine method runs that coroutine to completion on the loop (so a test thread
blocks just as on the sync surface, while other calls proceed on the loop), and ``with``
enters the object's ``async with``. Tests reach a surface's internals only through the few
methods here.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from waiting import eventually

import sessionlane.system.client as sync_client
from sessionlane.messages.wire import FileStatus
from sessionlane.system.client import _async as async_client
from sessionlane.system.client import _core, _ops
from sessionlane.system.client._core import LeaseState
from sessionlane.system.runtime.service import Service, embedded_service

CALL_S = 60.0
"""The bound on one call through the asyncio surface (a hang fails, it does not block)."""


class Surface:
    """A client surface as the tests see it; see the module docstring."""

    name: str

    def connect(self, address: str | None = None, token: str | None = None, **kw: Any) -> Any:
        raise NotImplementedError

    def forged(self, sl: Any, lease: Any, lane: str = "forger") -> Any:
        """A second handle on ``lease``'s id and fence that the client does not track.

        It stands for a holder whose ``revoked`` event is still in flight (or for another
        connection claiming the lease): the service alone must refuse what it sends.
        """
        raise NotImplementedError

    def socket_of(self, sl: Any) -> socket.socket:
        """The socket of ``sl``'s open connection."""
        raise NotImplementedError

    def sockets_of(self, sl: Any) -> list[socket.socket]:
        """The sockets of ``sl``'s open connection and of its direct channels."""
        raise NotImplementedError

    def request(self, sl: Any, message: Any, timeout: float) -> Any:
        """Send ``message`` on ``sl`` and wait ``timeout`` (plus the margin) for its reply."""
        raise NotImplementedError

    def observe_refusals(self, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
        """An event set when a connect attempt of this surface is refused."""
        raise NotImplementedError

    def stop(self) -> None:
        """End whatever the surface runs (its event loop)."""


def _one_call(message: Any, timeout: float) -> _ops.Op[Any]:
    reply = yield _ops.Call(message, timeout=timeout)
    return reply


class SyncSurface(Surface):
    name = "sync"

    def connect(self, address: str | None = None, token: str | None = None, **kw: Any) -> Any:
        return sync_client.connect(address, token, **kw)

    def forged(self, sl: Any, lease: Any, lane: str = "forger") -> Any:
        state = LeaseState(lease.id, lease.path, lease.fence, lease.purpose)
        return sync_client.Lease(sl, state, lane)

    def socket_of(self, sl: Any) -> socket.socket:
        link = sl.core.link
        assert link is not None
        sock: socket.socket = link.transport
        return sock

    def sockets_of(self, sl: Any) -> list[socket.socket]:
        return [self.socket_of(sl)] + [link.transport for link in sl.core.direct_links()]

    def request(self, sl: Any, message: Any, timeout: float) -> Any:
        return sl._run(_one_call(message, timeout))

    def observe_refusals(self, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
        refused = threading.Event()
        real_open = sync_client.SessionLane._open

        def observed_open(sl: Any) -> None:
            try:
                real_open(sl)
            except ConnectionRefusedError:
                refused.set()
                raise

        monkeypatch.setattr(sync_client.SessionLane, "_open", observed_open)
        return refused


class AsyncSurface(Surface):
    name = "async"
    _WRAPPED = (async_client.AsyncSessionLane, async_client.AsyncLane, async_client.AsyncLease)

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-client-loop")
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on the surface's loop; its result, or what it raised."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(CALL_S)

    def wrap(self, value: Any) -> Any:
        """``value`` as a test uses it: awaited, and client objects behind ``Blocking``."""
        if isinstance(value, Coroutine):
            value = self.run(value)
        if isinstance(value, self._WRAPPED):
            return Blocking(value, self)
        if hasattr(value, "__aenter__"):
            return BlockingContext(value, self)
        return value

    def connect(self, address: str | None = None, token: str | None = None, **kw: Any) -> Any:
        async def connected() -> Any:
            return await async_client.connect_async(address, token, **kw)

        return self.wrap(connected())

    def forged(self, sl: Any, lease: Any, lane: str = "forger") -> Any:
        state = LeaseState(lease.id, lease.path, lease.fence, lease.purpose)
        return self.wrap(async_client.AsyncLease(sl.target, state, lane))

    def socket_of(self, sl: Any) -> socket.socket:
        link = sl.target.core.link
        assert link is not None
        sock: socket.socket = link.transport.writer.get_extra_info("socket")
        return sock

    def sockets_of(self, sl: Any) -> list[socket.socket]:
        directs = sl.target.core.direct_links()
        return [self.socket_of(sl)] + [d.transport.writer.get_extra_info("socket") for d in directs]

    def request(self, sl: Any, message: Any, timeout: float) -> Any:
        return self.run(sl.target._run(_one_call(message, timeout)))

    def observe_refusals(self, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
        refused = threading.Event()
        real_open = async_client.AsyncSessionLane._open

        async def observed_open(sl: Any) -> None:
            try:
                await real_open(sl)
            except ConnectionRefusedError:
                refused.set()
                raise

        monkeypatch.setattr(async_client.AsyncSessionLane, "_open", observed_open)
        return refused

    def stop(self) -> None:
        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(cancel_the_rest())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(CALL_S)
            self.loop.close()


class Blocking:
    """An asyncio client object whose coroutine methods block until done (see the module)."""

    def __init__(self, target: Any, surface: AsyncSurface):
        self.target = target
        self._surface = surface

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.target, name)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._surface.wrap(value(*args, **kwargs))

        return call

    def __enter__(self) -> Blocking:
        return self

    def __exit__(self, *exc: object) -> None:
        self._surface.run(self.target.close())

    def __repr__(self) -> str:
        return f"Blocking({self.target!r})"


class BlockingContext:
    """An ``async with`` entered and left by a plain ``with``."""

    def __init__(self, target: Any, surface: AsyncSurface):
        self._target = target
        self._surface = surface

    def __enter__(self) -> Any:
        return self._surface.wrap(self._target.__aenter__())

    def __exit__(self, *exc: Any) -> Any:
        return self._surface.run(self._target.__aexit__(*exc))


@pytest.fixture(params=["sync", "async"])
def client(request: pytest.FixtureRequest) -> Iterator[Surface]:
    """The surface a test runs on: each client test runs once per surface."""
    surface: Surface = SyncSurface() if request.param == "sync" else AsyncSurface()
    try:
        yield surface
    finally:
        surface.stop()


def no_reply_margin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests wait exactly their own timeout for a reply (no margin for a slow service)."""
    monkeypatch.setattr(_core, "REPLY_MARGIN_S", 0.0)


# The module service and its connections ----------------------------------------------------

KEEPALIVE_MS = 400
"""The service drops a connection silent for three of these."""
CLIENT_KEEPALIVE = 0.1
MAX_RECORD_BYTES = 4096


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One service per test module: ``max_queue=1`` so a queue fills with one waiter, a short
    keepalive so idle connections are really checked, a small ``max_record_bytes``."""
    module_root = tmp_path_factory.mktemp("client")
    roots = module_root / "sessions"
    roots.mkdir()
    with embedded_service(
        [str(roots)],
        log_file=module_root / "service.log",
        max_queue=1,
        keepalive_ms=KEEPALIVE_MS,
        max_record_bytes=MAX_RECORD_BYTES,
    ) as svc:
        yield svc


@pytest.fixture
def root(service: Service) -> Path:
    """The module service's root (overrides conftest's per-test root)."""
    return Path(service.settings.roots[0])


@pytest.fixture
def path(root: Path, request: pytest.FixtureRequest) -> str:
    """A transcript of this test's own (and surface's own), not created yet."""
    return str(root / (re.sub(r"\W+", "_", request.node.name) + ".jsonl"))


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    """Threads for calls that block; torn down after the connections (which ends the calls)."""
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


@pytest.fixture
def clients(
    client: Surface, service: Service, pool: ThreadPoolExecutor
) -> Iterator[Callable[[], Any]]:
    """``make()`` opens a connection to the module service; all are closed after the test."""
    opened: list[Any] = []

    def make() -> Any:
        sl = client.connect(service.address, keepalive=CLIENT_KEEPALIVE, timeout=10.0)
        opened.append(sl)
        return sl

    yield make
    for sl in opened:
        sl.close()


@pytest.fixture
def sl(clients: Callable[[], Any]) -> Any:
    return clients()


@pytest.fixture
def other(clients: Callable[[], Any]) -> Any:
    """A second connection: its lanes are other lanes, even under the same names."""
    return clients()


def file_status(sl: Any, path: str) -> FileStatus:
    (status,) = sl.status(path).files
    return status


def wait_queued(sl: Any, path: str, n: int = 1) -> FileStatus:
    """Until ``n`` requests wait on ``path`` (the service says so, not a sleep)."""

    def queued() -> FileStatus | None:
        status = file_status(sl, path)
        return status if len(status.queue) >= n else None

    result: FileStatus = eventually(queued, f"{n} queued")
    return result


def lines(path: str) -> list[dict[str, Any]]:
    """The records of the transcript at ``path`` (which must end with a whole line)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text == "" or text.endswith("\n"), f"torn transcript: {text!r}"
    return [json.loads(line) for line in text.splitlines()]
