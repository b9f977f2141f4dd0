"""Suite ``scale``: N session files active at once (N = 10, 100, 500; quick: 10, 100).

For each N, a fresh service with a short ``idle_ms``: one client lane takes a ``prompt`` lease
on N new files in turn and appends a record to each (time to first grant includes creating
the file's actor), and holds them all, so all N SessionFile actors are live together. Then:

* memory (``/proc/<pid>/smaps_rollup``) of every process of the actor system: USS per
  SessionFile actor (found as the process that holds the transcript open), USS and PSS summed
  over the group, and the group's USS before the first file (admin, logger, registry,
  gateway);
* the leases are released, and a bounded poll waits until idle passivation has retired every
  SessionFile actor; the group's memory is measured again.

N = 500 needs about 4 descriptors per actor in the admin: the soft ``RLIMIT_NOFILE`` is raised
toward the hard limit first, and the level is skipped (with the reason) if that is not enough.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any

from rich.table import Table

from sessionlane.system.bench._context import BenchContext
from sessionlane.system.bench._memory import ensure_limit, holders, usage
from sessionlane.system.bench._report import fmt, table
from sessionlane.system.bench._stats import latency_ms, percentile, rate, rounded
from sessionlane.system.bench._workers import record

__all__ = ["NAME", "render", "run"]

NAME = "scale"
_IDLE_MS = 1000
_FDS_PER_FILE = 4
_FD_RESERVE = 512
_POLL_S = 0.25
_SPARE_FILES = 8


def run(ctx: BenchContext) -> dict[str, Any]:
    levels = (10, 100) if ctx.quick else (10, 100, 500)
    result: dict[str, Any] = {"idle_ms": _IDLE_MS}
    for n in levels:
        fds_ok, fds_note = ensure_limit(resource.RLIMIT_NOFILE, _FDS_PER_FILE * n + _FD_RESERVE)
        procs_ok, procs_note = ensure_limit(resource.RLIMIT_NPROC, n + _FD_RESERVE)
        if not (fds_ok and procs_ok):
            note = fds_note if not fds_ok else procs_note
            ctx.progress.step(f"skipping {n} files: {note}")
            result[f"files{n}"] = {"files": n, "skipped": note}
            continue
        result[f"files{n}"] = _level(ctx, n)
    return result


def _level(ctx: BenchContext, n: int) -> dict[str, Any]:
    from sessionlane.system.client import connect

    with (
        # max_files: every level's files live at once (the default, 256, would refuse 500).
        ctx.service(f"{NAME}-{n}", idle_ms=_IDLE_MS, max_files=n + _SPARE_FILES) as (
            service,
            root,
        ),
        connect(service.address) as sl,
    ):
        system = service.running.system
        idle = _group(system.members())
        lane = sl.lane("bench:scale")
        paths = [str(root / f"session-{i:04d}.jsonl") for i in range(n)]
        ctx.progress.step(f"{n} files: taking a lease on each")
        firsts: list[float] = []
        leases = []
        began = time.monotonic()
        for i, path in enumerate(paths):
            asked = time.perf_counter()
            lease = lane.acquire(path, purpose="prompt")
            firsts.append(time.perf_counter() - asked)
            assert lease is not None
            lease.append(record(0, i))
            leases.append(lease)
            ctx.progress.tick()
        opened_s = time.monotonic() - began
        ctx.progress.step(f"{n} files: measuring memory")
        canonical = {os.path.realpath(p) for p in paths}
        members = system.members()
        files = holders(members, canonical)
        active = _group(members)
        per_file = [u.uss_kb for pid in files if (u := usage(pid)) is not None]
        ctx.progress.step(f"{n} files: released, waiting for idle passivation")
        for lease in leases:
            lease.release()
        released = time.monotonic()
        deadline = released + 3 * _IDLE_MS / 1000.0 + 10.0 + 0.05 * n
        alive = files
        while alive and time.monotonic() < deadline:
            ctx.sleep(_POLL_S)
            alive = holders(system.members(), canonical)
        passivated_s = time.monotonic() - released
        after = _group(system.members())
    return {
        "files": n,
        **latency_ms(firsts, "first_grant"),
        # The least loaded activation: on a shared machine the p50 moves more between two runs
        # of the same code than most changes to activation do.
        "first_grant_ms_min": rounded(1000.0 * min(firsts), 3) if firsts else None,
        "files_per_s": rate(n, opened_s),
        "sessionfiles_found": len(files),
        "sessionfile_uss_mb_p50": _mb(percentile(per_file, 50)),
        "sessionfile_uss_mb_max": _mb(max(per_file, default=None)),
        "group_processes": active["processes"],
        "group_uss_mb": active["uss_mb"],
        "group_pss_mb": active["pss_mb"],
        "idle_group_uss_mb": idle["uss_mb"],
        "uss_mb_per_file": rounded((active["uss_mb"] - idle["uss_mb"]) / n, 2),
        "after_passivation": {
            "sessionfiles_alive": len(alive),
            "seconds": rounded(passivated_s, 2),
            "group_processes": after["processes"],
            "group_uss_mb": after["uss_mb"],
            "group_pss_mb": after["pss_mb"],
        },
    }


def _group(pids: list[int]) -> dict[str, Any]:
    found = [u for pid in pids if (u := usage(pid)) is not None]
    return {
        "processes": len(found),
        "uss_mb": _mb(sum(u.uss_kb for u in found)) or 0.0,
        "pss_mb": _mb(sum(u.pss_kb for u in found)) or 0.0,
    }


def _mb(kb: float | None) -> float | None:
    return None if kb is None else rounded(kb / 1024.0, 1)


def render(result: dict[str, Any]) -> list[Table]:
    rows = []
    for key, m in result.items():
        if not key.startswith("files"):
            continue
        if "skipped" in m:
            rows.append([str(m["files"]), f"skipped: {m['skipped']}", *["-"] * 9])
            continue
        after = m["after_passivation"]
        rows.append(
            [
                str(m["files"]),
                fmt(m.get("first_grant_ms_min")),
                fmt(m["first_grant_ms_p50"]),
                fmt(m["first_grant_ms_p99"]),
                fmt(m["sessionfile_uss_mb_p50"], 1),
                fmt(m["uss_mb_per_file"], 2),
                fmt(m["group_uss_mb"], 0),
                fmt(m["group_pss_mb"], 0),
                str(m["group_processes"]),
                fmt(after["group_uss_mb"], 0),
                f"{after['sessionfiles_alive']} left, {fmt(after['seconds'], 1)} s",
            ]
        )
    return [
        table(
            f"scale: N files held at once (idle_ms {result['idle_ms']} for passivation)",
            [
                "N",
                "1st grant min ms",
                "p50 ms",
                "p99 ms",
                "USS/file MB",
                "marginal MB/file",
                "group USS MB",
                "group PSS MB",
                "processes",
                "USS after idle MB",
                "passivation",
            ],
            rows,
        )
    ]
