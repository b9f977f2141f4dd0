"""Suite ``turn``: what one uncontended turn costs on top of writing the transcript directly.

A turn is: acquire a ``prompt`` lease, append 10 records durably, release. Variants, run
round-robin in this process so drift hits them alike, each on its own file:

* ``direct``: no lock; one ``write`` of the 10 records and one ``fdatasync`` on an open fd;
* ``sessionlane``: the turn through the Python client, the 10 records in one ``append``
  (the same work as ``direct``: three requests);
* ``sessionlane_10_appends``: the same turn with one ``append`` per record (twelve requests,
  ten syncs), as an agent that writes each record as it arrives;
* ``flock``, ``lockfile``: the peers' lock around the ``direct`` write.

Reported: p50 and p99 per variant, and the overhead over ``direct`` at each.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from rich.table import Table

from sessionlane.system.bench._context import BenchContext
from sessionlane.system.bench._peers import ContenderName, encode, open_contender
from sessionlane.system.bench._report import fmt, table
from sessionlane.system.bench._stats import percentile, rounded
from sessionlane.system.bench._workers import record

__all__ = ["NAME", "RECORDS", "VARIANTS", "render", "run"]

NAME = "turn"
RECORDS = 10
VARIANTS = ("direct", "sessionlane", "sessionlane_10_appends", "flock", "lockfile")
_WARMUP = 3
_PEERS: tuple[ContenderName, ...] = ("flock", "lockfile")


def run(ctx: BenchContext) -> dict[str, Any]:
    from sessionlane.system.client import connect

    turns = 20 if ctx.quick else 200
    with ctx.service(NAME) as (service, root), connect(service.address) as sl:
        lane = sl.lane("bench:turn")
        batch = [record(0, i) for i in range(RECORDS)]
        paths = {name: str(root / f"{name}.jsonl") for name in VARIANTS}
        fd = os.open(paths["direct"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        peers = {name: open_contender(name, paths[name]) for name in _PEERS}

        def direct() -> None:
            os.write(fd, encode(batch))
            os.fdatasync(fd)

        def through_sessionlane() -> None:
            lease = lane.acquire(paths["sessionlane"], purpose="prompt")
            assert lease is not None
            lease.append(*batch)
            lease.release()

        def through_sessionlane_each() -> None:
            lease = lane.acquire(paths["sessionlane_10_appends"], purpose="prompt")
            assert lease is not None
            for one in batch:
                lease.append(one)
            lease.release()

        def through(name: ContenderName) -> Callable[[], None]:
            peer = peers[name]

            def turn() -> None:
                peer.acquire()
                peer.append(batch)
                peer.release()

            return turn

        variants: dict[str, Callable[[], None]] = {
            "direct": direct,
            "sessionlane": through_sessionlane,
            "sessionlane_10_appends": through_sessionlane_each,
            "flock": through("flock"),
            "lockfile": through("lockfile"),
        }
        samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
        ctx.progress.step(f"{turns} turns of each variant, round-robin")
        try:
            for i in range(_WARMUP + turns):
                for name, turn in variants.items():
                    began = time.perf_counter()
                    turn()
                    if i >= _WARMUP:
                        samples[name].append(time.perf_counter() - began)
                ctx.progress.tick()
        finally:
            os.close(fd)
            for peer in peers.values():
                peer.close()
    return summarize(samples, turns)


def summarize(samples: dict[str, list[float]], turns: int) -> dict[str, Any]:
    """p50/p99 per variant in ms, and each variant's overhead over ``direct``."""
    out: dict[str, Any] = {"records": RECORDS, "turns": turns}
    base = {q: percentile(samples["direct"], q) for q in (50, 99)}
    for name in VARIANTS:
        entry: dict[str, Any] = {}
        for q in (50, 99):
            value = percentile(samples[name], q)
            direct = base[q]
            entry[f"ms_p{q}"] = rounded(None if value is None else value * 1000.0)
            if name != "direct" and value is not None and direct is not None:
                entry[f"overhead_ms_p{q}"] = rounded((value - direct) * 1000.0)
        out[name] = entry
    return out


def render(result: dict[str, Any]) -> list[Table]:
    rows = [
        [
            name,
            fmt(result[name]["ms_p50"], 3),
            fmt(result[name]["ms_p99"], 3),
            fmt(result[name].get("overhead_ms_p50"), 3),
            fmt(result[name].get("overhead_ms_p99"), 3),
        ]
        for name in VARIANTS
    ]
    return [
        table(
            f"turn: one uncontended turn, {result['records']} records, {result['turns']} turns",
            ["variant", "p50 ms", "p99 ms", "over direct p50", "over direct p99"],
            rows,
        )
    ]
