"""Conventions under faults: a paused origin, a restarted leader (issue #22).

Real ``sessionlane serve`` members (in network namespaces of their own when the test runs as
root, on loopback otherwise), driven by the :mod:`test_convention` fixtures. Faults are real:
SIGSTOP/SIGCONT of a member's process groups, ``kill -9`` of the leader.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from test_convention import (
    FAIL_FAST_S,
    HERE,
    LINE_TIMEOUT_S,
    READY_TIMEOUT_S,
    THERE,
    Agent,
    Clock,
    Convention,
    FakeHost,
    acknowledge,
    convention,
    federation,
    open_channel,
    queued,
)
from test_partitions import paused
from test_serve import turns
from waiting import eventually

from sessionlane.actors.convention import load_table, save_table
from sessionlane.actors.federation import Federation
from sessionlane.messages.convention import Admitted, Beat, BeatAck, Claim, Members

__all__ = ["convention"]  # the fixture, re-used

pytestmark = pytest.mark.timeout(150)

STALLED_GRACE_MS = 3_000
"""The stalled-member test's reclaim grace: it only has to end while the member is paused."""


@pytest.mark.tcp
def test_a_holder_whose_member_stalled_past_the_timeout_is_told_its_lease_was_revoked(
    convention: Convention,
) -> None:
    convention.config_lines = f"reclaim_grace_ms = {STALLED_GRACE_MS}\n"
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
        # b stops hearing c, keeps its lanes' leases for their reclaim for reclaim_grace_ms
        # (STALLED_GRACE_MS here; 10 s by default), then abandons them: the other client is
        # granted.
        granted = other.expect("granted", timeout=30)[1]
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


def try_acquire(agent: Agent, path: Path, wait_s: float) -> dict[str, Any]:
    agent.send("acquire", path=str(path), wait_timeout=wait_s)
    got = agent.lines.get(timeout=LINE_TIMEOUT_S)
    assert got is not None, f"{agent.name} exited"
    return got[1]


@pytest.mark.tcp
def test_a_restarted_leader_refuses_a_live_members_root_and_routes_to_it_again_on_its_own(
    convention: Convention,
) -> None:
    a, _b, c = convention.start_three()
    roots, ports = convention.roots, convention.ports
    path = roots["b"] / "kept.jsonl"
    on_c = convention.agent(c, "on-c")
    on_c.expect("ready")
    held = on_c.do("acquire", "granted", path=str(path))

    a.hard_kill()
    restarted_at = time.monotonic()
    a2 = convention.serve("a", roots["a"], admin_port=ports["a"], leader=None, run="a")
    a2.wait_ready()

    # A newcomer with the convention's key claims b's root while b lives: refused.
    impostor = convention.serve(
        "client",
        roots["b"],
        admin_port=convention.network.port(1901),
        leader=convention.leader,
        run="impostor",
    )
    assert impostor.proc.wait(READY_TIMEOUT_S) == 2, impostor.text
    assert f"overlaps root {roots['b']}" in impostor.text

    # b was never restarted: the lease through c still holds and writes.
    on_c.do("append", "appended", count=2)

    # Through the restarted leader, b's path is routed again (queued behind c's holder), never
    # "outside the configured roots".
    on_a = convention.agent(a2, "on-a")
    on_a.expect("ready")
    asked_at = time.monotonic()
    seen: list[str] = []

    def routed() -> bool:
        got = try_acquire(on_a, path, 0.3)
        seen.append(got.get("code", got["step"]))
        assert got["step"] != "granted", "granted while c's client holds the path"
        return got.get("code") == "lease_timeout"

    eventually(routed, "the restarted leader to route to b", 20)
    now = time.monotonic()
    print(
        f"leader restarted: routed to b {now - restarted_at:.2f} s after the restart,"
        f" {now - asked_at:.2f} s after the first ask; answers meanwhile {seen}"
    )
    assert set(seen) <= {"unavailable", "lease_timeout"}, seen
    on_c.do("release", "released")
    again = on_a.do("acquire", "granted", path=str(path))
    assert again["fence"] > held["fence"]
    on_c.send("wait_revoked", timeout=0)
    assert on_c.expect("revoked")[1]["reason"] is None, "c's lease was released, never revoked"


@pytest.mark.tcp
@pytest.mark.parametrize("owner", ["a", "b"], ids=["the leader", "another member"])
def test_a_lease_on_a_file_of_a_member_killed_and_restarted_survives_with_its_fence(
    convention: Convention, owner: str
) -> None:
    a, b, c = convention.start_three()
    roots, ports = convention.roots, convention.ports
    path = roots[owner] / "kept.jsonl"
    holder = convention.agent(c, "holder")  # its member c keeps the lease's reclaim secret
    holder.expect("ready")
    held = holder.do("acquire", "granted", path=str(path))
    holder.do("append", "appended", count=2)

    {"a": a, "b": b}[owner].hard_kill()
    killed_at = time.monotonic()
    holder.send("append", count=1)  # in flight as its owner is gone: sent again once reclaimed
    leader = None if owner == "a" else convention.leader
    again = convention.serve(owner, roots[owner], admin_port=ports[owner], leader=leader, run="2")
    again.wait_ready()
    ready_at = time.monotonic()

    appended_at, _ = holder.expect("appended", timeout=LINE_TIMEOUT_S)
    print(
        f"owner {owner} killed and restarted ({ready_at - killed_at:.2f} s): the append in"
        f" flight answered {appended_at - ready_at:.2f} s after it was ready"
    )
    holder.do("append", "appended", count=1)
    holder.send("wait_revoked", timeout=0)
    assert holder.expect("revoked")[1]["reason"] is None, "never revoked"
    assert turns(path) == [("holder", held["fence"], [0, 1, 0, 0])], (
        "one turn, one fence, the append in flight written once"
    )


# Healing, with a fake host and clock (test_convention's) -----------------------------------------


def lost_for_long(fed: Federation, host: FakeHost, clock: Clock) -> None:
    """THERE is used, falls silent, and every probe of it fails for a long time."""
    fed.route_open(open_channel("/srv/there/a.jsonl", 1), "lane1")
    clock.now += 2_001
    fed.tick()
    for _ in range(10):
        clock.now += 60_000
        fed.route_open(open_channel("/srv/there/a.jsonl"), "lane1")  # refused; starts a probe
        clock.now += 2_001
        fed.tick()  # the probe goes unanswered


def test_a_member_lost_for_long_is_probed_again_within_a_few_seconds() -> None:
    host, clock = FakeHost(), Clock()
    fed = federation(host, clock)
    lost_for_long(fed, host, clock)
    (remote,) = fed.remotes.values()
    assert remote.phase == "lost"
    assert remote.retry_at - clock.now <= 3_000, "the backoff is capped at three seconds"


def test_a_late_ack_from_a_lost_member_probes_it_at_once() -> None:
    host, clock = FakeHost(), Clock()
    fed = federation(host, clock)
    lost_for_long(fed, host, clock)
    beats = [m for _, m in host.sent if isinstance(m, Beat)]
    created = len(host.created)
    clock.now += 1_000
    fed.on_beat_ack(BeatAck(link=beats[-1].link, seq=beats[-1].seq, incarnation="there-1"), None)
    assert len(host.created) == created + 1, "a new relay at once, no wait for the backoff"
    acknowledge(fed, host)
    refused = len(host.refused())
    assert fed.route_open(open_channel("/srv/there/b.jsonl", 2), "lane1")
    assert len(host.refused()) == refused, "forwarded, not refused"


def test_a_beat_from_a_lost_member_probes_it_at_once_but_not_more_than_once_a_second() -> None:
    host, clock = FakeHost(), Clock()
    there = THERE.model_copy(update={"registry": "registry@there"})
    fed = Federation(host, HERE, 2_000, clock=clock)
    fed.on_members(Members(version=1, members=[HERE, there]), None)
    lost_for_long(fed, host, clock)
    created = len(host.created)
    clock.now += 1_000
    beat = Beat(origin="registry@there", link=1, seq=1)
    fed.handle(beat, None)
    fed.handle(beat, None)
    assert len(host.created) == created + 1
    assert any(isinstance(m, BeatAck) for t, m in host.sent if t == "registry@there")


def test_the_directorys_table_is_kept_and_read_back_without_addresses(tmp_path: Path) -> None:
    path = str(tmp_path / "directory.json")
    there = THERE.model_copy(update={"registry": "registry@there"})
    save_table(path, 7, [HERE, there])
    version, members = load_table(path)
    assert version == 7
    assert members == [HERE, THERE.model_copy(update={"registry": None})]
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_table(str(tmp_path / "absent.json")) == (0, [])
    Path(path).write_text("{not json")
    assert load_table(path) == (0, []), "unreadable: reported, read as empty"


def test_a_member_whose_directory_falls_silent_claims_again_and_registers_when_admitted() -> None:
    host, clock = FakeHost(), Clock()
    fed = federation(host, clock)
    fed.on_admitted(Admitted(version=1, members=[HERE, THERE], directory="dir1"), None)
    fed.tick()
    assert [type(m).__name__ for t, m in host.take() if t == "dir1"] == ["Checkin"]
    fed.tick()
    assert not [m for t, m in host.take() if t == "dir1"], "one checkin outstanding at most"
    created = len(host.created)
    clock.now += 2_001
    fed.tick()
    assert len(host.created) == created + 1, "a claimant placed on the leader again"
    claims = [m for _, m in host.take() if isinstance(m, Claim)]
    assert [c.member for c in claims] == [HERE]
    fed.tick()
    assert len(host.created) == created + 1, "no second claim before member_timeout_ms"
    fed.on_admitted(Admitted(version=1, members=[HERE, THERE], directory="dir2"), None)
    assert ("admin", ("sessionlane.member", HERE.key)) in host.take()
    fed.tick()
    assert [type(m).__name__ for t, m in host.take() if t == "dir2"] == ["Checkin"]


def in_grace(probe: Agent, path: Path) -> dict[str, Any] | None:
    """The status of ``path`` if its owner keeps its lease for a reclaim, else None."""
    got = probe.do("status", "status", path=str(path))
    files = [f for f in got["files"] if f["path"] == str(path)]
    return files[0] if files and files[0]["counters"].get("in_grace") else None


@pytest.mark.tcp
@pytest.mark.parametrize("restart", ["kept", "at once"])
def test_a_lease_held_through_the_killed_leader_on_another_members_file_survives_with_its_fence(
    convention: Convention, restart: str
) -> None:
    """``kept``: the leader is restarted once b keeps the lease for a reclaim (b noticed the
    loss first); ``at once``: right after the kill, so the reclaim may reach b before b's
    watchdog does (then the lease moves to the reclaiming lane). The outcome is the same."""
    a, _b, c = convention.start_three()
    roots, ports = convention.roots, convention.ports
    path = roots["b"] / "kept.jsonl"  # owned by b; its holder's member is the leader
    holder = convention.agent(a, "holder", reconnect_for=60)
    probe = convention.agent(c, "probe")
    for agent in convention.agents:
        agent.expect("ready")
    held = holder.do("acquire", "granted", path=str(path))
    holder.do("append", "appended", count=2)
    assert in_grace(probe, path) is None  # c reaches b now (relays are placed by the leader)

    a.hard_kill()
    killed_at = time.monotonic()
    holder.send("append", count=1)  # in flight as its member is gone: sent again once reclaimed
    if restart == "kept":
        # b sees its origin lost and keeps the lease for its holder's reclaim: held, in grace.
        kept = eventually(lambda: in_grace(probe, path), "b to keep the lease", 30, every=0.1)
        assert kept["counters"]["awaited_fence"] == held["fence"]
        assert kept["holder"]["lane"] == "holder (awaiting reclaim)", kept
    kept_at = time.monotonic()
    again = convention.serve(
        "a", roots["a"], admin_port=ports["a"], leader=None, run="a", listen=a.address
    )
    again.wait_ready()
    ready_at = time.monotonic()

    appended_at, _ = holder.expect("appended", timeout=LINE_TIMEOUT_S)
    print(
        f"leader killed ({restart}): restarted after {kept_at - killed_at:.2f} s, ready"
        f" after {ready_at - killed_at:.2f} s; the append in flight answered"
        f" {appended_at - ready_at:.2f} s after it was ready"
    )
    holder.do("append", "appended", count=1)
    holder.send("wait_revoked", timeout=0)
    assert holder.expect("revoked")[1]["reason"] is None, "never revoked"
    assert turns(path) == [("holder", held["fence"], [0, 1, 0, 0])], (
        "one turn, one fence, the append in flight written once"
    )
    assert in_grace(probe, path) is None, "reclaimed: out of the grace"
