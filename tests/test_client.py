"""The Python client's leases, contention, errors and recovery, on both surfaces.

Every test runs once through ``connect`` (sync) and once through ``connect_async`` (the
``client`` fixture of ``client_surfaces``: the asyncio objects behind blocking proxies, their
coroutines run on a loop of their own), against a real embedded service (real processes, real
sockets, real files). One service serves the module; each test works on its own transcript and
its own connections, and closing a connection abandons whatever it held.

Orderings are forced with threads and the service's own state (``status`` shows a request
queued before the test goes on), never with sleeps; waiting for an event is a bounded poll.
The connections themselves are in ``test_client_connections.py``, the I/O-free core in
``test_client_core.py``.
"""

# ruff: noqa: F811  (the fixtures of client_surfaces are imported, then named as arguments)

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from client_surfaces import (  # noqa: F401 (fixtures)
    MAX_RECORD_BYTES,
    Surface,
    client,
    clients,
    file_status,
    lines,
    other,
    path,
    pool,
    root,
    service,
    sl,
    wait_queued,
)
from waiting import eventually

from sessionlane.messages.errors import (
    Contended,
    InvalidRecord,
    LeaseRevoked,
    LeaseTimeout,
    NotHolder,
    PathNotAllowed,
    QueueFull,
    StaleFence,
)

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(60)]


# Leases ------------------------------------------------------------------------------------


def test_a_lease_block_acquires_appends_durably_and_releases(sl: Any, path: str) -> None:
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


def test_a_compaction_lease_rewrites_the_whole_file(sl: Any, path: str) -> None:
    lane = sl.lane("compactor")
    lane.append(path, {"n": 1}, {"n": 2}, {"n": 3})
    with lane.lease(path, purpose="compaction") as lease:
        assert lease is not None
        assert lease.rewrite([{"summary": "1-3"}]) == 1
    assert lines(path) == [{"summary": "1-3"}]


def test_relative_paths_resolve_against_the_callers_cwd(
    client: Surface, sl: Any, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = root / f"relative-{client.name}"
    sub.mkdir()
    monkeypatch.chdir(sub)
    result = sl.lane("cron").append("rel.jsonl", {"where": "cwd"})
    assert result.lines == 1
    assert lines(str(sub / "rel.jsonl")) == [{"where": "cwd"}]
    assert not (root / "rel.jsonl").exists()  # not the service's idea of relative
    with sl.lane("cron").lease("rel.jsonl") as lease:
        assert lease is not None and lease.path == str(sub / "rel.jsonl")


def test_a_nested_lease_shares_its_state_and_the_outer_level_keeps_holding(
    sl: Any, path: str
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
    sl: Any, path: str
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


def test_wait_timeout_expiry_raises_lease_timeout(sl: Any, path: str) -> None:
    with sl.lane("channel").lease(path):
        started = time.monotonic()
        with pytest.raises(LeaseTimeout) as caught:
            sl.lane("cron").acquire(path, wait_timeout=0.2)
        assert time.monotonic() - started >= 0.2
        assert caught.value.code == "lease_timeout"
        assert file_status(sl, path).queue == []


def test_a_full_queue_raises_queue_full(
    sl: Any, other: Any, path: str, pool: ThreadPoolExecutor
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
    sl: Any, other: Any, path: str, pool: ThreadPoolExecutor
) -> None:
    mine = sl.lane("agent:main:main").acquire(path)
    assert mine is not None
    with pytest.raises(Contended):  # not a reentrant grant: a name is no credential
        other.lane("agent:main:main").acquire(path, on_contention="fail")
    theirs: Future[Any] = pool.submit(other.lane("agent:main:main").acquire, path)
    wait_queued(sl, path)
    assert not theirs.done()
    mine.release()
    granted = theirs.result(timeout=10)
    assert granted is not None
    assert granted.id != mine.id and granted.fence > mine.fence
    granted.release()


def test_a_laneless_append_is_queued_behind_the_holder(
    sl: Any, other: Any, path: str, pool: ThreadPoolExecutor
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
    sl: Any, other: Any, path: str, pool: ThreadPoolExecutor
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
    sl: Any, root: Path, tmp_path: Path
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


def test_an_invalid_record_refuses_the_whole_batch(sl: Any, path: str) -> None:
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


def test_a_max_hold_revoke_sets_revoked_and_later_writes_fail(
    client: Surface, sl: Any, path: str
) -> None:
    lease = sl.lane("agent").acquire(path, max_hold=0.3)
    assert lease is not None
    lease.append({"n": 1})
    eventually(lambda: lease.revoked == "max_hold", "the revoked event")
    with pytest.raises(LeaseRevoked) as caught:
        lease.append({"n": 2})  # refused by the client: nothing sent
    assert "max_hold" in caught.value.detail
    # The same fence from a holder that has not heard yet: the service refuses it.
    with pytest.raises(StaleFence) as stale:
        client.forged(sl, lease, lane="agent").append({"n": 3})
    assert stale.value.code == "stale_fence"
    assert lines(path) == [{"n": 1}]
    with sl.lane("next").lease(path) as after:
        assert after is not None and after.fence > lease.fence
    with pytest.raises(LeaseRevoked):
        lease.release()
    lease.release(quiet=True)  # what the ``with`` block does on exit


def test_a_release_by_a_non_holder_raises_not_holder(
    client: Surface, sl: Any, other: Any, path: str
) -> None:
    with sl.lane("agent").lease(path) as lease:
        assert lease is not None
        with pytest.raises(NotHolder) as caught:
            client.forged(other, lease, lane="agent").release()
        assert caught.value.code == "not_holder"
        holder = file_status(sl, path).holder
        assert holder is not None and holder.lease == lease.id  # still held
        lease.append({"still": "mine"})
    assert lines(path) == [{"still": "mine"}]


def test_an_error_raised_by_the_service_pickles_with_its_fields(sl: Any, path: str) -> None:
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
    sl: Any, other: Any, path: str, pool: ThreadPoolExecutor
) -> None:
    stuck = sl.lane("agent:main:main").acquire(path)
    assert stuck is not None
    stuck.append({"turn": "stuck"})
    recovery: Future[Any] = pool.submit(other.recover, path, "stuck", 0.3)
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
    sl: Any, other: Any, path: str, pool: ThreadPoolExecutor
) -> None:
    holder = sl.lane("agent").acquire(path)
    assert holder is not None
    recovery: Future[Any] = pool.submit(other.recover, path, "stuck", 30.0)
    eventually(lambda: holder.abort_requested, "abort_requested")
    holder.release()
    rescued = recovery.result(timeout=10)  # well within the 30 s grace
    assert rescued.purpose == "recovery"
    assert holder.revoked is None
    assert file_status(other, path).counters["revocations"] == 0
    rescued.release()


def test_recover_returns_a_recovery_lease(sl: Any, path: str) -> None:
    lease = sl.recover(path, reason="stuck", grace=1.0)
    assert lease.purpose == "recovery" and lease.revoked is None
    holder = file_status(sl, path).holder
    assert holder is not None and (holder.lease, holder.purpose) == (lease.id, "recovery")
    assert lease.append({"repair": 1}).lines == 1
    lease.release()
    assert file_status(sl, path).holder is None
    assert lines(path) == [{"repair": 1}]


def test_abandon_returns_the_leases_and_frees_the_paths(sl: Any, other: Any, path: str) -> None:
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


def test_concurrent_callers_share_one_connection_and_short_writes_never_interleave(
    clients: Callable[[], Any], path: str, pool: ThreadPoolExecutor
) -> None:
    sl = clients()

    def write(n: int) -> int:
        offset: int = (
            sl.lane(f"worker-{n}").append(path, *({"w": n, "i": i} for i in range(5))).offset
        )
        return offset

    # Four callers at once: threads on the sync surface, tasks on the asyncio one.
    offsets = [f.result(timeout=10) for f in [pool.submit(write, n) for n in range(4)]]
    records = lines(path)
    assert len(records) == 20 and len(set(offsets)) == 4
    for start in range(0, 20, 5):  # each batch is contiguous
        assert len({r["w"] for r in records[start : start + 5]}) == 1
