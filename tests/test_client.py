"""The sync client against a real embedded service (real processes, real sockets, real files).

One service serves the module (``max_queue=1`` so a queue fills with one waiter, a short
keepalive so idle connections are really checked); each test works on its own transcript and
its own connections, and closing a connection abandons whatever it held. The tests of a lost
or restarted service start services of their own.

Orderings are forced with threads and the service's own state (``status`` shows a request
queued before the test goes on), never with sleeps; waiting for an event is a bounded poll.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from messages.codec import HEADER, encode
from messages.errors import ERROR_CODES, error_for
from messages.wire import FileStatus, Hello
from system.client import (
    BadFrame,
    Contended,
    InvalidRecord,
    Lease,
    LeaseRevoked,
    LeaseTimeout,
    NotHolder,
    PathNotAllowed,
    QueueFull,
    SessionLane,
    SessionLaneError,
    ShuttingDown,
    StaleFence,
    TooLarge,
    Unauthorized,
    Unavailable,
    connect,
)
from system.client._core import LeaseState
from system.runtime.launch import free_port
from system.runtime.service import Service, embedded_service

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(60)]

KEEPALIVE_MS = 400
"""The service drops a connection silent for three of these."""
CLIENT_KEEPALIVE = 0.1
MAX_RECORD_BYTES = 4096


# Fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("client-sync")


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


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    """Threads for calls that block; torn down after the connections (which ends the calls)."""
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


@pytest.fixture
def clients(service: Service, pool: ThreadPoolExecutor) -> Iterator[Callable[[], SessionLane]]:
    """``make()`` opens a connection to the module service; all are closed after the test."""
    opened: list[SessionLane] = []

    def make() -> SessionLane:
        sl = connect(service.address, keepalive=CLIENT_KEEPALIVE, timeout=10.0)
        opened.append(sl)
        return sl

    yield make
    for sl in opened:
        sl.close()


@pytest.fixture
def sl(clients: Callable[[], SessionLane]) -> SessionLane:
    return clients()


@pytest.fixture
def other(clients: Callable[[], SessionLane]) -> SessionLane:
    """A second connection: its lanes are other lanes, even under the same names."""
    return clients()


def eventually(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll ``check`` until it returns something truthy (bounded; fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return result


def file_status(sl: SessionLane, path: str) -> FileStatus:
    (status,) = sl.status(path).files
    return status


def wait_queued(sl: SessionLane, path: str, n: int = 1) -> FileStatus:
    """Until ``n`` requests wait on ``path`` (the service says so, not a sleep)."""

    def queued() -> FileStatus | None:
        status = file_status(sl, path)
        return status if len(status.queue) >= n else None

    result: FileStatus = eventually(queued, f"{n} queued")
    return result


def lines(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text == "" or text.endswith("\n"), f"torn transcript: {text!r}"
    return [json.loads(line) for line in text.splitlines()]


def forged(sl: SessionLane, lease: Lease, lane: str = "forger") -> Lease:
    """A second handle on ``lease``'s id and fence that the client does not track.

    It stands for a holder whose ``revoked`` event is still in flight (or for another
    connection claiming the lease): the service alone must refuse what it sends.
    """
    state = LeaseState(lease.id, lease.path, lease.fence, lease.purpose)
    return Lease(sl, state, lane)


# Leases ------------------------------------------------------------------------------------


def test_a_lease_block_acquires_appends_durably_and_releases(sl: SessionLane, path: str) -> None:
    lane = sl.lane("agent:main:direct")
    with lane.lease(path, purpose="prompt") as lease:
        assert lease is not None
        assert isinstance(lease.fence, int) and lease.fence >= 1
        assert lease.path == os.path.realpath(path)
        first = lease.append({"type": "message", "n": 1}, {"type": "message", "n": 2})
        assert first.offset == 0 and first.lines == 2 and first.fence == lease.fence
        # Acknowledged means on disk: read the file while the lease is still held.
        assert lines(path) == [{"type": "message", "n": 1}, {"type": "message", "n": 2}]
        second = lease.append({"type": "message", "n": 3}, durability="flush")
        assert second.offset == os.path.getsize(path) - len(b'{"type":"message","n":3}\n')
        holder = file_status(sl, path).holder
        assert holder is not None and holder.lane == "agent:main:direct"
        assert holder.lease == lease.id and holder.purpose == "prompt"
    assert file_status(sl, path).holder is None
    assert [r["n"] for r in lines(path)] == [1, 2, 3]
    with pytest.raises(LeaseRevoked):
        lease.append({"after": "release"})
    assert len(lines(path)) == 3


def test_a_compaction_lease_rewrites_the_whole_file(sl: SessionLane, path: str) -> None:
    lane = sl.lane("compactor")
    lane.append(path, {"n": 1}, {"n": 2}, {"n": 3})
    with lane.lease(path, purpose="compaction") as lease:
        assert lease is not None
        assert lease.rewrite([{"summary": "1-3"}]) == 1
    assert lines(path) == [{"summary": "1-3"}]


def test_relative_paths_resolve_against_the_callers_cwd(
    sl: SessionLane, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = root / "relative-sync"
    sub.mkdir()
    monkeypatch.chdir(sub)
    result = sl.lane("cron").append("rel.jsonl", {"where": "cwd"})
    assert result.lines == 1
    assert lines(str(sub / "rel.jsonl")) == [{"where": "cwd"}]
    assert not (root / "rel.jsonl").exists()  # not the service's idea of relative
    with sl.lane("cron").lease("rel.jsonl") as lease:
        assert lease is not None and lease.path == str(sub / "rel.jsonl")


def test_a_nested_lease_shares_its_state_and_the_outer_level_keeps_holding(
    sl: SessionLane, path: str
) -> None:
    lane = sl.lane("agent")
    outer = lane.acquire(path, max_hold=0.5)
    assert outer is not None
    with lane.lease(path) as inner:
        assert inner is not None and inner.id == outer.id and inner.fence == outer.fence
        inner.append({"level": "inner"})
    with pytest.raises(LeaseRevoked):  # that level is released ...
        inner.append({"level": "inner, after its release"})
    outer.append({"level": "outer"})  # ... the outer one still holds
    holder = file_status(sl, path).holder
    assert holder is not None and holder.lease == outer.id
    # Events still reach the outer level after the inner one ended.
    eventually(lambda: outer.revoked == "max_hold", "the max-hold revocation")
    assert lines(path) == [{"level": "inner"}, {"level": "outer"}]


# Contention --------------------------------------------------------------------------------


def test_skip_yields_none_and_fail_raises_contended_while_another_lane_holds(
    sl: SessionLane, path: str
) -> None:
    with sl.lane("channel").lease(path) as held:
        assert held is not None
        heartbeat = sl.lane("heartbeat", priority="background")
        with heartbeat.lease(path, on_contention="skip") as skipped:
            assert skipped is None
        with pytest.raises(Contended) as caught:
            heartbeat.acquire(path, on_contention="fail")
        assert caught.value.code == "contended"
        assert caught.value.path == os.path.realpath(path)
        status = file_status(sl, path)
        assert status.queue == []  # neither skip nor fail queued anything
        assert status.counters["skips"] == 1 and status.counters["contended"] == 1
    with sl.lane("heartbeat").lease(path, on_contention="fail") as free:
        assert free is not None


def test_wait_timeout_expiry_raises_lease_timeout(sl: SessionLane, path: str) -> None:
    with sl.lane("channel").lease(path):
        started = time.monotonic()
        with pytest.raises(LeaseTimeout) as caught:
            sl.lane("cron").acquire(path, wait_timeout=0.2)
        assert time.monotonic() - started >= 0.2
        assert caught.value.code == "lease_timeout"
        assert file_status(sl, path).queue == []


def test_a_full_queue_raises_queue_full(
    sl: SessionLane, other: SessionLane, path: str, pool: ThreadPoolExecutor
) -> None:
    holder = sl.lane("channel").acquire(path)
    assert holder is not None
    waiter = pool.submit(other.lane("waiter").acquire, path, wait_timeout=10.0)
    wait_queued(sl, path, 1)  # max_queue=1: the queue is full now
    with pytest.raises(QueueFull) as caught:
        sl.lane("one-too-many").acquire(path, wait_timeout=10.0)
    assert caught.value.code == "queue_full"
    holder.release()
    granted = waiter.result(timeout=10)
    assert granted is not None and granted.fence > holder.fence


def test_the_same_lane_name_on_two_connections_is_two_lanes(
    sl: SessionLane, other: SessionLane, path: str, pool: ThreadPoolExecutor
) -> None:
    mine = sl.lane("agent:main:main").acquire(path)
    assert mine is not None
    with pytest.raises(Contended):  # not a reentrant grant: a name is no credential
        other.lane("agent:main:main").acquire(path, on_contention="fail")
    theirs: Future[Lease | None] = pool.submit(other.lane("agent:main:main").acquire, path)
    wait_queued(sl, path)
    assert not theirs.done()
    mine.release()
    granted = theirs.result(timeout=10)
    assert granted is not None
    assert granted.id != mine.id and granted.fence > mine.fence
    granted.release()


def test_a_laneless_append_is_queued_behind_the_holder(
    sl: SessionLane, other: SessionLane, path: str, pool: ThreadPoolExecutor
) -> None:
    turn = sl.lane("channel").acquire(path)
    assert turn is not None
    turn.append({"turn": "user"})
    cron = pool.submit(other.lane("cron").append, path, {"cron": "tick"})
    queued = wait_queued(sl, path)
    assert [(q.lane, q.purpose) for q in queued.queue] == [("cron", "write")]
    assert lines(path) == [{"turn": "user"}]  # the short write waits ...
    turn.append({"turn": "assistant"})
    turn.release()
    result = cron.result(timeout=10)  # ... and lands after the whole turn
    assert result.lines == 1 and result.fence > turn.fence
    assert lines(path) == [{"turn": "user"}, {"turn": "assistant"}, {"cron": "tick"}]


def test_status_shows_the_holder_and_the_queue(
    sl: SessionLane, other: SessionLane, path: str, pool: ThreadPoolExecutor
) -> None:
    with sl.lane("channel").lease(path, purpose="prompt") as lease:
        assert lease is not None
        waiting = pool.submit(other.lane("heartbeat", priority="background").acquire, path, "write")
        status = wait_queued(sl, path)
        assert status.path == os.path.realpath(path) and status.fence == lease.fence
        assert status.holder is not None
        assert (status.holder.lane, status.holder.lease, status.holder.purpose) == (
            "channel",
            lease.id,
            "prompt",
        )
        (entry,) = status.queue
        assert (entry.lane, entry.purpose, entry.priority) == ("heartbeat", "write", "background")
        assert any(f.path == status.path for f in sl.status().files)
    heartbeat = waiting.result(timeout=10)
    assert heartbeat is not None
    heartbeat.release()


# Errors ------------------------------------------------------------------------------------


def test_paths_outside_the_roots_raise_path_not_allowed_and_create_nothing(
    sl: SessionLane, root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.jsonl"
    lane = sl.lane("agent")
    for bad in (str(outside), str(root / ".." / "escape.jsonl"), str(root / "notes.txt")):
        with pytest.raises(PathNotAllowed) as caught:
            lane.acquire(bad)
        assert caught.value.code == "path_not_allowed" and caught.value.path
        with pytest.raises(PathNotAllowed):
            lane.append(bad, {"x": 1})
    assert not outside.exists()
    assert not (root.parent / "escape.jsonl").exists()
    assert not (root / "notes.txt").exists()


def test_an_invalid_record_refuses_the_whole_batch(sl: SessionLane, path: str) -> None:
    with sl.lane("agent").lease(path) as lease:
        assert lease is not None
        lease.append({"ok": 0})
        batches: list[list[dict[str, Any]]] = [
            [{"ok": 1}, {"bad": float("nan")}],
            [{"ok": 1}, {"big": "x" * MAX_RECORD_BYTES}],
            [],
        ]
        for batch in batches:
            with pytest.raises(InvalidRecord) as caught:
                lease.append(*batch)
            assert caught.value.code == "invalid_record"
        assert lease.revoked is None
        lease.append({"ok": 2})  # the lease is fine after a refused batch
    assert lines(path) == [{"ok": 0}, {"ok": 2}]


def test_a_max_hold_revoke_sets_revoked_and_later_writes_fail(sl: SessionLane, path: str) -> None:
    lease = sl.lane("agent").acquire(path, max_hold=0.3)
    assert lease is not None
    lease.append({"n": 1})
    eventually(lambda: lease.revoked == "max_hold", "the revoked event")
    with pytest.raises(LeaseRevoked) as caught:
        lease.append({"n": 2})  # refused by the client: nothing sent
    assert "max_hold" in caught.value.detail
    # The same fence from a holder that has not heard yet: the service refuses it.
    with pytest.raises(StaleFence) as stale:
        forged(sl, lease, lane="agent").append({"n": 3})
    assert stale.value.code == "stale_fence"
    assert lines(path) == [{"n": 1}]
    with sl.lane("next").lease(path) as after:
        assert after is not None and after.fence > lease.fence
    with pytest.raises(LeaseRevoked):
        lease.release()
    lease.release(quiet=True)  # what the ``with`` block does on exit


def test_a_release_by_a_non_holder_raises_not_holder(
    sl: SessionLane, other: SessionLane, path: str
) -> None:
    with sl.lane("agent").lease(path) as lease:
        assert lease is not None
        with pytest.raises(NotHolder) as caught:
            forged(other, lease, lane="agent").release()
        assert caught.value.code == "not_holder"
        holder = file_status(sl, path).holder
        assert holder is not None and holder.lease == lease.id  # still held
        lease.append({"still": "mine"})
    assert lines(path) == [{"still": "mine"}]


@pytest.mark.parametrize(
    "cls",
    [
        SessionLaneError,
        LeaseTimeout,
        Contended,
        LeaseRevoked,
        StaleFence,
        NotHolder,
        PathNotAllowed,
        InvalidRecord,
        QueueFull,
        TooLarge,
        Unauthorized,
        BadFrame,
        Unavailable,
        ShuttingDown,
    ],
)
def test_exceptions_pickle_with_their_fields(cls: type[SessionLaneError]) -> None:
    error = cls("what happened", path="/sessions/a.jsonl")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls
    assert (copy.code, copy.detail, copy.path) == (error.code, "what happened", error.path)
    assert str(copy) == str(error)
    assert isinstance(copy, SessionLaneError)


def test_every_wire_code_maps_to_its_exception() -> None:
    expected = {
        "lease_timeout": LeaseTimeout,
        "contended": Contended,
        "stale_fence": StaleFence,
        "not_holder": NotHolder,
        "path_not_allowed": PathNotAllowed,
        "invalid_record": InvalidRecord,
        "too_large": TooLarge,
        "unauthorized": Unauthorized,
        "bad_frame": BadFrame,
        "queue_full": QueueFull,
        "unavailable": Unavailable,
        "shutting_down": ShuttingDown,
    }
    for code in ERROR_CODES:
        error = error_for(code, "d", "/p")
        assert error.code == code and error.detail == "d" and error.path == "/p"
        assert type(error) is expected.get(code, type(error))
        assert pickle.loads(pickle.dumps(error)).code == code
    assert set(expected) <= ERROR_CODES


def test_an_error_raised_by_the_service_pickles_with_its_fields(sl: SessionLane, path: str) -> None:
    with sl.lane("a").lease(path), pytest.raises(Contended) as caught:
        sl.lane("b").acquire(path, on_contention="fail")
    copy = pickle.loads(pickle.dumps(caught.value))
    assert type(copy) is Contended
    assert (copy.code, copy.detail, copy.path) == (
        "contended",
        caught.value.detail,
        caught.value.path,
    )
    assert copy.path == os.path.realpath(path)


# Recovery and abandon ----------------------------------------------------------------------


def test_recovery_asks_the_holder_to_abort_then_revokes_it(
    sl: SessionLane, other: SessionLane, path: str, pool: ThreadPoolExecutor
) -> None:
    stuck = sl.lane("agent:main:main").acquire(path)
    assert stuck is not None
    stuck.append({"turn": "stuck"})
    recovery: Future[Lease] = pool.submit(other.recover, path, "stuck", 0.3)
    eventually(lambda: stuck.abort_requested, "abort_requested")
    assert stuck.revoked is None  # asked first, revoked only after the grace
    rescued = recovery.result(timeout=10)
    assert rescued.purpose == "recovery" and rescued.fence > stuck.fence
    eventually(lambda: stuck.revoked == "recovery", "the recovery revocation")
    with pytest.raises(LeaseRevoked):
        stuck.append({"turn": "too late"})
    rescued.append({"recovered": True})
    rescued.release()
    assert lines(path) == [{"turn": "stuck"}, {"recovered": True}]


def test_a_holder_that_releases_on_abort_hands_over_without_revocation(
    sl: SessionLane, other: SessionLane, path: str, pool: ThreadPoolExecutor
) -> None:
    holder = sl.lane("agent").acquire(path)
    assert holder is not None
    recovery: Future[Lease] = pool.submit(other.recover, path, "stuck", 30.0)
    eventually(lambda: holder.abort_requested, "abort_requested")
    holder.release()
    rescued = recovery.result(timeout=10)  # well within the 30 s grace
    assert rescued.purpose == "recovery"
    assert holder.revoked is None
    assert file_status(other, path).counters["revocations"] == 0
    rescued.release()


def test_recover_returns_a_recovery_lease(sl: SessionLane, path: str) -> None:
    lease = sl.recover(path, reason="stuck", grace=1.0)
    assert lease.purpose == "recovery" and lease.revoked is None
    holder = file_status(sl, path).holder
    assert holder is not None and (holder.lease, holder.purpose) == (lease.id, "recovery")
    assert lease.append({"repair": 1}).lines == 1
    lease.release()
    assert file_status(sl, path).holder is None
    assert lines(path) == [{"repair": 1}]


def test_abandon_returns_the_leases_and_frees_the_paths(
    sl: SessionLane, other: SessionLane, path: str
) -> None:
    second = path.replace(".jsonl", "_2.jsonl")
    lane = sl.lane("agent")
    a = lane.acquire(path)
    b = lane.acquire(second)
    assert a is not None and b is not None
    assert lane.abandon(second) == [b.id]
    assert b.revoked == "abandoned" and a.revoked is None
    assert sorted(lane.abandon()) == [a.id]
    assert a.revoked == "abandoned"
    with pytest.raises(LeaseRevoked):
        a.append({"after": "abandon"})
    for p in (path, second):
        with other.lane("agent").lease(p, on_contention="fail") as free:
            assert free is not None
    assert lane.abandon() == []
    assert not os.path.exists(path) or lines(path) == []


# Connections -------------------------------------------------------------------------------


def test_an_idle_connection_is_kept_alive(sl: SessionLane, service: Service, path: str) -> None:
    lease = sl.lane("agent").acquire(path)
    assert lease is not None
    # A raw connection that says hello and then nothing is dropped by the service ...
    host, port = service.address.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        body = encode(Hello(id=1, client="silent"))
        raw.sendall(HEADER.pack(len(body)) + body)
        while raw.recv(4096):  # the welcome, then EOF once the keepalive limit passed
            pass
    # ... the client, just as idle meanwhile, kept its connection and its lease.
    assert lease.revoked is None
    assert lease.append({"alive": True}).lines == 1
    lease.release()


def test_a_lost_socket_revokes_the_lease_and_writes_nothing(
    sl: SessionLane, other: SessionLane, path: str
) -> None:
    lease = sl.lane("agent").acquire(path)
    assert lease is not None
    lease.append({"n": 1})
    sock = sl._sock
    assert sock is not None
    # The connection breaks underneath the client, sending side first: the next send fails
    # before the reader thread has heard of it (the harder case).
    sock.shutdown(socket.SHUT_WR)
    with pytest.raises(LeaseRevoked):
        lease.append({"n": 2})
    assert lease.revoked == "connection_lost"
    # The service abandoned the lease with the connection: another lane gets the path.
    with other.lane("next").lease(path, wait_timeout=10.0) as after:
        assert after is not None and after.fence > lease.fence
    assert lines(path) == [{"n": 1}]
    # The next call reconnects.
    assert sl.lane("agent").append(path, {"n": 3}).lines == 1
    assert lines(path) == [{"n": 1}, {"n": 3}]


def test_a_stopped_service_revokes_the_lease_and_a_new_one_is_reconnected_to(
    tmp_path: Path,
) -> None:
    roots = [str(tmp_path)]
    listen = f"tcp://127.0.0.1:{free_port()}"
    path = str(tmp_path / "restart.jsonl")
    with embedded_service(roots, listen=listen, log_file=tmp_path / "first.log") as first:
        sl = connect(first.address, keepalive=CLIENT_KEEPALIVE, reconnect_for=10.0)
        lease = sl.lane("agent").acquire(path)
        assert lease is not None
        lease.append({"n": 1})
        first.stop()
        with pytest.raises(LeaseRevoked):
            lease.append({"n": 2})
        assert lease.revoked is not None
        assert lines(path) == [{"n": 1}]
    try:
        with embedded_service(roots, listen=listen, log_file=tmp_path / "second.log"):
            assert sl.status(path).files == []  # reconnected: a new service, nothing active
            with sl.lane("agent").lease(path) as again:
                assert again is not None
                assert again.fence > lease.fence  # fences persist across services
                again.append({"n": 3})
            with pytest.raises(LeaseRevoked):
                lease.append({"n": 4})  # the old lease stays dead on the new connection
    finally:
        sl.close()
    assert lines(path) == [{"n": 1}, {"n": 3}]


def test_concurrent_threads_share_one_connection(
    sl: SessionLane, path: str, pool: ThreadPoolExecutor
) -> None:
    barrier = threading.Barrier(4)

    def write(n: int) -> int:
        barrier.wait(timeout=10)
        return sl.lane(f"worker-{n}").append(path, *({"w": n, "i": i} for i in range(5))).offset

    offsets = [f.result(timeout=10) for f in [pool.submit(write, n) for n in range(4)]]
    records = lines(path)
    assert len(records) == 20 and len(set(offsets)) == 4
    # Each batch is contiguous: short writes never interleave.
    for start in range(0, 20, 5):
        assert len({r["w"] for r in records[start : start + 5]}) == 1


def test_a_closed_client_refuses_calls(service: Service, path: str) -> None:
    sl = connect(service.address)
    lease = sl.lane("agent").acquire(path)
    assert lease is not None
    sl.close()
    assert lease.revoked == "connection_closed"
    with pytest.raises(LeaseRevoked):
        lease.append({"x": 1})
    with pytest.raises(Unavailable):
        sl.status()


def test_a_unix_socket_with_a_token_refuses_clients_without_it(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    token_file.chmod(0o600)
    with tempfile.TemporaryDirectory(prefix="sl-", dir="/tmp") as short:  # sun_path is short
        listen = f"unix://{short}/gw.sock"
        path = str(tmp_path / "unix.jsonl")
        with embedded_service(
            [str(tmp_path)], listen=listen, token_file=str(token_file), log_file=tmp_path / "log"
        ) as svc:
            with pytest.raises(Unauthorized):
                connect(svc.address)
            with pytest.raises(Unauthorized):
                connect(svc.address, token="wrong")
            with connect(svc.address, token="s3cret") as sl:
                assert sl.lane("agent").append(path, {"via": "unix"}).lines == 1
    assert lines(path) == [{"via": "unix"}]


def test_connecting_to_nothing_raises_unavailable_after_bounded_retries() -> None:
    started = time.monotonic()
    with pytest.raises(Unavailable):
        connect(f"tcp://127.0.0.1:{free_port()}", reconnect_for=0.3)
    assert time.monotonic() - started < 5.0


def test_an_acquire_given_up_on_releases_its_late_grant(
    clients: Callable[[], SessionLane], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import system.client._sync as client_module
    from messages.wire import Acquire as AcquireRequest

    sl, other = clients(), clients()
    holder = sl.lane("channel").acquire(path)
    assert holder is not None
    # The service would wait its default (minutes); this caller gives up after 0.2 s.
    monkeypatch.setattr(client_module, "_REPLY_MARGIN_S", 0.0)
    impatient = AcquireRequest(lane="impatient", path=path, purpose="prompt")
    with pytest.raises(Unavailable):
        other._request(impatient, timeout=0.2)
    wait_queued(sl, path)
    holder.release()

    # The grant goes to the request nobody waits for; the client hands it straight back.
    def free() -> bool:
        status = file_status(sl, path)
        return status.holder is None and status.counters["grants"] == 2

    eventually(free, "the orphaned grant to be released")
    with other.lane("next").lease(path, on_contention="fail") as lease:
        assert lease is not None


# What the client refuses before sending; addresses; logging -------------------------------

UNSTORABLE: list[tuple[str, list[Any]]] = [
    ("a set", [{"tags": {1, 2}}]),
    ("bytes", [{"blob": b"\x00\x01"}]),
    ("a list, not an object", [["a"]]),
    ("a string, not an object", ["text"]),
    ("a non-string key", [{1: "one"}]),
    ("a non-string nested key", [{"meta": {("a", "b"): 1}}]),
    ("NaN", [{"score": float("nan")}]),
    ("infinity", [{"score": float("-inf")}]),
    ("an integer msgpack cannot carry", [{"n": 2**70}]),
    ("a lone surrogate", [{"text": "\ud800"}]),
    ("an object", [{"when": object()}]),
    ("nesting past the limit", [{"deep": json.loads("[" * 150 + "]" * 150)}]),
    ("a record over max_record_bytes", [{"big": "x" * MAX_RECORD_BYTES}]),
    ("a good record before a bad one", [{"ok": 1}, {"tags": {3}}]),
    ("an empty batch", []),
]


@pytest.mark.parametrize(
    "records", [records for _, records in UNSTORABLE], ids=[name for name, _ in UNSTORABLE]
)
def test_a_record_that_cannot_be_stored_raises_invalid_record_before_anything_is_sent(
    service: Service, path: str, records: list[Any]
) -> None:
    with connect(service.address, max_record_bytes=MAX_RECORD_BYTES) as sl:
        lane = sl.lane("agent")
        with lane.lease(path) as lease:
            assert lease is not None
            lease.append({"n": 1})
            with pytest.raises(InvalidRecord) as on_lease:
                lease.append(*records)
            with pytest.raises(InvalidRecord):
                lease.rewrite(records or [["not an object"]])
            # Nothing reached the service (it counts the records it refuses) ...
            assert file_status(sl, path).counters["invalid_records"] == 0
            # ... and the lease and its connection go on as if nothing happened.
            assert lease.revoked is None
            assert lease.append({"n": 2}).lines == 1
        with pytest.raises(InvalidRecord):
            lane.append(path, *records)
        assert lane.append(path, {"n": 3}).lines == 1
    assert isinstance(on_lease.value, SessionLaneError)
    assert on_lease.value.code == "invalid_record"
    assert lines(path) == [{"n": 1}, {"n": 2}, {"n": 3}]


def test_a_batch_over_max_frame_bytes_raises_too_large_and_the_lease_keeps_holding(
    sl: SessionLane, path: str
) -> None:
    # Each record is within the service's max_record_bytes; together they exceed its frame
    # limit (8 MiB), which would make the service drop the connection and with it the lease.
    record = {"chunk": "x" * (MAX_RECORD_BYTES - 64)}
    batch = [record] * (8 * 1024 * 1024 // (MAX_RECORD_BYTES - 64) + 16)
    with sl.lane("agent").lease(path) as lease:
        assert lease is not None
        with pytest.raises(TooLarge, match="nothing sent"):
            lease.append(*batch)
        assert lease.revoked is None
        assert lease.append({"after": "too large"}).lines == 1
    assert lines(path) == [{"after": "too large"}]


def test_connecting_to_nothing_fails_at_once_unless_asked_to_keep_trying() -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(Unavailable, match="Connection refused"):
        connect(address)
    assert time.monotonic() - started < 2.0  # one attempt, no retries (was 10.7 s)


def test_reconnect_for_keeps_trying_until_the_service_comes_up(
    tmp_path: Path, pool: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    listen = f"tcp://127.0.0.1:{free_port()}"
    refused = threading.Event()
    real_open = SessionLane._open

    def observed_open(self: SessionLane) -> None:
        try:
            real_open(self)
        except ConnectionRefusedError:
            refused.set()
            raise

    monkeypatch.setattr(SessionLane, "_open", observed_open)
    waiting = pool.submit(connect, listen, reconnect_for=60.0)
    assert refused.wait(30), "the first attempt was refused"
    with (
        embedded_service([str(tmp_path)], listen=listen, log_file=tmp_path / "log"),
        waiting.result(timeout=60) as sl,
    ):
        assert sl.lane("late").append(str(tmp_path / "late.jsonl"), {"n": 1}).lines == 1


def test_every_address_spelling_reaches_the_service(service: Service, path: str) -> None:
    host_port = service.address.removeprefix("tcp://")
    for spelling in (service.address, host_port, f" {host_port} "):
        with connect(spelling) as sl:
            sl.lane("spelling").append(path, {"via": spelling.strip()})
    assert [r["via"] for r in lines(path)] == [service.address, host_port, host_port]


def test_a_malformed_address_raises_value_error_naming_the_accepted_forms() -> None:
    for address in ("localhost", "http://127.0.0.1:80", "unix:relative.sock"):
        with pytest.raises(ValueError, match=r"HOST:PORT, tcp://HOST:PORT or unix:///"):
            connect(address)
    with pytest.raises(ValueError, match="IPv6 host must be in brackets"):
        connect("::1:7420")


def test_connect_without_an_address_uses_sessionlane_listen(
    service: Service, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from system.client._core import default_address

    monkeypatch.delenv("SESSIONLANE_LISTEN", raising=False)
    assert default_address() == "tcp://127.0.0.1:7420"
    monkeypatch.setenv("SESSIONLANE_LISTEN", service.address.removeprefix("tcp://"))
    with connect() as sl:
        assert sl.lane("env").append(path, {"via": "env"}).lines == 1


def test_a_token_read_from_a_file_with_its_trailing_newline_is_accepted(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    token_file.chmod(0o600)
    path = str(tmp_path / "token.jsonl")
    with embedded_service(
        [str(tmp_path)], token_file=str(token_file), log_file=tmp_path / "log"
    ) as svc:
        with connect(svc.address, token=token_file.read_text()) as sl:
            assert sl.lane("agent").append(path, {"token": "file"}).lines == 1
        with pytest.raises(Unauthorized):
            connect(svc.address, token="s3cret-not")
    assert lines(path) == [{"token": "file"}]


LOST_CONNECTION = """
import socket, sys, time
{setup}
from system.client import connect

sl = connect(sys.argv[1])
sock = sl._sock
sock.shutdown(socket.SHUT_RDWR)  # the connection breaks under the client
deadline = time.monotonic() + 30
while sl._sock is sock and time.monotonic() < deadline:  # the reader reports it lost
    time.sleep(0.01)
print("lost" if sl._sock is not sock else "not lost", flush=True)
sl.close()
"""


@pytest.mark.parametrize("host_logging", [False, True], ids=["unconfigured", "configured"])
def test_a_lost_connection_is_logged_never_printed_to_the_hosts_stderr(
    service: Service, host_logging: bool
) -> None:
    setup = "import logging; logging.basicConfig(level=logging.WARNING)" if host_logging else ""
    result = subprocess.run(
        [sys.executable, "-c", LOST_CONNECTION.format(setup=setup), service.address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "lost"
    if host_logging:  # the warning exists, as a log record of the client's module logger
        assert "WARNING:system.client:sessionlane tcp://" in result.stderr
    else:  # and a host that configured no logging sees nothing on its stderr
        assert result.stderr == ""
