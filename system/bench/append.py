"""Suite ``append``: durable records per second through sessionlane against the disk's own.

* ``sessionlane_1_file`` / ``sessionlane_16_files``: W writer processes, each looping
  lane-less appends of one record (the queued short write), into one file or round-robin over
  16. Several writers per file give group commit something to batch; ``syncs_per_append``
  (from the files' ``syncs`` and ``appends`` counters, before and after) shows how much it did.
* ``sessionlane_pipelined``: W writer processes on one file, each in turn taking the lease and
  pipelining ``PIPELINE_PER_LEASE`` records with up to ``PIPELINE_WINDOW`` appends in flight
  (``Lease.append_pipelined``), then releasing it; ``turn_ms`` is one such turn.
* ``sessionlane_1_file_no_group_commit``: the one-file run on a service whose SessionFiles
  sync every append (only when ``SessionFile.group_commit`` exists to switch it off).
* ``fsync_each``: one process, one ``write`` and one ``fdatasync`` per record.
* ``batched_w``: one process, W records then one ``fdatasync``: what perfect group commit of
  W writers could reach.
* ``ceiling``: one process, 64 records per ``fdatasync``: the disk's batched ceiling.

Every plain loop encodes its records as the service does, so the difference is coordination.
"""

from __future__ import annotations

import os
from typing import Any

from rich.table import Table

from sessionlane.system.bench._context import BenchContext
from sessionlane.system.bench._pool import WorkerPool
from sessionlane.system.bench._report import fmt, table
from sessionlane.system.bench._stats import latency_ms, rate, ratio, rounded
from sessionlane.system.bench._workers import record

__all__ = [
    "CEILING_BATCH",
    "FILES",
    "NAME",
    "PIPELINE_PER_LEASE",
    "PIPELINE_WINDOW",
    "SESSIONLANE_KEYS",
    "render",
    "run",
]

NAME = "append"
FILES = 16
CEILING_BATCH = 64
PIPELINE_WINDOW = 64
PIPELINE_PER_LEASE = 256
_SLACK_S = 60.0
SESSIONLANE_KEYS = (
    "sessionlane_1_file",
    "sessionlane_16_files",
    "sessionlane_pipelined",
    "sessionlane_1_file_no_group_commit",
)


def run(ctx: BenchContext) -> dict[str, Any]:
    writers = 4 if ctx.quick else 8
    result: dict[str, Any] = {"writers": writers, "record_bytes": _record_bytes()}
    with ctx.pool(writers) as pool:
        with ctx.service(NAME) as (service, root):
            one = [str(root / "one.jsonl")]
            many = [str(root / f"many-{i:02d}.jsonl") for i in range(FILES)]
            for key, paths in (("sessionlane_1_file", one), ("sessionlane_16_files", many)):
                result[key] = _lane_appends(ctx, pool, service.address, paths, writers)
            piped = str(root / "piped.jsonl")
            result["sessionlane_pipelined"] = _pipelined(ctx, pool, service.address, piped, writers)
            plain = (("fsync_each", 1), ("batched_w", writers), ("ceiling", CEILING_BATCH))
            for key, batch in plain:
                ctx.progress.step(f"plain loop, {batch} record(s) per fdatasync")
                path = str(root / f"{key}.plain")
                params = [{"path": path, "duration": ctx.duration, "batch": batch}]
                (outcome,) = pool.run(
                    "sessionlane.system.bench._workers:direct_appends",
                    params,
                    timeout=ctx.duration + _SLACK_S,
                )
                result[key] = {
                    "batch": batch,
                    "records_per_s": rate(outcome["records"], outcome["elapsed"]),
                    "syncs_per_append": rounded(outcome["syncs"] / max(1, outcome["records"]), 3),
                }
        if _group_commit_switch() is not None:
            result["sessionlane_1_file_no_group_commit"] = _without_group_commit(ctx, pool, writers)
    keys = [k for k in SESSIONLANE_KEYS if k in result]
    result["ratios"] = {
        key: {
            f"{how}_{peer}": ratio(result[key]["records_per_s"], result[peer]["records_per_s"])
            for how, peer in (("over", "fsync_each"), ("of", "batched_w"), ("of", "ceiling"))
        }
        for key in keys
    }
    return result


def _lane_appends(
    ctx: BenchContext, pool: WorkerPool, address: str, paths: list[str], writers: int
) -> dict[str, Any]:
    """``writers`` processes appending one record at a time, round-robin over ``paths``."""
    from sessionlane.system.client import connect

    with connect(address) as sl:
        ctx.progress.step(f"opening {len(paths)} file(s)")
        setup = sl.lane("bench:append-setup")
        for path in paths:
            setup.append(path, record(0, 0))
        ctx.progress.step(f"{writers} writers, {len(paths)} file(s)")
        before = _counters(sl, paths)
        params = [
            {"address": address, "paths": paths, "index": i, "duration": ctx.duration}
            for i in range(writers)
        ]
        runs = pool.run(
            "sessionlane.system.bench._workers:lane_appends",
            params,
            timeout=ctx.duration + _SLACK_S,
        )
        after = _counters(sl, paths)
    return _through_sessionlane(runs, before, after)


def _pipelined(
    ctx: BenchContext, pool: WorkerPool, address: str, path: str, writers: int
) -> dict[str, Any]:
    """``writers`` processes taking turns on ``path``, each turn one pipeline of records."""
    from sessionlane.system.client import connect

    with connect(address) as sl:
        ctx.progress.step("opening the pipelined file")
        sl.lane("bench:append-setup").append(path, record(0, 0))
        ctx.progress.step(f"{writers} pipelining writers, 1 file")
        before = _counters(sl, [path])
        params = [
            {
                "address": address,
                "path": path,
                "index": i,
                "duration": ctx.duration,
                "window": PIPELINE_WINDOW,
                "per_lease": PIPELINE_PER_LEASE,
            }
            for i in range(writers)
        ]
        runs = pool.run(
            "sessionlane.system.bench._workers:pipelined_appends",
            params,
            timeout=ctx.duration + _SLACK_S,
        )
        after = _counters(sl, [path])
    records = sum(r["records"] for r in runs)
    appends = after["appends"] - before["appends"]
    return {
        "records_per_s": rate(records, max(r["elapsed"] for r in runs)),
        "window": PIPELINE_WINDOW,
        "per_lease": PIPELINE_PER_LEASE,
        **latency_ms([t for r in runs for t in r["turns"]], "turn"),
        "append_ms_p50": None,
        "append_ms_p99": None,
        "syncs_per_append": rounded((after["syncs"] - before["syncs"]) / max(1, appends), 3),
    }


def _group_commit_switch() -> Any:
    """The SessionFile class if it has the ``group_commit`` switch, else None."""
    from sessionlane.actors.session_file import SessionFile

    return SessionFile if isinstance(getattr(SessionFile, "group_commit", None), bool) else None


def _without_group_commit(ctx: BenchContext, pool: WorkerPool, writers: int) -> dict[str, Any]:
    """The one-file run again on a service whose SessionFiles sync every append.

    The switch is a class attribute read in the actor processes, which are forked from this
    one: it is set before the service starts and restored right after it stops.
    """
    session_file = _group_commit_switch()
    saved = session_file.group_commit
    session_file.group_commit = False
    try:
        with ctx.service(f"{NAME}-no-group-commit") as (service, root):
            return _lane_appends(ctx, pool, service.address, [str(root / "one.jsonl")], writers)
    finally:
        session_file.group_commit = saved


def _record_bytes() -> int:
    from sessionlane.system.bench._peers import encode

    return len(encode([record(0, 0)]))


def _counters(sl: Any, paths: list[str]) -> dict[str, int]:
    wanted = {os.path.realpath(p) for p in paths}
    totals = {"syncs": 0, "appends": 0}
    for f in sl.status().files:
        if f.path in wanted:
            for key in totals:
                totals[key] += f.counters.get(key, 0)
    return totals


def _through_sessionlane(
    runs: list[dict[str, Any]], before: dict[str, int], after: dict[str, int]
) -> dict[str, Any]:
    latencies = [x for r in runs for x in r["latencies"]]
    elapsed = max(r["elapsed"] for r in runs)
    appends = after["appends"] - before["appends"]
    return {
        "records_per_s": rate(len(latencies), elapsed),
        **latency_ms(latencies, "append"),
        "syncs_per_append": rounded((after["syncs"] - before["syncs"]) / max(1, appends), 3),
    }


def render(result: dict[str, Any]) -> list[Table]:
    rows = []
    for key in result["ratios"]:
        m, r = result[key], result["ratios"][key]
        label = key
        if "window" in m:  # the pipelined writers: how many in flight, how many per turn
            label = f"{key} ({m['window']} in flight, {m['per_lease']}/turn)"
        rows.append(
            [
                label,
                fmt(m["records_per_s"], 0),
                fmt(m["syncs_per_append"], 3),
                fmt(m["append_ms_p50"]),
                fmt(m["append_ms_p99"]),
                fmt(r["over_fsync_each"], 2, "x"),
                fmt(r["of_ceiling"], 3, "x"),
            ]
        )
    for key in ("fsync_each", "batched_w", "ceiling"):
        m = result[key]
        label = f"{key} ({m['batch']}/sync)"
        rows.append(
            [label, fmt(m["records_per_s"], 0), fmt(m["syncs_per_append"], 3), "-", "-", "-", "-"]
        )
    return [
        table(
            f"append: durable records/s, {result['writers']} writer processes, "
            f"{result['record_bytes']}-byte records",
            [
                "writer",
                "records/s",
                "syncs/append",
                "p50 ms",
                "p99 ms",
                "x fsync-each",
                "of ceiling",
            ],
            rows,
        )
    ]
