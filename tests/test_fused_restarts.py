"""An append that released its lease (``Append.release``), resent after a kill -9 of the
service's actor system: answered as written and released, never written twice, never taken
for a lost lease.

Real services on one address and root (``test_restarts.Restarts``), raw frames, so that the
resend is exactly the one a client makes after its answer was lost with the service: it asks
for its lease back first (refused: the lease was released before the crash), then resends.
"""

# ruff: noqa: F811  (the restarts fixture is imported, then named as an argument)

from __future__ import annotations

from typing import Any

import pytest
from client_surfaces import lines
from test_gateway import RawConn
from test_restarts import Restarts, crash, restarts, status_of  # noqa: F401 (fixture)

from sessionlane.system.client import connect

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(180)]


def acquire(raw: RawConn, path: str, lane: str, **extra: Any) -> dict[str, Any]:
    return raw.request(
        {"type": "acquire", "lane": lane, "path": path, "purpose": "prompt", **extra}
    )


def test_an_append_that_released_before_a_crash_is_answered_as_written_after_it(
    restarts: Restarts,
) -> None:
    path = str(restarts.root / "fused.jsonl")
    first = restarts.start()
    raw = RawConn(first.address)
    raw.hello()
    granted = acquire(raw, path, "agent")
    assert granted["type"] == "granted", granted
    append = {
        "type": "append",
        "lease": granted["lease"],
        "fence": granted["fence"],
        "records": [{"n": 1}],
        "aid": "aid-00000001",
        "release": True,
    }
    written = raw.request(append)
    assert written["type"] == "appended" and written["released"] is True, written
    raw.close()
    crash(first)  # the answer could have been lost with it: the client resends
    second = restarts.start()
    again = RawConn(second.address)
    try:
        again.hello()
        ticket = {"lease": granted["lease"], "fence": granted["fence"], "secret": granted["secret"]}
        reclaim = acquire(again, path, "agent", reclaim=ticket)
        assert (reclaim["type"], reclaim["code"]) == ("error", "reclaim_refused"), reclaim
        resent = again.request(append)
        assert resent["type"] == "appended" and resent["released"] is True, resent
        assert (resent["offset"], resent["lines"], resent["fence"]) == (
            written["offset"],
            written["lines"],
            written["fence"],
        )
        # Not a lease: a plain append under it is refused, and the file is free.
        plain = again.request({**append, "aid": "aid-00000002", "release": None})
        assert (plain["type"], plain["code"]) == ("error", "stale_fence"), plain
        with connect(second.address) as sl:
            state = status_of(sl, path)
            assert state is not None and state.holder is None
            with sl.lane("next").lease(path) as nxt:
                assert nxt is not None and nxt.fence > granted["fence"]
                nxt.append({"n": 2}, release=True)
    finally:
        again.close()
    assert lines(path) == [{"n": 1}, {"n": 2}]


def test_an_append_that_releases_on_a_reclaimed_lease_releases_it_after_the_crash(
    restarts: Restarts,
) -> None:
    """The holder's lease survives the crash; its next append releases it as usual."""
    path = str(restarts.root / "reclaimed.jsonl")
    first = restarts.start()
    sl = connect(first.address, reconnect_for=60.0)
    try:
        lease = sl.lane("agent").acquire(path, purpose="prompt")
        assert lease is not None
        lease.append({"n": 1})
        crash(first)
        restarts.start()
        result = lease.append({"n": 2}, release=True)  # reclaims, appends, releases
        assert result.fence == lease.fence
        state = status_of(sl, path)
        assert state is not None and state.holder is None
        lease.release()  # released by its append: nothing to do
    finally:
        sl.close()
    assert lines(path) == [{"n": 1}, {"n": 2}]


def test_each_release_of_a_nested_lease_before_a_crash_is_answered_once_after_it(
    restarts: Restarts,
) -> None:
    """A lease three levels deep, two appends that release a level each, a kill -9: resent
    after the reclaim, both are answered as written and neither releases a level again."""
    path = str(restarts.root / "nested.jsonl")
    first = restarts.start()
    raw = RawConn(first.address)
    raw.hello()
    for _ in range(3):
        granted = acquire(raw, path, "agent")
        assert granted["type"] == "granted", granted
    appends = [
        {
            "type": "append",
            "lease": granted["lease"],
            "fence": granted["fence"],
            "records": [{"n": n}],
            "aid": f"aid-0000000{n}",
            "release": True,
        }
        for n in (1, 2)
    ]
    written = [raw.request(append) for append in appends]
    assert all(w["type"] == "appended" and w["released"] is True for w in written), written
    # The connection is closed after the crash, not before it: a gateway that saw it close
    # first would abandon its lane, and the lease would not be there to reclaim.
    crash(first)  # both answers could have been lost with it: the client resends them
    raw.close()
    second = restarts.start()
    again = RawConn(second.address)
    try:
        again.hello()
        ticket = {"lease": granted["lease"], "fence": granted["fence"], "secret": granted["secret"]}
        reclaim = acquire(again, path, "agent", reclaim=ticket)
        assert reclaim["type"] == "granted", reclaim  # one level is still held
        for append, answer in zip(appends, written, strict=True):
            resent = again.request(append)
            assert resent["type"] == "appended" and resent["released"] is True, resent
            assert resent["offset"] == answer["offset"], (resent, answer)
        # The last level is still held: a third append and release is written and frees it.
        third = again.request({**appends[0], "aid": "aid-00000003", "records": [{"n": 3}]})
        assert third["type"] == "appended" and third["released"] is True, third
        with connect(second.address) as sl:
            state = status_of(sl, path)
            assert state is not None and state.holder is None
    finally:
        again.close()
    assert lines(path) == [{"n": 1}, {"n": 2}, {"n": 3}]
