"""Conventions under faults: a paused origin, a restarted leader (issue #22).

Real ``sessionlane serve`` members (in network namespaces of their own when the test runs as
root, on loopback otherwise), driven by the :mod:`test_convention` fixtures. Faults are real:
SIGSTOP/SIGCONT of a member's process groups, ``kill -9`` of the leader.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

import pytest
from test_convention import (
    FAIL_FAST_S,
    Convention,
    MemberServe,
    convention,
    queued,
)

__all__ = ["convention"]  # the fixture, re-used

pytestmark = pytest.mark.timeout(150)


@contextlib.contextmanager
def paused(serve: MemberServe) -> Iterator[None]:
    """SIGSTOP every process of ``serve`` (serve and its actor group); SIGCONT on the way out."""
    groups = serve.groups()
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGCONT)


@pytest.mark.tcp
def test_a_holder_whose_member_stalled_past_the_timeout_is_told_its_lease_was_revoked(
    convention: Convention,
) -> None:
    a, _b, c = convention.start_three()
    path = convention.roots["b"] / "stalled.jsonl"  # owned by b
    holder = convention.agent(c, "holder")  # its member c will stall
    other = convention.agent(a, "other")
    probe = convention.agent(a, "probe")
    for agent in convention.agents:
        agent.expect("ready")
    held = holder.do("acquire", "granted", path=str(path))

    with paused(c):
        other.send("acquire", path=str(path))
        # b stops hearing c and abandons its lanes' leases: the other client is granted.
        granted = other.expect("granted", timeout=15)[1]
        assert granted["fence"] > held["fence"]
        other.do("append", "appended", count=3)
    resumed_at = time.monotonic()

    holder.send("wait_revoked", timeout=10)
    told_at, told = holder.expect("revoked", timeout=15)
    print(f"origin resumed: holder told after {told_at - resumed_at:.2f} s ({told['reason']})")
    assert told["reason"] in ("member_lost", "actor_restart"), told
    assert told_at - resumed_at < FAIL_FAST_S
    late = holder.do("append", "error", count=1)
    assert late["code"] == "revoked", "refused by the client, nothing sent"
    assert queued(probe, path) == []
