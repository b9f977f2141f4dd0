"""Suite ``cost``: what a service spends, per unit of work and per thing it holds.

* **CPU per lease cycle** (acquire, append one record, release): ``L`` client processes loop on
  one file (``L`` = 1, 2, 4, 8) and ``L`` processes on ``L`` files, one each; **CPU per
  append**: ``W`` lane-less writers on one file (``W`` = 1, 8). CPU is the ``utime + stime`` of
  every process of the service's actor system (``/proc/<pid>/stat``) over the timed run,
  divided by the cycles or appends the workers completed in it: CPU time, not wall time, so a
  busy machine moves it much less than a rate. The bench's own process (which hosts the
  embedded service's supervisor, idle during a run) is not counted, nor are the clients.
* **Memory per live file**: one lane takes a lease on files one after another and holds them;
  the group's USS (``Private_Clean + Private_Dirty``, summed over the system's processes) is
  read at 0, 1, 10, 50 and 100 live files (quick: 0, 1, 10, 30).
* **Memory per connection**: idle client connections are opened to the gateway (0, 1, 50, 200;
  quick: 0, 1, 50), and the gateway's USS and the group's are read at each count.

Each "per" figure is a least-squares slope over its points (``model``), so a fixed cost (the
service's base) is not spread over the units. ``sessionlane bench --plot FILE`` draws the points
(``sessionlane.system.bench._plot``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from rich.table import Table

from sessionlane.actors import procfs
from sessionlane.system.bench._context import BenchContext
from sessionlane.system.bench._memory import usage
from sessionlane.system.bench._pool import WorkerPool
from sessionlane.system.bench._report import fmt, table
from sessionlane.system.bench._stats import rate, rounded
from sessionlane.system.bench._workers import record

__all__ = ["NAME", "render", "run", "slope"]

NAME = "cost"
_IDLE_MS = 600_000  # nothing passivates while it is measured
_MAX_CYCLES = 200_000
_SLACK_S = 60.0
_SPARE = 16


def run(ctx: BenchContext) -> dict[str, Any]:
    lanes = (1, 2, 4) if ctx.quick else (1, 2, 4, 8)
    spread = (2, 4) if ctx.quick else (2, 8)
    writers = (1, 4) if ctx.quick else (1, 8)
    file_counts = (0, 1, 10, 30) if ctx.quick else (0, 1, 10, 50, 100)
    connection_counts = (0, 1, 50) if ctx.quick else (0, 1, 50, 200)
    result: dict[str, Any] = {}
    with (
        ctx.pool(max(*lanes, *spread, *writers)) as pool,
        ctx.service(f"{NAME}-cpu") as (service, root),
    ):
        members = service.running.system.members
        result["cycle_one_file"] = [
            _cycles(ctx, pool, service.address, members, [str(root / f"k{k}.jsonl")] * k)
            for k in lanes
        ]
        result["cycle_own_file"] = [
            _cycles(
                ctx,
                pool,
                service.address,
                members,
                [str(root / f"f{k}-{i}.jsonl") for i in range(k)],
            )
            for k in spread
        ]
        result["append_one_file"] = [
            _appends(ctx, pool, service.address, members, str(root / f"w{w}.jsonl"), w)
            for w in writers
        ]
    with ctx.service(f"{NAME}-memory", idle_ms=_IDLE_MS, max_files=max(file_counts) + _SPARE) as (
        service,
        root,
    ):
        result["memory_files"] = _memory_files(ctx, service, root, file_counts)
        result["memory_connections"] = _memory_connections(ctx, service, connection_counts)
    result["model"] = model(result)
    return result


@contextlib.contextmanager
def _service_cpu(members: Any) -> Iterator[dict[str, float]]:
    """The service's CPU seconds spent inside the block, in the yielded dict's ``"cpu_s"``.

    Processes that exit inside the block are lost from the sum; none does here (nothing
    passivates, no file is retired)."""
    spent: dict[str, float] = {}
    before = {pid: procfs.cpu_seconds([pid]) for pid in members()}
    yield spent
    after = members()
    spent["cpu_s"] = sum(procfs.cpu_seconds([pid]) - before.get(pid, 0.0) for pid in after)


def _prepare(address: str, paths: Sequence[str]) -> None:
    """Open every file once, so the timed run does not pay for activations."""
    from sessionlane.system.client import connect

    with connect(address) as sl:
        lane = sl.lane("bench:cost-setup")
        for path in dict.fromkeys(paths):
            lease = lane.acquire(path, purpose="write")
            assert lease is not None  # waits: never None
            lease.append(record(0, 0))
            lease.release()


def _cycles(
    ctx: BenchContext, pool: WorkerPool, address: str, members: Any, paths: list[str]
) -> dict[str, Any]:
    files = len(set(paths))
    ctx.progress.step(f"CPU: {len(paths)} processes on {files} file(s)")
    _prepare(address, paths)
    params = [
        {
            "kind": "sessionlane",
            "path": path,
            "address": address,
            "index": i,
            "duration": ctx.duration,
            "max_cycles": _MAX_CYCLES,
        }
        for i, path in enumerate(paths)
    ]
    with _service_cpu(members) as spent:
        runs = pool.run(
            "sessionlane.system.bench._workers:lock_cycles", params, timeout=ctx.duration + _SLACK_S
        )
    cycles = sum(len(r) for r in runs)
    elapsed = max((r[-1][3] - r[0][0] for r in runs if r), default=0.0)
    return {
        "lanes": len(paths),
        "files": files,
        "cycles": cycles,
        "cycles_per_s": rate(cycles, elapsed),
        "cpu_s": rounded(spent["cpu_s"], 3),
        "cpu_ms_per_cycle": rounded(1000.0 * spent["cpu_s"] / cycles, 3) if cycles else None,
    }


def _appends(
    ctx: BenchContext, pool: WorkerPool, address: str, members: Any, path: str, writers: int
) -> dict[str, Any]:
    ctx.progress.step(f"CPU: {writers} writer(s) appending to one file")
    _prepare(address, [path])
    params = [
        {"address": address, "paths": [path], "index": i, "duration": ctx.duration}
        for i in range(writers)
    ]
    with _service_cpu(members) as spent:
        runs = pool.run(
            "sessionlane.system.bench._workers:lane_appends",
            params,
            timeout=ctx.duration + _SLACK_S,
        )
    appends = sum(len(r["latencies"]) for r in runs)
    return {
        "writers": writers,
        "appends": appends,
        "appends_per_s": rate(appends, max(r["elapsed"] for r in runs)),
        "cpu_s": rounded(spent["cpu_s"], 3),
        "cpu_ms_per_append": rounded(1000.0 * spent["cpu_s"] / appends, 3) if appends else None,
    }


def _group_uss_mb(pids: Sequence[int]) -> float:
    return sum(u.uss_kb for pid in pids if (u := usage(pid)) is not None) / 1024.0


def _memory_files(
    ctx: BenchContext, service: Any, root: Any, counts: Sequence[int]
) -> list[dict[str, Any]]:
    from sessionlane.system.client import connect

    points = []
    with connect(service.address) as sl:
        lane = sl.lane("bench:cost-files")
        leases: list[Any] = []
        for n in counts:
            ctx.progress.step(f"memory: {n} live files")
            while len(leases) < n:
                lease = lane.acquire(str(root / f"live-{len(leases):04d}.jsonl"), purpose="prompt")
                assert lease is not None
                lease.append(record(0, len(leases)))
                leases.append(lease)
            members = service.running.system.members()
            points.append(
                {
                    "files": n,
                    "processes": len(members),
                    # the group's count also holds the zygote's next file actor while it is
                    # being forked ahead: the live files' own processes are counted apart
                    "file_processes": sum(
                        procfs.command_line(pid).startswith("sessionlane: file ") for pid in members
                    ),
                    "group_uss_mb": rounded(_group_uss_mb(members), 1),
                }
            )
        for lease in leases:
            lease.release()
    return points


def _memory_connections(
    ctx: BenchContext, service: Any, counts: Sequence[int]
) -> list[dict[str, Any]]:
    from sessionlane.system.client import connect

    gateway = _gateway_pid(service.running.system.members())
    points = []
    with contextlib.ExitStack() as stack:
        clients: list[Any] = []
        for n in counts:
            ctx.progress.step(f"memory: {n} idle connections")
            while len(clients) < n:
                sl = stack.enter_context(connect(service.address))
                sl.lane(f"bench:idle-{len(clients)}")
                sl.status()  # a round trip: the gateway has admitted the connection
                clients.append(sl)
                ctx.progress.tick()
            members = service.running.system.members()
            gateway_usage = usage(gateway) if gateway is not None else None
            points.append(
                {
                    "connections": n,
                    "gateway_uss_mb": rounded(gateway_usage.uss_kb / 1024.0, 2)
                    if gateway_usage is not None
                    else None,
                    "group_uss_mb": rounded(_group_uss_mb(members), 1),
                }
            )
    return points


def _gateway_pid(pids: Sequence[int]) -> int | None:
    return next((pid for pid in pids if "sessionlane: gateway" in procfs.command_line(pid)), None)


def slope(points: Sequence[tuple[float, float]]) -> float | None:
    """The least-squares slope of ``y`` over ``x``; None with fewer than two distinct ``x``."""
    if len({x for x, _ in points}) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    num = sum((x - mean_x) * (y - mean_y) for x, y in points)
    den = sum((x - mean_x) ** 2 for x, _ in points)
    return num / den


def _series(points: Sequence[dict[str, Any]], x: str, y: str) -> list[tuple[float, float]]:
    return [(p[x], p[y]) for p in points if p.get(y) is not None]


def model(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of the cost model, from the suite's points."""
    cycle_ms = [p["cpu_ms_per_cycle"] for p in result["cycle_one_file"] if p["cpu_ms_per_cycle"]]
    append_ms = [
        p["cpu_ms_per_append"] for p in result["append_one_file"] if p["cpu_ms_per_append"]
    ]
    files = result["memory_files"]
    per_file = slope(_series([p for p in files if p["files"] > 0], "files", "group_uss_mb"))
    # From one connection on: the first one also pays for what the gateway sets up once.
    conns = [p for p in result["memory_connections"] if p["connections"] > 0]
    per_conn = slope(_series(conns, "connections", "gateway_uss_mb"))
    return {
        "cpu_ms_per_cycle": [min(cycle_ms, default=None), max(cycle_ms, default=None)],
        "cpu_ms_per_append": [min(append_ms, default=None), max(append_ms, default=None)],
        "base_uss_mb": files[0]["group_uss_mb"] if files and files[0]["files"] == 0 else None,
        "uss_mb_per_file": rounded(per_file, 2),
        "uss_kb_per_connection": rounded(per_conn * 1024.0, 1) if per_conn is not None else None,
    }


def _span(pair: Sequence[float | None], digits: int) -> str:
    low, high = pair
    if low is None or high is None:
        return "-"
    return (
        fmt(low, digits)
        if fmt(low, digits) == fmt(high, digits)
        else (f"{fmt(low, digits)} to {fmt(high, digits)}")
    )


def render(result: dict[str, Any]) -> list[Table]:
    m = result["model"]
    lanes = [p["lanes"] for p in result["cycle_one_file"]]
    writers = [p["writers"] for p in result["append_one_file"]]
    files = [p["files"] for p in result["memory_files"]]
    conns = [p["connections"] for p in result["memory_connections"]]
    model_rows = [
        [
            "service CPU per lease cycle",
            f"{_span(m['cpu_ms_per_cycle'], 2)} ms",
            f"1 file, {lanes[0]} to {lanes[-1]} lanes",
        ],
        [
            "service CPU per append",
            f"{_span(m['cpu_ms_per_append'], 2)} ms",
            f"1 file, {writers[0]} to {writers[-1]} writers",
        ],
        ["memory, no file live", f"{fmt(m['base_uss_mb'], 1)} MB", "constant"],
        [
            "memory per live file",
            f"{fmt(m['uss_mb_per_file'], 2)} MB",
            f"slope over {files[1]} to {files[-1]} files",
        ],
        [
            "memory per connection",
            f"{fmt(m['uss_kb_per_connection'], 1)} KB",
            f"gateway, slope over {conns[1]} to {conns[-1]} connections",
        ],
    ]
    cpu_rows = [
        [
            f"{p['lanes']} lanes, {p['files']} file(s)",
            str(p["cycles"]),
            fmt(p["cycles_per_s"], 0),
            fmt(p["cpu_s"], 2),
            fmt(p["cpu_ms_per_cycle"], 3),
        ]
        for p in (*result["cycle_one_file"], *result["cycle_own_file"])
    ] + [
        [
            f"{p['writers']} writer(s), 1 file (appends)",
            str(p["appends"]),
            fmt(p["appends_per_s"], 0),
            fmt(p["cpu_s"], 2),
            fmt(p["cpu_ms_per_append"], 3),
        ]
        for p in result["append_one_file"]
    ]
    memory_rows = [
        [f"{p['files']} live files", str(p["processes"]), fmt(p["group_uss_mb"], 1), "-"]
        for p in result["memory_files"]
    ] + [
        [
            f"{p['connections']} idle connections",
            "-",
            fmt(p["group_uss_mb"], 1),
            fmt(p["gateway_uss_mb"], 2),
        ]
        for p in result["memory_connections"]
    ]
    return [
        table(
            "cost model (service processes only; CPU = utime + stime)",
            ["", "cost", "measured over"],
            model_rows,
        ),
        table("cost: CPU", ["run", "count", "per s", "service CPU s", "CPU ms each"], cpu_rows),
        table("cost: memory (USS)", ["held", "processes", "group MB", "gateway MB"], memory_rows),
    ]
