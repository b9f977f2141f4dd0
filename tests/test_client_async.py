"""The asyncio client against a real embedded service (real processes, real sockets, real files).

The same ground as ``test_client.py``, through ``connect_async``. Each test is a plain function
running its scenario with ``asyncio.run`` (no pytest-asyncio), bounded by ``SCENARIO_S``.
Orderings are forced with tasks and the service's own state (``status`` shows a request queued
before the test goes on), never with sleeps; waiting for an event is a bounded poll.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import re
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from messages.codec import HEADER, encode
from messages.wire import FileStatus, Hello
from system import client
from system.client._async import (
    AsyncLease,
    AsyncSessionLane,
    Contended,
    InvalidRecord,
    LeaseRevoked,
    LeaseTimeout,
    NotHolder,
    PathNotAllowed,
    QueueFull,
    SessionLaneError,
    StaleFence,
    TooLarge,
    Unauthorized,
    Unavailable,
    connect_async,
)
from system.client._core import LeaseState
from system.runtime.launch import free_port
from system.runtime.service import Service, embedded_service

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(60)]

KEEPALIVE_MS = 400
"""The service drops a connection silent for three of these."""
CLIENT_KEEPALIVE = 0.1
MAX_RECORD_BYTES = 4096
SCENARIO_S = 30.0

T = TypeVar("T")


def run(scenario: Coroutine[Any, Any, T]) -> T:
    """Run one test's scenario on a fresh event loop, failing (not hanging) after a bound."""
    return asyncio.run(asyncio.wait_for(scenario, SCENARIO_S))


# Fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("client-async")


@pytest.fixture(scope="module")
def service(module_root: Path) -> Iterator[Service]:
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
    """A transcript of this test's own, not created yet."""
    return str(root / (re.sub(r"\W+", "_", request.node.name) + ".jsonl"))


@asynccontextmanager
async def connected(service: Service, n: int = 1) -> AsyncIterator[list[AsyncSessionLane]]:
    """``n`` connections to ``service``, closed on exit."""
    opened = [
        await connect_async(service.address, keepalive=CLIENT_KEEPALIVE, timeout=10.0)
        for _ in range(n)
    ]
    try:
        yield opened
    finally:
        for sl in opened:
            await sl.close()


async def eventually(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll ``check`` (a function or a coroutine function) until truthy; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def file_status(sl: AsyncSessionLane, path: str) -> FileStatus:
    (status,) = (await sl.status(path)).files
    return status


async def wait_queued(sl: AsyncSessionLane, path: str, n: int = 1) -> FileStatus:
    """Until ``n`` requests wait on ``path`` (the service says so, not a sleep)."""

    async def queued() -> FileStatus | None:
        status = await file_status(sl, path)
        return status if len(status.queue) >= n else None

    result: FileStatus = await eventually(queued, f"{n} queued")
    return result


def lines(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text == "" or text.endswith("\n"), f"torn transcript: {text!r}"
    return [json.loads(line) for line in text.splitlines()]


def forged(sl: AsyncSessionLane, lease: AsyncLease, lane: str = "forger") -> AsyncLease:
    """A second handle on ``lease``'s id and fence that the client does not track.

    It stands for a holder whose ``revoked`` event is still in flight (or for another
    connection claiming the lease): the service alone must refuse what it sends.
    """
    return AsyncLease(sl, LeaseState(lease.id, lease.path, lease.fence, lease.purpose), lane)


# Connecting --------------------------------------------------------------------------------


def test_connect_async_can_be_awaited_or_entered(service: Service, path: str) -> None:
    async def scenario() -> None:
        sl = await connect_async(service.address)
        assert sl.connected and sl.server
        await sl.lane("a").append(path, {"via": "await"})
        await sl.close()
        assert not sl.connected
        with pytest.raises(Unavailable):
            await sl.status()
        async with connect_async(service.address) as entered:
            await entered.lane("a").append(path, {"via": "async with"})
        assert not entered.connected
        # The sync module's ``connect_async`` hands out the same client.
        async with client.connect_async(service.address) as same:
            assert isinstance(same, AsyncSessionLane)
            await same.lane("a").append(path, {"via": "system.client"})

    run(scenario())
    assert [r["via"] for r in lines(path)] == ["await", "async with", "system.client"]


def test_a_unix_socket_with_a_token_refuses_clients_without_it(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    token_file.chmod(0o600)
    path = str(tmp_path / "unix.jsonl")

    async def scenario(address: str) -> None:
        with pytest.raises(Unauthorized):
            await connect_async(address)
        with pytest.raises(Unauthorized):
            await connect_async(address, token="wrong")
        async with connect_async(address, token="s3cret") as sl:
            assert (await sl.lane("agent").append(path, {"via": "unix"})).lines == 1

    with (
        tempfile.TemporaryDirectory(prefix="sl-", dir="/tmp") as short,  # sun_path is short
        embedded_service(
            [str(tmp_path)],
            listen=f"unix://{short}/gw.sock",
            token_file=str(token_file),
            log_file=tmp_path / "log",
        ) as svc,
    ):
        run(scenario(svc.address))
    assert lines(path) == [{"via": "unix"}]


def test_connecting_to_nothing_raises_unavailable_after_bounded_retries() -> None:
    async def scenario() -> None:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await connect_async(f"tcp://127.0.0.1:{free_port()}", reconnect_for=0.3)
        assert time.monotonic() - started < 5.0

    run(scenario())


# Leases ------------------------------------------------------------------------------------


def test_a_lease_block_acquires_appends_durably_and_releases(service: Service, path: str) -> None:
    async def scenario() -> None:
        async with connected(service) as (sl,):
            lane = sl.lane("agent:main:direct")
            async with lane.lease(path, purpose="prompt") as lease:
                assert lease is not None
                assert isinstance(lease.fence, int) and lease.fence >= 1
                assert lease.path == os.path.realpath(path)
                first = await lease.append({"type": "message", "n": 1}, {"type": "message", "n": 2})
                assert (first.offset, first.lines, first.fence) == (0, 2, lease.fence)
                # Acknowledged means on disk: read the file while the lease is still held.
                assert lines(path) == [{"type": "message", "n": 1}, {"type": "message", "n": 2}]
                second = await lease.append({"type": "message", "n": 3}, durability="flush")
                assert second.offset == os.path.getsize(path) - len(b'{"type":"message","n":3}\n')
                holder = (await file_status(sl, path)).holder
                assert holder is not None and holder.lane == "agent:main:direct"
                assert holder.lease == lease.id and holder.purpose == "prompt"
            assert (await file_status(sl, path)).holder is None
            with pytest.raises(LeaseRevoked):
                await lease.append({"after": "release"})

    run(scenario())
    assert [r["n"] for r in lines(path)] == [1, 2, 3]


def test_a_compaction_lease_rewrites_the_whole_file(service: Service, path: str) -> None:
    async def scenario() -> None:
        async with connected(service) as (sl,):
            lane = sl.lane("compactor")
            await lane.append(path, {"n": 1}, {"n": 2}, {"n": 3})
            async with lane.lease(path, purpose="compaction") as lease:
                assert lease is not None
                assert await lease.rewrite([{"summary": "1-3"}]) == 1

    run(scenario())
    assert lines(path) == [{"summary": "1-3"}]


def test_relative_paths_resolve_against_the_callers_cwd(
    service: Service, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = root / "relative-async"
    sub.mkdir()
    monkeypatch.chdir(sub)

    async def scenario() -> None:
        async with connected(service) as (sl,):
            assert (await sl.lane("cron").append("rel.jsonl", {"where": "cwd"})).lines == 1
            async with sl.lane("cron").lease("rel.jsonl") as lease:
                assert lease is not None and lease.path == str(sub / "rel.jsonl")

    run(scenario())
    assert lines(str(sub / "rel.jsonl")) == [{"where": "cwd"}]
    assert not (root / "rel.jsonl").exists()


def test_a_nested_lease_shares_its_state_and_the_outer_level_keeps_holding(
    service: Service, path: str
) -> None:
    async def scenario() -> None:
        async with connected(service) as (sl,):
            lane = sl.lane("agent")
            outer = await lane.acquire(path, max_hold=0.5)
            assert outer is not None
            async with lane.lease(path) as inner:
                assert inner is not None and (inner.id, inner.fence) == (outer.id, outer.fence)
                await inner.append({"level": "inner"})
            with pytest.raises(LeaseRevoked):
                await inner.append({"level": "inner, after its release"})
            await outer.append({"level": "outer"})
            holder = (await file_status(sl, path)).holder
            assert holder is not None and holder.lease == outer.id
            await eventually(lambda: outer.revoked == "max_hold", "the max-hold revocation")

    run(scenario())
    assert lines(path) == [{"level": "inner"}, {"level": "outer"}]


# Contention --------------------------------------------------------------------------------


def test_skip_yields_none_and_fail_raises_contended_while_another_lane_holds(
    service: Service, path: str
) -> None:
    async def scenario() -> None:
        async with connected(service) as (sl,):
            async with sl.lane("channel").lease(path) as held:
                assert held is not None
                heartbeat = sl.lane("heartbeat", priority="background")
                async with heartbeat.lease(path, on_contention="skip") as skipped:
                    assert skipped is None
                with pytest.raises(Contended) as caught:
                    await heartbeat.acquire(path, on_contention="fail")
                assert caught.value.path == os.path.realpath(path)
                status = await file_status(sl, path)
                assert status.queue == []
                assert status.counters["skips"] == 1 and status.counters["contended"] == 1
            async with sl.lane("heartbeat").lease(path, on_contention="fail") as free:
                assert free is not None

    run(scenario())


def test_wait_timeout_expiry_raises_lease_timeout(service: Service, path: str) -> None:
    async def scenario() -> None:
        async with connected(service) as (sl,), sl.lane("channel").lease(path):
            started = time.monotonic()
            with pytest.raises(LeaseTimeout) as caught:
                await sl.lane("cron").acquire(path, wait_timeout=0.2)
            assert time.monotonic() - started >= 0.2
            assert caught.value.code == "lease_timeout"
            assert (await file_status(sl, path)).queue == []

    run(scenario())


def test_a_full_queue_raises_queue_full(service: Service, path: str) -> None:
    async def scenario() -> None:
        async with connected(service, 2) as (sl, other):
            holder = await sl.lane("channel").acquire(path)
            assert holder is not None
            waiter = asyncio.create_task(other.lane("waiter").acquire(path, wait_timeout=10.0))
            await wait_queued(sl, path, 1)  # max_queue=1: the queue is full now
            with pytest.raises(QueueFull):
                await sl.lane("one-too-many").acquire(path, wait_timeout=10.0)
            await holder.release()
            granted = await waiter
            assert granted is not None and granted.fence > holder.fence

    run(scenario())


def test_the_same_lane_name_on_two_connections_is_two_lanes(service: Service, path: str) -> None:
    async def scenario() -> None:
        async with connected(service, 2) as (sl, other):
            mine = await sl.lane("agent:main:main").acquire(path)
            assert mine is not None
            with pytest.raises(Contended):
                await other.lane("agent:main:main").acquire(path, on_contention="fail")
            theirs = asyncio.create_task(other.lane("agent:main:main").acquire(path))
            await wait_queued(sl, path)
            assert not theirs.done()
            await mine.release()
            granted = await theirs
            assert granted is not None
            assert granted.id != mine.id and granted.fence > mine.fence

    run(scenario())


def test_a_laneless_append_is_queued_behind_the_holder(service: Service, path: str) -> None:
    async def scenario() -> None:
        async with connected(service, 2) as (sl, other):
            turn = await sl.lane("channel").acquire(path)
            assert turn is not None
            await turn.append({"turn": "user"})
            cron = asyncio.create_task(other.lane("cron").append(path, {"cron": "tick"}))
            queued = await wait_queued(sl, path)
            assert [(q.lane, q.purpose) for q in queued.queue] == [("cron", "write")]
            assert lines(path) == [{"turn": "user"}]
            await turn.append({"turn": "assistant"})
            await turn.release()
            result = await cron
            assert result.lines == 1 and result.fence > turn.fence

    run(scenario())
    assert lines(path) == [{"turn": "user"}, {"turn": "assistant"}, {"cron": "tick"}]


def test_status_shows_the_holder_and_the_queue(service: Service, path: str) -> None:
    async def scenario() -> None:
        async with connected(service, 2) as (sl, other):
            async with sl.lane("channel").lease(path, purpose="prompt") as lease:
                assert lease is not None
                heartbeat = other.lane("heartbeat", priority="background")
                waiting = asyncio.create_task(heartbeat.acquire(path, "write"))
                status = await wait_queued(sl, path)
                assert status.path == os.path.realpath(path) and status.fence == lease.fence
                assert status.holder is not None
                assert (status.holder.lane, status.holder.lease, status.holder.purpose) == (
                    "channel",
                    lease.id,
                    "prompt",
                )
                (entry,) = status.queue
                assert (entry.lane, entry.purpose, entry.priority) == (
                    "heartbeat",
                    "write",
                    "background",
                )
                assert any(f.path == status.path for f in (await sl.status()).files)
            assert await waiting is not None

    run(scenario())


def test_a_cancelled_acquire_releases_its_late_grant(service: Service, path: str) -> None:
    async def scenario() -> None:
        async with connected(service, 2) as (sl, other):
            holder = await sl.lane("channel").acquire(path)
            assert holder is not None
            waiting = asyncio.create_task(other.lane("impatient").acquire(path))
            await wait_queued(sl, path)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await holder.release()

            # The grant goes to the cancelled request; the client hands it straight back.
            async def free() -> bool:
                status = await file_status(sl, path)
                return status.holder is None and status.counters["grants"] == 2

            await eventually(free, "the orphaned grant to be released")
            async with other.lane("next").lease(path, on_contention="fail") as lease:
                assert lease is not None

    run(scenario())


# Errors ------------------------------------------------------------------------------------


def test_paths_outside_the_roots_raise_path_not_allowed_and_create_nothing(
    service: Service, root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.jsonl"

    async def scenario() -> None:
        async with connected(service) as (sl,):
            lane = sl.lane("agent")
            for bad in (str(outside), str(root / ".." / "escape.jsonl"), str(root / "notes.txt")):
                with pytest.raises(PathNotAllowed) as caught:
                    await lane.acquire(bad)
                assert caught.value.code == "path_not_allowed" and caught.value.path
                with pytest.raises(PathNotAllowed):
                    await lane.append(bad, {"x": 1})

    run(scenario())
    assert not outside.exists()
    assert not (root.parent / "escape.jsonl").exists()
    assert not (root / "notes.txt").exists()


def test_an_invalid_record_refuses_the_whole_batch(service: Service, path: str) -> None:
    async def scenario() -> None:
        async with connected(service) as (sl,), sl.lane("agent").lease(path) as lease:
            assert lease is not None
            await lease.append({"ok": 0})
            batches: list[list[dict[str, Any]]] = [
                [{"ok": 1}, {"bad": float("nan")}],
                [{"ok": 1}, {"big": "x" * MAX_RECORD_BYTES}],
                [],
            ]
            for batch in batches:
                with pytest.raises(InvalidRecord):
                    await lease.append(*batch)
            assert lease.revoked is None
            await lease.append({"ok": 2})

    run(scenario())
    assert lines(path) == [{"ok": 0}, {"ok": 2}]


def test_a_max_hold_revoke_sets_revoked_and_later_writes_fail(service: Service, path: str) -> None:
    async def scenario() -> None:
        async with connected(service) as (sl,):
            lease = await sl.lane("agent").acquire(path, max_hold=0.3)
            assert lease is not None
            await lease.append({"n": 1})
            await eventually(lambda: lease.revoked == "max_hold", "the revoked event")
            with pytest.raises(LeaseRevoked) as caught:
                await lease.append({"n": 2})
            assert "max_hold" in caught.value.detail
            with pytest.raises(StaleFence) as stale:
                await forged(sl, lease, lane="agent").append({"n": 3})
            assert stale.value.code == "stale_fence"
            async with sl.lane("next").lease(path) as after:
                assert after is not None and after.fence > lease.fence
            with pytest.raises(LeaseRevoked):
                await lease.release()
            await lease.release(quiet=True)

    run(scenario())
    assert lines(path) == [{"n": 1}]


def test_a_release_by_a_non_holder_raises_not_holder(service: Service, path: str) -> None:
    async def scenario() -> None:
        async with connected(service, 2) as (sl, other), sl.lane("agent").lease(path) as lease:
            assert lease is not None
            with pytest.raises(NotHolder):
                await forged(other, lease, lane="agent").release()
            holder = (await file_status(sl, path)).holder
            assert holder is not None and holder.lease == lease.id
            await lease.append({"still": "mine"})

    run(scenario())
    assert lines(path) == [{"still": "mine"}]


def test_an_error_raised_by_the_service_pickles_with_its_fields(
    service: Service, path: str
) -> None:
    async def scenario() -> SessionLaneError:
        async with connected(service) as (sl,), sl.lane("a").lease(path):
            try:
                await sl.lane("b").acquire(path, on_contention="fail")
            except Contended as exc:
                return exc
        raise AssertionError("not contended")

    error = run(scenario())
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is Contended
    assert (copy.code, copy.detail, copy.path) == ("contended", error.detail, error.path)
    assert copy.path == os.path.realpath(path)


# Recovery and abandon ----------------------------------------------------------------------


def test_recovery_asks_the_holder_to_abort_then_revokes_it(service: Service, path: str) -> None:
    async def scenario() -> None:
        async with connected(service, 2) as (sl, other):
            stuck = await sl.lane("agent:main:main").acquire(path)
            assert stuck is not None
            await stuck.append({"turn": "stuck"})
            recovery = asyncio.create_task(other.recover(path, "stuck", 0.3))
            await eventually(lambda: stuck.abort_requested, "abort_requested")
            assert stuck.revoked is None
            rescued = await recovery
            assert rescued.purpose == "recovery" and rescued.fence > stuck.fence
            await eventually(lambda: stuck.revoked == "recovery", "the recovery revocation")
            with pytest.raises(LeaseRevoked):
                await stuck.append({"turn": "too late"})
            await rescued.append({"recovered": True})
            await rescued.release()

    run(scenario())
    assert lines(path) == [{"turn": "stuck"}, {"recovered": True}]


def test_a_holder_that_releases_on_abort_hands_over_without_revocation(
    service: Service, path: str
) -> None:
    async def scenario() -> None:
        async with connected(service, 2) as (sl, other):
            holder = await sl.lane("agent").acquire(path)
            assert holder is not None
            recovery = asyncio.create_task(other.recover(path, "stuck", 30.0))
            await eventually(lambda: holder.abort_requested, "abort_requested")
            await holder.release()
            rescued = await recovery
            assert rescued.purpose == "recovery" and holder.revoked is None
            assert (await file_status(other, path)).counters["revocations"] == 0

    run(scenario())


def test_recover_returns_a_recovery_lease(service: Service, path: str) -> None:
    async def scenario() -> None:
        async with connected(service) as (sl,):
            lease = await sl.recover(path, reason="stuck", grace=1.0)
            assert lease.purpose == "recovery" and lease.revoked is None
            holder = (await file_status(sl, path)).holder
            assert holder is not None and (holder.lease, holder.purpose) == (lease.id, "recovery")
            assert (await lease.append({"repair": 1})).lines == 1
            await lease.release()
            assert (await file_status(sl, path)).holder is None

    run(scenario())
    assert lines(path) == [{"repair": 1}]


def test_abandon_returns_the_leases_and_frees_the_paths(service: Service, path: str) -> None:
    second = path.replace(".jsonl", "_2.jsonl")

    async def scenario() -> None:
        async with connected(service, 2) as (sl, other):
            lane = sl.lane("agent")
            a = await lane.acquire(path)
            b = await lane.acquire(second)
            assert a is not None and b is not None
            assert await lane.abandon(second) == [b.id]
            assert b.revoked == "abandoned" and a.revoked is None
            assert await lane.abandon() == [a.id]
            assert a.revoked == "abandoned"
            with pytest.raises(LeaseRevoked):
                await a.append({"after": "abandon"})
            for p in (path, second):
                async with other.lane("agent").lease(p, on_contention="fail") as free:
                    assert free is not None
            assert await lane.abandon() == []

    run(scenario())
    assert not os.path.exists(path) or lines(path) == []


# Connections -------------------------------------------------------------------------------


def test_an_idle_connection_is_kept_alive(service: Service, path: str) -> None:
    async def scenario() -> None:
        async with connected(service) as (sl,):
            lease = await sl.lane("agent").acquire(path)
            assert lease is not None
            # A raw connection that says hello and then nothing is dropped by the service ...
            host, port = service.address.removeprefix("tcp://").rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            body = encode(Hello(id=1, client="silent"))
            writer.write(HEADER.pack(len(body)) + body)
            while await reader.read(4096):  # the welcome, then EOF past the keepalive limit
                pass
            writer.close()
            # ... the client, just as idle meanwhile, kept its connection and its lease.
            assert lease.revoked is None
            assert (await lease.append({"alive": True})).lines == 1

    run(scenario())
    assert lines(path) == [{"alive": True}]


def test_a_lost_socket_revokes_the_lease_and_writes_nothing(service: Service, path: str) -> None:
    async def scenario() -> None:
        async with connected(service, 2) as (sl, other):
            lease = await sl.lane("agent").acquire(path)
            assert lease is not None
            await lease.append({"n": 1})
            assert sl._conn is not None
            # The connection breaks underneath the client, sending side first: the next
            # send fails before the reader task has heard of it (the harder case).
            sl._conn.writer.get_extra_info("socket").shutdown(socket.SHUT_WR)
            with pytest.raises(LeaseRevoked):
                await lease.append({"n": 2})
            assert lease.revoked == "connection_lost"
            async with other.lane("next").lease(path, wait_timeout=10.0) as after:
                assert after is not None and after.fence > lease.fence
            assert lines(path) == [{"n": 1}]
            assert (await sl.lane("agent").append(path, {"n": 3})).lines == 1  # reconnected

    run(scenario())
    assert lines(path) == [{"n": 1}, {"n": 3}]


def test_a_stopped_service_revokes_the_lease_and_a_new_one_is_reconnected_to(
    tmp_path: Path,
) -> None:
    roots = [str(tmp_path)]
    listen = f"tcp://127.0.0.1:{free_port()}"
    path = str(tmp_path / "restart.jsonl")

    async def scenario() -> None:
        with embedded_service(roots, listen=listen, log_file=tmp_path / "first.log") as first:
            sl = await connect_async(first.address, keepalive=CLIENT_KEEPALIVE)
            lease = await sl.lane("agent").acquire(path)
            assert lease is not None
            await lease.append({"n": 1})
            first.stop()
            with pytest.raises(LeaseRevoked):
                await lease.append({"n": 2})
            assert lease.revoked is not None
            assert lines(path) == [{"n": 1}]
        try:
            with embedded_service(roots, listen=listen, log_file=tmp_path / "second.log"):
                assert (await sl.status(path)).files == []  # reconnected to the new service
                async with sl.lane("agent").lease(path) as again:
                    assert again is not None and again.fence > lease.fence
                    await again.append({"n": 3})
                with pytest.raises(LeaseRevoked):
                    await lease.append({"n": 4})
        finally:
            await sl.close()

    run(scenario())
    assert lines(path) == [{"n": 1}, {"n": 3}]


def test_concurrent_tasks_share_one_connection(service: Service, path: str) -> None:
    async def scenario() -> list[int]:
        async with connected(service) as (sl,):

            async def write(n: int) -> int:
                result = await sl.lane(f"worker-{n}").append(
                    path, *({"w": n, "i": i} for i in range(5))
                )
                return result.offset

            return list(await asyncio.gather(*(write(n) for n in range(4))))

    offsets = run(scenario())
    records = lines(path)
    assert len(records) == 20 and len(set(offsets)) == 4
    for start in range(0, 20, 5):
        assert len({r["w"] for r in records[start : start + 5]}) == 1


def test_a_closed_client_revokes_its_leases(service: Service, path: str) -> None:
    async def scenario() -> None:
        sl = await connect_async(service.address)
        lease = await sl.lane("agent").acquire(path)
        assert lease is not None
        await sl.close()
        assert lease.revoked == "connection_closed"
        with pytest.raises(LeaseRevoked):
            await lease.append({"x": 1})
        async with (
            connected(service) as (other,),
            other.lane("agent").lease(path, wait_timeout=10.0) as after,
        ):
            assert after is not None and after.fence > lease.fence

    run(scenario())


# What the client refuses before sending; connecting ----------------------------------------

UNSTORABLE: list[tuple[str, list[Any]]] = [
    ("a set", [{"tags": {1, 2}}]),
    ("bytes", [{"blob": b"\x00"}]),
    ("a list, not an object", [["a"]]),
    ("a non-string key", [{1: "one"}]),
    ("NaN", [{"score": float("nan")}]),
    ("a record over max_record_bytes", [{"big": "x" * MAX_RECORD_BYTES}]),
    ("an empty batch", []),
]


@pytest.mark.parametrize(
    "records", [records for _, records in UNSTORABLE], ids=[name for name, _ in UNSTORABLE]
)
def test_a_record_that_cannot_be_stored_raises_invalid_record_before_anything_is_sent(
    service: Service, path: str, records: list[Any]
) -> None:
    async def scenario() -> None:
        async with connect_async(service.address, max_record_bytes=MAX_RECORD_BYTES) as sl:
            lane = sl.lane("agent")
            async with lane.lease(path) as lease:
                assert lease is not None
                await lease.append({"n": 1})
                with pytest.raises(InvalidRecord):
                    await lease.append(*records)
                with pytest.raises(InvalidRecord):
                    await lease.rewrite(records or [["not an object"]])
                # Nothing reached the service (it counts the records it refuses) ...
                assert (await file_status(sl, path)).counters["invalid_records"] == 0
                # ... and the lease and its connection go on as if nothing happened.
                assert lease.revoked is None
                assert (await lease.append({"n": 2})).lines == 1
            with pytest.raises(InvalidRecord):
                await lane.append(path, *records)
            assert (await lane.append(path, {"n": 3})).lines == 1

    run(scenario())
    assert lines(path) == [{"n": 1}, {"n": 2}, {"n": 3}]


def test_a_batch_over_max_frame_bytes_raises_too_large_and_the_lease_keeps_holding(
    service: Service, path: str
) -> None:
    async def scenario() -> None:
        async with connected(service) as (sl,), sl.lane("agent").lease(path) as lease:
            assert lease is not None
            with pytest.raises(TooLarge, match="nothing sent"):
                await lease.append(*batch)
            assert lease.revoked is None
            assert (await lease.append({"after": "too large"})).lines == 1

    record = {"chunk": "x" * (MAX_RECORD_BYTES - 64)}
    batch = [record] * (8 * 1024 * 1024 // (MAX_RECORD_BYTES - 64) + 16)
    run(scenario())
    assert lines(path) == [{"after": "too large"}]


def test_sessionlane_connect_async_is_entered_with_async_with(service: Service, path: str) -> None:
    import sessionlane

    async def scenario() -> None:
        async with sessionlane.connect_async(service.address.removeprefix("tcp://")) as sl:
            assert sl.connected
            async with sl.lane("a").lease(path) as lease:
                assert lease is not None
                await lease.append({"via": "sessionlane.connect_async"})
        assert not sl.connected

    run(scenario())
    assert lines(path) == [{"via": "sessionlane.connect_async"}]


def test_connecting_to_nothing_fails_at_once_unless_asked_to_keep_trying() -> None:
    async def scenario() -> None:
        started = time.monotonic()
        with pytest.raises(Unavailable, match=r"cannot reach sessionlane at 127\.0\.0\.1:"):
            await connect_async(f"127.0.0.1:{free_port()}")
        assert time.monotonic() - started < 2.0  # one attempt, no retries (was 10.7 s)

    run(scenario())


def test_a_token_read_from_a_file_with_its_trailing_newline_is_accepted(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    token_file.chmod(0o600)
    path = str(tmp_path / "token.jsonl")

    async def scenario(address: str) -> None:
        async with connect_async(address, token=token_file.read_text()) as sl:
            assert (await sl.lane("agent").append(path, {"token": "file"})).lines == 1

    with embedded_service(
        [str(tmp_path)], token_file=str(token_file), log_file=tmp_path / "log"
    ) as svc:
        run(scenario(svc.address))
    assert lines(path) == [{"token": "file"}]
