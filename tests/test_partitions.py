"""A partition suite: three members under partitions, pauses and a leader restart (issue #22).

Each member is ``sessionlane serve`` in a network namespace of this test's own, joined by veth
pairs to a bridge in another namespace of its own, on a random private 10.x subnet (only
addresses inside those namespaces; see :func:`test_convention.member_network`), with a shared
``cluster_key_file``. Contending clients (:data:`WORKER`, in a fifth namespace) take turns on a
file of each member, through every member, and log every step with the wall clock (all
namespaces share this machine's clock). Faults, in order:

1. a two-way partition of c (its veth on the bridge down);
2. a one-way partition of b (everything b sends is dropped: blackhole routes in its namespace);
3. a pause of c (SIGSTOP of its processes);
4. ``kill -9`` of the leader a, then its restart.

The checker (:func:`check`) reads the logs and the files and counts what must stay at zero:
records of two turns interleaved in a file (overlapping holders), fences that go back or are
granted twice, acknowledged records lost or written twice, and holders whose lease was granted
to another without their being told (a ``revoked`` or an error on their next use), and
``path_not_allowed`` answers (every path used is under a member's root). It prints
the time from each fault to the first ``unavailable`` through another member and to the first
grant after the fault ended (healed), and how many leases on the leader's file, held through b
and c, the leader's restart took from their holders (none: b and c reclaim them for their
holders).

Runs as root where ``ip netns`` works (skipped otherwise, with the reason); bounded (about a
minute) and cleaned up whatever happens: the convention fixture kills every process group and
deletes the namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_convention import TOKEN, Convention, MemberServe, convention

__all__ = ["convention"]  # the fixture, re-used


FAULT_S = 6.0
"""How long each fault lasts: three times the default ``member_timeout_ms``."""
HEAL_S = 6.0
"""How long the convention is left alone after each fault."""

WORKER = """
import json, sys, time
from sessionlane.system.client import SessionLaneError, connect

import os
address, token, name, path, stop, log_path = sys.argv[1:7]
log = open(log_path, "a", buffering=1)

def ev(step, **fields):
    log.write(json.dumps({"t": time.time(), "w": name, "step": step, **fields}) + "\\n")

n = 0
sl = connect(address, token=token, timeout=5, reconnect_for=2)
lane = sl.lane(name)
while not os.path.exists(stop):
    lease = None
    try:
        lease = lane.acquire(path, wait_timeout=2)
        ev("granted", lease=lease.id, fence=lease.fence)
        for _ in range(3):
            n += 1
            ev("sent", lease=lease.id, n=n)
            lease.append({"w": name, "fence": lease.fence, "n": n})
            ev("acked", lease=lease.id, n=n)
            time.sleep(0.15)
        lease.release()
        ev("released", lease=lease.id)
    except SessionLaneError as exc:
        ev(
            "error",
            code=exc.code,
            lease=lease.id if lease is not None else None,
            revoked=lease.revoked if lease is not None else None,
        )
        if lease is not None and lease.revoked is None:
            with __import__("contextlib").suppress(SessionLaneError):
                lease.release()
        time.sleep(0.2)
ev("bye")
"""


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


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def netns_or_skip(convention: Convention) -> None:
    if os.geteuid() != 0:
        pytest.skip("the partition suite needs root (network namespaces)")
    if convention.network.kind != "netns":
        pytest.skip("ip netns, veth or bridges do not work here")


@dataclass
class Fault:
    name: str
    watched: Callable[[str], bool]
    """Which workers' steps time it (by name, ``<via>-to-<owner>``)."""
    began: float = 0.0
    ended: float = 0.0


def to_owner_through_others(member: str) -> Callable[[str], bool]:
    """Workers using ``member``'s file through another member."""
    return lambda w: w.endswith(f"-to-{member}") and not w.startswith(f"{member}-")


def through(member: str) -> Callable[[str], bool]:
    """Workers connected to ``member``."""
    return lambda w: w.startswith(f"{member}-")


@dataclass
class History:
    events: list[dict[str, Any]] = field(default_factory=list)

    def of(self, step: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["step"] == step]


def read_history(logs: list[Path]) -> History:
    events = []
    for log in logs:
        with contextlib.suppress(FileNotFoundError):
            for line in log.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
    events.sort(key=lambda e: e["t"])
    return History(events)


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check(history: History, files: dict[str, Path]) -> dict[str, int]:
    """The counts that must stay at zero (see the module's docstring)."""
    counts = {
        "overlapping holders": 0,
        "fences back or shared": 0,
        "lost acknowledged records": 0,
        "duplicated records": 0,
        "holders never told": 0,
        "path_not_allowed for a member's path": sum(
            e.get("code") == "path_not_allowed" for e in history.of("error")
        ),
    }
    path_of_worker = {e["w"]: e["path"] for e in history.of("start")}
    for key, path in files.items():
        lines = records(path)
        # Overlapping holders: turns interleave (a fence seen again after a later one).
        seen_fences: list[int] = []
        for record in lines:
            back = bool(seen_fences) and record["fence"] < max(seen_fences)
            if back:
                counts["overlapping holders"] += 1
            seen_fences.append(record["fence"])
        ids = [(r["w"], r["n"]) for r in lines]
        counts["duplicated records"] += len(ids) - len(set(ids))
        acked = {(e["w"], e["n"]) for e in history.of("acked") if path_of_worker.get(e["w"]) == key}
        counts["lost acknowledged records"] += len(acked - set(ids))
        grants = [e for e in history.of("granted") if path_of_worker.get(e["w"]) == key]
        fences = [g["fence"] for g in grants]
        counts["fences back or shared"] += len(fences) - len(set(fences))
        counts["holders never told"] += never_told(history, grants)
    return counts


def never_told(history: History, grants: list[dict[str, Any]]) -> int:
    """Grants superseded (another grant on the path) before their holder released them, whose
    holder never learned it: no error and no ``revoked`` for that lease afterwards."""
    by_lease: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in history.events:
        if e.get("lease"):
            by_lease[e["lease"]].append(e)
    untold = 0
    for grant in grants:
        later = [g for g in grants if g["fence"] > grant["fence"]]
        if not later:
            continue
        superseded_at = min(g["t"] for g in later)
        steps = by_lease[grant["lease"]]
        # A release the service accepted: it still held then (its reply and the next grant
        # race to the clients' logs). An error on the lease's next use, or its revocation: told.
        answered = any(e["step"] in ("released", "error") for e in steps if e["t"] >= grant["t"])
        if not answered and superseded_at > grant["t"]:
            untold += 1
    return untold


def leases_lost(
    history: History, watched: Callable[[str], bool], began: float, until: float
) -> int:
    """Leases of ``watched`` workers that ended in an error between ``began`` and ``until``."""
    lost = {
        e["lease"]
        for e in history.of("error")
        if watched(e["w"]) and e.get("lease") and began <= e["t"] <= until
    }
    return len(lost)


def first(
    events: list[dict[str, Any]], after: float, test: Callable[[dict[str, Any]], bool]
) -> Any:
    found = [e["t"] - after for e in events if e["t"] >= after and test(e)]
    return round(min(found), 2) if found else None


@contextlib.contextmanager
def link_down(convention: Convention, name: str) -> Iterator[None]:
    """Two-way partition: ``name``'s port on the bridge is down."""
    switch, port = bridge_port(convention, name)
    _ip("-n", switch, "link", "set", port, "down")
    try:
        yield
    finally:
        _ip("-n", switch, "link", "set", port, "up")


@contextlib.contextmanager
def egress_dropped(convention: Convention, name: str) -> Iterator[None]:
    """One-way partition: everything ``name`` sends to the other hosts is dropped (blackhole
    routes in its namespace; this kernel has no netem or tc classifiers), what they send it
    still arrives."""
    ns = convention.network.namespaces[name]
    others = [h for n, h in convention.network.hosts.items() if n != name]
    for host in others:
        _ip("-n", ns, "route", "add", "blackhole", f"{host}/32")
    try:
        yield
    finally:
        for host in others:
            with contextlib.suppress(subprocess.SubprocessError):
                _ip("-n", ns, "route", "del", "blackhole", f"{host}/32")


def bridge_port(convention: Convention, name: str) -> tuple[str, str]:
    ns = convention.network.namespaces[name]
    switch = ns.rsplit("-", 1)[0] + "-sw"
    index = list(convention.network.namespaces).index(name) + 1
    return switch, f"v{index}"


def test_the_checker_counts_every_kind_of_violation(tmp_path: Path) -> None:
    file = tmp_path / "f.jsonl"
    lines = [{"w": "x", "fence": 1, "n": 1}, {"w": "y", "fence": 2, "n": 1}]
    lines += [{"w": "x", "fence": 1, "n": 2}, {"w": "y", "fence": 2, "n": 1}]
    file.write_text("".join(json.dumps(r) + "\n" for r in lines))
    events = [
        {"t": 0, "w": "x", "step": "start", "path": "f"},
        {"t": 0, "w": "y", "step": "start", "path": "f"},
        {"t": 0, "w": "z", "step": "start", "path": "f"},
        {"t": 1, "w": "x", "step": "granted", "lease": "L1", "fence": 1},
        {"t": 2, "w": "x", "step": "acked", "lease": "L1", "n": 1},
        {"t": 3, "w": "y", "step": "granted", "lease": "L2", "fence": 2},
        {"t": 3, "w": "z", "step": "granted", "lease": "L3", "fence": 2},
        {"t": 4, "w": "x", "step": "acked", "lease": "L1", "n": 9},
    ]
    assert check(History(events), {"f": file}) == {
        "overlapping holders": 1,  # x's fence 1 after y's fence 2
        "fences back or shared": 1,  # fence 2 granted twice
        "lost acknowledged records": 1,  # x's n=9 is not in the file
        "duplicated records": 1,  # y's n=1 twice
        "holders never told": 1,  # x was superseded and never saw an error
        "path_not_allowed for a member's path": 0,
    }


@pytest.mark.slow
@pytest.mark.tcp
@pytest.mark.timeout(170)
def test_three_members_under_partitions_pauses_and_a_leader_restart_never_have_two_owners(
    convention: Convention, tmp_path: Path
) -> None:
    netns_or_skip(convention)
    one_way = True
    a, b, c = convention.start_three()
    members: dict[str, MemberServe] = {"a": a, "b": b, "c": c}
    files = {key: convention.roots[key] / f"{key}.jsonl" for key in "abc"}
    stop = tmp_path / "stop"
    logs: list[Path] = []
    workers: list[subprocess.Popen[bytes]] = []
    for via in "abc":
        for key, path in files.items():
            name = f"{via}-to-{key}"
            log = tmp_path / f"{name}.log"
            start = {"t": time.time(), "w": name, "step": "start", "path": key}
            log.write_text(json.dumps(start) + "\n")
            logs.append(log)
            argv = [sys.executable, "-c", WORKER, members[via].address, TOKEN, name, str(path)]
            argv += [str(stop), str(log)]
            wrapped = convention.network.wrap("client", argv)
            workers.append(subprocess.Popen(wrapped, start_new_session=True))
    try:
        faults = run_faults(convention, members, one_way)
        stop.touch()
        deadline = time.monotonic() + 20
        for worker in workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(max(0.1, deadline - time.monotonic()))
    finally:
        stop.touch()
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, 9)
            worker.wait(10)

    history = read_history(logs)
    counts = check(history, files)
    grants, acked = history.of("granted"), history.of("acked")
    print(f"\n{len(grants)} turns granted, {len(acked)} records acknowledged")
    healed: dict[str, Any] = {}
    for fault in faults:
        steps = [e for e in history.events if fault.watched(e["w"])]
        refused = first(steps, fault.began, lambda e: e["step"] == "error")
        healed[fault.name] = first(steps, fault.ended, lambda e: e["step"] == "granted")
        print(
            f"{fault.name}: first refusal after {refused} s,"
            f" first grant {healed[fault.name]} s after it ended"
        )
    leader = faults[-1]
    took = leases_lost(history, to_owner_through_others("a"), leader.began, leader.ended + HEAL_S)
    print(f"{leader.name}: leases on a's file held through b and c lost: {took}")
    print("checker:", counts)
    assert counts == dict.fromkeys(counts, 0), counts
    assert took == 0, "a restarted owner's file keeps its holders (reclaimed by their member)"
    assert len(acked) > 50, "the clients made progress"
    assert all(t is not None for t in healed.values()), healed


def run_faults(
    convention: Convention, members: dict[str, MemberServe], one_way: bool
) -> list[Fault]:
    faults: list[Fault] = []
    time.sleep(HEAL_S)  # warm up: every worker has had turns

    def during(fault: Fault, cm: contextlib.AbstractContextManager[Any]) -> None:
        fault.began = time.time()
        with cm:
            time.sleep(FAULT_S)
        fault.ended = time.time()
        faults.append(fault)
        time.sleep(HEAL_S)

    during(
        Fault("two-way partition of c", to_owner_through_others("c")), link_down(convention, "c")
    )
    if one_way:
        cut = Fault(
            "one-way partition of b (what b sends is dropped)", to_owner_through_others("b")
        )
        during(cut, egress_dropped(convention, "b"))
    during(Fault("pause of c (SIGSTOP)", to_owner_through_others("c")), paused(members["c"]))

    leader = Fault("kill -9 and restart of the leader a", through("a"))
    leader.began = time.time()
    members["a"].hard_kill()
    port = convention.ports["a"]
    restarted = convention.serve("a", convention.roots["a"], admin_port=port, leader=None, run="a")
    restarted.wait_ready()
    leader.ended = time.time()
    faults.append(leader)
    time.sleep(HEAL_S)
    return faults
