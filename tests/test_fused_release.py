"""Append and release (``Append.release``): a turn's last append carries its release.

Real embedded service, real processes, real files, through both client surfaces (the
``client`` fixture of ``client_surfaces``) and both routes (the gateway, and the file's direct
channel). Orderings are forced with the service's own state (``status`` shows a waiter queued)
and the replies themselves, never with sleeps.
"""

# ruff: noqa: F811  (the fixtures of client_surfaces are imported, then named as arguments)

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
from pydantic import ValidationError
from test_gateway import RawConn

from sessionlane.messages.errors import LeaseRevoked, StaleFence
from sessionlane.messages.wire import Append, Appended, Error

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(60)]


def fused_handoff(
    client: Surface, make: Callable[[], Any], pool: ThreadPoolExecutor, path: str, **kw: Any
) -> tuple[Any, Any, Any]:
    """A holder appends and releases in one call while another connection's lane waits:
    (the holder's result, the holder's lease, the waiter's lease)."""
    holder_conn, waiter_conn = make(), make()
    lease = holder_conn.lane("holder").acquire(path, purpose="prompt")
    assert lease is not None
    lease.append({"turn": "holder", "n": 0})
    waiting = pool.submit(waiter_conn.lane("waiter").acquire, path, purpose="prompt")
    wait_queued(holder_conn, path)
    result = lease.append({"turn": "holder", "n": 1}, release=True, **kw)
    granted = waiting.result(timeout=30)
    assert granted is not None and granted.fence > lease.fence
    return result, lease, granted


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "gateway"])
def test_an_append_that_releases_hands_the_file_to_the_queued_waiter(
    client: Surface, service: Any, pool: ThreadPoolExecutor, path: str, direct: bool
) -> None:
    opened: list[Any] = []

    def make() -> Any:
        sl = client.connect(service.address, timeout=10.0, direct=direct)
        opened.append(sl)
        return sl

    try:
        result, lease, granted = fused_handoff(client, make, pool, path)
        assert (result.lines, result.fence) == (1, lease.fence)
        assert result.offset == len(b'{"turn":"holder","n":0}\n')
        holder = file_status(opened[0], path).holder
        assert holder is not None and (holder.lane, holder.lease) == ("waiter", granted.id)
        # Released here too: the client refuses to send, the service refuses the old fence.
        with pytest.raises(LeaseRevoked):
            lease.append({"turn": "holder", "late": True})
        with pytest.raises(StaleFence):
            client.forged(opened[0], lease, lane="holder").append({"turn": "holder", "late": 2})
        lease.release()  # nothing to do: released by its append
        granted.append({"turn": "waiter"})
        granted.release()
        assert bool(opened[0].core.direct.links) == direct
    finally:
        for sl in opened:
            sl.close()
    assert lines(path) == [
        {"turn": "holder", "n": 0},
        {"turn": "holder", "n": 1},
        {"turn": "waiter"},
    ]


def test_with_flush_durability_the_release_still_follows_the_write(
    client: Surface, clients: Callable[[], Any], pool: ThreadPoolExecutor, path: str
) -> None:
    result, _, granted = fused_handoff(client, clients, pool, path, durability="flush")
    assert result.lines == 1
    granted.release()
    assert [r["n"] for r in lines(path)] == [0, 1]


def test_a_with_block_ends_quietly_after_an_append_that_released(sl: Any, path: str) -> None:
    with sl.lane("agent").lease(path) as lease:
        assert lease is not None
        lease.append({"n": 1}, release=True)
        assert file_status(sl, path).holder is None  # free before the block ends
    with sl.lane("agent").lease(path) as again:
        assert again is not None and again.fence > lease.fence
    assert lines(path) == [{"n": 1}]


def test_a_refused_append_that_would_release_keeps_the_lease(
    client: Surface, sl: Any, path: str
) -> None:
    with sl.lane("agent").lease(path) as lease:
        assert lease is not None
        too_big = {"pad": "x" * (MAX_RECORD_BYTES + 1)}
        refused = [
            # an oversized record (sent as is: the client would refuse it before sending)
            Append(lease=lease.id, fence=lease.fence, records=[too_big], release=True),
            # a stale fence
            Append(lease=lease.id, fence=lease.fence - 1, records=[{"n": 0}], release=True),
        ]
        for request in refused:
            reply = client.request(sl, request, 10.0)
            assert isinstance(reply, Error), reply
            assert reply.code in ("invalid_record", "stale_fence")
            holder = file_status(sl, path).holder
            assert holder is not None and holder.lease == lease.id  # still held
        assert lease.revoked is None
        lease.append({"n": 1})
    assert lines(path) == [{"n": 1}]


def test_a_reentrant_lease_releases_one_level_per_append(sl: Any, path: str) -> None:
    lane = sl.lane("agent")
    outer = lane.acquire(path)
    assert outer is not None
    with lane.lease(path) as inner:
        assert inner is not None and inner.id == outer.id
        inner.append({"level": "inner"}, release=True)
        with pytest.raises(LeaseRevoked):  # that level is released ...
            inner.append({"level": "inner, after its release"})
    holder = file_status(sl, path).holder
    assert holder is not None and holder.lease == outer.id  # ... the outer one holds
    outer.append({"level": "outer"}, release=True)
    assert file_status(sl, path).holder is None
    outer.release()  # nothing left to release: no error
    assert lines(path) == [{"level": "inner"}, {"level": "outer"}]


def test_a_pipeline_whose_last_append_releases_hands_over_after_all_are_written(
    client: Surface, sl: Any, other: Any, pool: ThreadPoolExecutor, path: str
) -> None:
    lease = sl.lane("holder").acquire(path)
    assert lease is not None
    waiting = pool.submit(other.lane("waiter").acquire, path)
    wait_queued(sl, path)
    results = lease.append_pipelined([{"n": n} for n in range(40)], window=8, release=True)
    assert [r.lines for r in results] == [1] * 40
    granted = waiting.result(timeout=30)
    assert granted is not None and granted.fence > lease.fence
    granted.append({"n": "waiter"})
    granted.release()
    with pytest.raises(LeaseRevoked):
        lease.append({"n": "late"})
    assert [r["n"] for r in lines(path)] == [*range(40), "waiter"]


def test_an_append_resent_after_it_released_is_answered_as_it_was(
    client: Surface, sl: Any, path: str
) -> None:
    lease = sl.lane("agent").acquire(path)
    assert lease is not None
    request = Append(
        lease=lease.id,
        fence=lease.fence,
        records=[{"n": 1}],
        aid=secrets.token_hex(8),
        release=True,
    )
    first = client.request(sl, request, 10.0)
    again = client.request(sl, request.model_copy(update={"id": None}), 10.0)
    assert isinstance(first, Appended) and first.released
    assert isinstance(again, Appended) and again.released
    assert (again.offset, again.lines, again.fence) == (first.offset, first.lines, first.fence)
    assert file_status(sl, path).holder is None
    assert lines(path) == [{"n": 1}]


def test_release_needs_a_lease_and_a_fence() -> None:
    with pytest.raises(ValidationError, match="release"):
        Append(lane="agent", path="/x.jsonl", records=[{}], release=True)
    Append(lane="agent", path="/x.jsonl", records=[{}], release=False)  # false: no release


def test_the_gateway_refuses_an_append_that_would_release_without_a_lease(
    service: Any, path: str
) -> None:
    conn = RawConn(service.address)
    try:
        assert conn.request({"type": "hello", "client": "raw"})["type"] == "welcome"
        lane_less = {"type": "append", "lane": "a", "path": path, "records": [{}], "release": True}
        reply = conn.request(lane_less)
        assert (reply["type"], reply["code"]) == ("error", "bad_frame"), reply
        assert "release" in reply["detail"]
        not_a_bool = {"type": "append", "lease": "x-1", "fence": 1, "records": [{}], "release": 1}
        reply = conn.request(not_a_bool)
        assert (reply["type"], reply["code"]) == ("error", "bad_frame"), reply
    finally:
        conn.close()
    assert not os.path.exists(path)  # nothing created
