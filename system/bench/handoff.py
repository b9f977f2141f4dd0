"""Suite ``handoff``: K processes pass one transcript's lock around as fast as they can.

Each of K worker processes loops: acquire, append one record durably, release (``_workers.
lock_cycles``), for ``duration`` seconds, against sessionlane and each peer in turn. Every
cycle is stamped on the system-wide monotonic clock: asked, granted, releasing (just before
the release is sent), released. From the merged timeline:

* ``cycles_per_s``: all cycles over the wall time they took;
* ``handoff_ms``: for every change of holder to a process that was already waiting, the time
  from the first release it could have been granted (the first release, after it asked, in the
  previous holder's run of consecutive cycles) to its grant. For a fair queue that is the
  previous release; a lock that lets the releasing process take it straight back (``flock``,
  the polling locks) is charged for the cycles it let the waiter sit through;
* ``wakeup_ms``: the same, from the last release before the grant: the raw wake-up latency of
  the hand-offs that happened, without the re-grants before them;
* ``wait_ms``: asked to granted, per cycle (p50, p99, max); ``regrant_pct``: cycles whose
  holder had also held the previous one; ``fairness``: fewest cycles of a worker over most;
* ``overlaps``: grants before the previous holder began to release. Must be 0.

``files{K}``: the same K processes, each on its own file (nothing to hand off): what the
contender costs per cycle when it does not contend.

``sessionlane_fused`` is sessionlane with the append carrying the release (two requests per
cycle, ``_peers``); its ratios to the peers are ``ratios_fused``.

The Redis peer runs where it can (``_redis``); where it cannot, ``skipped`` says why.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from rich.table import Table

from sessionlane.system.bench._context import BenchContext
from sessionlane.system.bench._peers import PEERS, ContenderName
from sessionlane.system.bench._redis import redis_server
from sessionlane.system.bench._report import fmt, table
from sessionlane.system.bench._stats import latency_ms, rate, ratio, rounded

__all__ = ["CONTENDERS", "NAME", "analyse", "render", "run"]

NAME = "handoff"
CONTENDERS: tuple[ContenderName, ...] = ("sessionlane", "sessionlane_fused", *PEERS)
_MAX_CYCLES = 200_000
_SLACK_S = 60.0


class Cycle(NamedTuple):
    granted: float
    asked: float
    releasing: float
    released: float
    worker: int


def run(ctx: BenchContext) -> dict[str, Any]:
    ks = (2,) if ctx.quick else (2, 4, 8)
    spread = max(ks)
    with (
        ctx.service(NAME) as (service, root),
        redis_server(ctx.dir("redis")) as redis,
        ctx.pool(spread) as pool,
    ):
        contenders = [c for c in CONTENDERS if c != "redis" or redis.url is not None]
        result: dict[str, Any] = {name: {} for name in contenders}
        if redis.missing is not None:
            result["skipped"] = {"redis": redis.missing}
        for name in contenders:
            address = redis.url if name == "redis" else service.address
            for k in ks:
                ctx.progress.step(f"{name}: {k} processes, one file")
                path = str(root / f"{name}-k{k}.jsonl")
                params = [_params(ctx, name, path, address or "", i) for i in range(k)]
                runs = pool.run(
                    "sessionlane.system.bench._workers:lock_cycles",
                    params,
                    timeout=ctx.duration + _SLACK_S,
                )
                result[name][f"k{k}"] = analyse(runs)
            ctx.progress.step(f"{name}: {spread} processes, one file each")
            paths = [str(root / f"{name}-files{spread}-{i}.jsonl") for i in range(spread)]
            params = [_params(ctx, name, p, address or "", i) for i, p in enumerate(paths)]
            runs = pool.run(
                "sessionlane.system.bench._workers:lock_cycles",
                params,
                timeout=ctx.duration + _SLACK_S,
            )
            result[name][f"files{spread}"] = analyse_spread(runs)
    keys = [f"k{k}" for k in ks] + [f"files{spread}"]
    result["ratios"] = ratios(result, keys)
    result["ratios_fused"] = ratios(result, keys, ours="sessionlane_fused")
    return result


def _params(ctx: BenchContext, kind: str, path: str, address: str, index: int) -> dict[str, Any]:
    return {
        "kind": kind,
        "path": path,
        "address": address,
        "index": index,
        "duration": ctx.duration,
        "max_cycles": _MAX_CYCLES,
    }


def _timeline(runs: list[list[tuple[float, float, float, float]]]) -> list[Cycle]:
    cycles = [
        Cycle(granted, asked, releasing, released, worker)
        for worker, stamps in enumerate(runs)
        for asked, granted, releasing, released in stamps
    ]
    return sorted(cycles)


def analyse(runs: list[list[tuple[float, float, float, float]]]) -> dict[str, Any]:
    """The hand-off figures of one contended run (see the module docstring)."""
    cycles = _timeline(runs)
    handoffs: list[float] = []
    wakeups: list[float] = []
    overlaps = regrants = 0
    run_start = 0
    for j in range(1, len(cycles)):
        now, before = cycles[j], cycles[j - 1]
        if now.granted < before.releasing:
            overlaps += 1
        if now.worker == before.worker:
            regrants += 1
            continue
        if now.asked <= before.releasing:
            wakeups.append(now.granted - before.releasing)
            first = next(i for i in range(run_start, j) if cycles[i].releasing >= now.asked)
            handoffs.append(now.granted - cycles[first].releasing)
        run_start = j
    waits = [c.granted - c.asked for c in cycles]
    counts = [len(stamps) for stamps in runs]
    most = max(counts, default=0)
    elapsed = max(c.released for c in cycles) - min(c.asked for c in cycles) if cycles else 0.0
    return {
        "cycles": len(cycles),
        "cycles_per_s": rate(len(cycles), elapsed),
        **latency_ms(handoffs, "handoff"),
        **latency_ms(wakeups, "wakeup"),
        **latency_ms(waits, "wait"),
        "wait_ms_max": rounded(max(waits, default=0.0) * 1000.0),
        "handoffs": len(handoffs),
        "regrant_pct": rounded(100.0 * regrants / max(1, len(cycles) - 1), 1),
        "fairness": rounded(min(counts) / most, 3) if most else None,
        "overlaps": overlaps,
    }


def analyse_spread(runs: list[list[tuple[float, float, float, float]]]) -> dict[str, Any]:
    """Throughput of K processes on K files: no hand-offs, only the cost per cycle."""
    cycles = _timeline(runs)
    elapsed = max(c.released for c in cycles) - min(c.asked for c in cycles) if cycles else 0.0
    return {
        "cycles": len(cycles),
        "cycles_per_s": rate(len(cycles), elapsed),
        **latency_ms([c.released - c.asked for c in cycles], "cycle"),
    }


def ratios(result: dict[str, Any], keys: list[str], ours: str = "sessionlane") -> dict[str, Any]:
    """Per configuration and peer: how many times better ``ours`` does (> 1: better)."""
    out: dict[str, Any] = {}
    mine_all = result.get(ours, {})
    for key in keys:
        out[key] = {}
        for peer in (p for p in PEERS if p in result):
            theirs = result[peer].get(key, {})
            mine = mine_all.get(key, {})
            entry = {"cycles": ratio(mine.get("cycles_per_s"), theirs.get("cycles_per_s"))}
            if key.startswith("k"):
                entry["handoff_p50"] = ratio(theirs["handoff_ms_p50"], mine["handoff_ms_p50"])
                entry["handoff_p99"] = ratio(theirs["handoff_ms_p99"], mine["handoff_ms_p99"])
                entry["wait_p99"] = ratio(theirs["wait_ms_p99"], mine["wait_ms_p99"])
                entry["wait_max"] = ratio(theirs["wait_ms_max"], mine["wait_ms_max"])
            out[key][peer] = entry
    return out


def _contention_row(name: str, key: str, m: dict[str, Any]) -> list[str]:
    """One row of the one-file table: ``key`` is ``k<K>``."""
    return [
        name,
        key[1:],
        fmt(m["cycles_per_s"], 0),
        fmt(m["handoff_ms_p50"]),
        fmt(m["handoff_ms_p99"]),
        fmt(m["wakeup_ms_p50"]),
        fmt(m["wait_ms_p50"]),
        fmt(m["wait_ms_p99"]),
        fmt(m["wait_ms_max"]),
        fmt(m["regrant_pct"], 0),
        fmt(m["fairness"], 2),
    ]


def _spread_row(name: str, key: str, m: dict[str, Any]) -> list[str]:
    """One row of the one-file-each table: ``key`` is ``files<K>``."""
    return [
        name,
        key.removeprefix("files"),
        fmt(m["cycles_per_s"], 0),
        fmt(m["cycle_ms_p50"]),
        fmt(m["cycle_ms_p99"]),
    ]


def render(result: dict[str, Any]) -> list[Table]:
    measured = [name for name in CONTENDERS if name in result]
    rows = [
        _contention_row(name, key, m)
        for name in measured
        for key, m in result[name].items()
        if key.startswith("k")
    ]
    spread_rows = [
        _spread_row(name, key, m)
        for name in measured
        for key, m in result[name].items()
        if not key.startswith("k")
    ]
    skipped = "".join(
        f"; {name} not measured: {why}" for name, why in result.get("skipped", {}).items()
    )
    ratio_rows = [
        [
            key + label,
            peer,
            fmt(r.get("handoff_p50"), 1, "x"),
            fmt(r.get("handoff_p99"), 1, "x"),
            fmt(r.get("wait_p99"), 1, "x"),
            fmt(r.get("wait_max"), 1, "x"),
            fmt(r.get("cycles"), 2, "x"),
        ]
        for label, name in (("", "ratios"), (" fused", "ratios_fused"))
        for key, peers in result.get(name, {}).items()
        for peer, r in peers.items()
    ]
    return [
        table(
            f"handoff: K processes, one file (acquire, append 1 record, release){skipped}",
            [
                "contender",
                "K",
                "cycles/s",
                "hand-off p50 ms",
                "p99 ms",
                "wake-up p50 ms",
                "wait p50 ms",
                "wait p99 ms",
                "wait max ms",
                "re-grant %",
                "fairness",
            ],
            rows,
        ),
        table(
            "handoff: K processes, one file each (no contention)",
            ["contender", "K", "cycles/s", "cycle p50 ms", "cycle p99 ms"],
            spread_rows,
        ),
        table(
            "handoff: sessionlane's advantage (peer / sessionlane; > 1: sessionlane is better;"
            " fused: append and release)",
            ["config", "peer", "hand-off p50", "hand-off p99", "wait p99", "wait max", "cycles/s"],
            ratio_rows,
        ),
    ]
