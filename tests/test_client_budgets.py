"""A caller's time budget bounds what the Python client waits for while it rides out a stopped
service (``reconnect_for``), and a lease the service cannot give back is reported lost after
one ride-out window, never several. Both surfaces (the ``client`` fixture), a real service,
a real stop: nothing listens at its address afterwards.

The budgets are small against the ride-out (an acquire's 0.4 s against 60 s), so the bounds
asserted are far from what the client did before (60 s; three windows), not tight timings.
"""

# ruff: noqa: F811  (the fixtures of client_surfaces are imported, then named as arguments)

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from client_surfaces import CLIENT_KEEPALIVE, Surface, client, file_status  # noqa: F401
from waiting import eventually

from sessionlane.messages.errors import LeaseRevoked, LeaseTimeout, Unavailable, UnknownOutcome
from sessionlane.system.runtime.service import embedded_service

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(90)]

RIDE_OUT_S = 60.0
"""The ride-out of the budget tests: far past any budget in them."""
BUDGET_S = 0.4
"""An acquire's budget that must end the acquire long before the ride-out does."""
BOUND_S = 20.0
"""What an acquire given ``BUDGET_S`` may take at most here (the machine is loaded and shared)."""
WINDOW_S = 3.0
"""The ride-out of the lost-lease tests: one window, not two or three."""


def test_an_acquire_made_while_the_service_is_away_ends_at_its_budget(
    client: Surface, tmp_path: Path
) -> None:
    path = str(tmp_path / "away.jsonl")
    with embedded_service([str(tmp_path)], log_file=tmp_path / "s.log") as service:
        sl = client.connect(service.address, keepalive=CLIENT_KEEPALIVE, reconnect_for=RIDE_OUT_S)
        held = sl.lane("holder").acquire(path)
        assert held is not None
        service.stop()
    try:
        started = time.monotonic()
        with pytest.raises(LeaseTimeout) as caught:
            sl.lane("late").acquire(path, wait_timeout=BUDGET_S)
        took = time.monotonic() - started
        assert took < BOUND_S, f"the budget, not the {RIDE_OUT_S:.0f} s ride-out, ended it"
        assert isinstance(caught.value.__cause__, Unavailable)
        assert caught.value.path == path
        assert held.revoked is None, "the held lease still rides out the loss"
    finally:
        sl.close()


def test_an_acquire_queued_when_the_service_stops_ends_at_its_budget(
    client: Surface, tmp_path: Path
) -> None:
    path = str(tmp_path / "queued.jsonl")
    budget = 5.0  # long enough to be queued before the stop, far short of the ride-out
    with ThreadPoolExecutor(1) as pool:
        with embedded_service([str(tmp_path)], log_file=tmp_path / "s.log") as service:
            holder = client.connect(service.address, keepalive=CLIENT_KEEPALIVE)
            waiter = client.connect(
                service.address, keepalive=CLIENT_KEEPALIVE, reconnect_for=RIDE_OUT_S
            )
            assert holder.lane("holder").acquire(path) is not None
            started = time.monotonic()
            waiting = pool.submit(waiter.lane("waiter").acquire, path, wait_timeout=budget)
            eventually(lambda: file_status(holder, path).queue, "the waiter to queue")
            service.stop()
        try:
            with pytest.raises(LeaseTimeout):
                waiting.result(RIDE_OUT_S + 30)
            took = time.monotonic() - started
            assert took < budget + BOUND_S, f"{took:.1f} s: the ride-out, not the budget"
        finally:
            waiter.close()
            holder.close()


def test_a_lease_the_stopped_service_cannot_give_back_is_lost_after_one_window(
    client: Surface, tmp_path: Path
) -> None:
    path = str(tmp_path / "lost.jsonl")
    with embedded_service([str(tmp_path)], log_file=tmp_path / "s.log") as service:
        sl = client.connect(service.address, keepalive=CLIENT_KEEPALIVE, reconnect_for=WINDOW_S)
        lease = sl.lane("agent").acquire(path)
        assert lease is not None
        lease.append({"n": 1})
        service.stop()
        stopped = time.monotonic()
    try:
        # Made during the background reclaim's window: it waits for that reclaim's outcome.
        with pytest.raises(LeaseRevoked) as caught:
            lease.append({"n": 2})
        took = time.monotonic() - stopped
        assert took < 2 * WINDOW_S, f"{took:.1f} s: more than one {WINDOW_S:.0f} s window"
        assert caught.value.reason == "restart"
        assert not isinstance(caught.value, UnknownOutcome), "it was never sent"
        assert lease.revoked == "restart"
        # Once the reclaim gave up, every call on the lease fails at once, sending nothing.
        again = time.monotonic()
        with pytest.raises(LeaseRevoked):
            lease.append({"n": 3})
        assert time.monotonic() - again < 1.0
    finally:
        sl.close()
