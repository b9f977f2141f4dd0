"""Suite ``scale``: N session files active at once (N = 10, 100, 500; quick: 10, 100).

For each N, a fresh service with a short ``idle_ms``: one client lane takes a ``prompt`` lease
on N new files in turn and appends a record to each (time to first grant includes creating
the file's actor), and holds them all, so all N SessionFile actors are live together. Then:

* memory (``/proc/<pid>/smaps_rollup``) of every process of the actor system: USS per
  SessionFile actor (found as the process that holds the transcript open), USS and PSS summed
  over the group, and the group's USS before the first file (admin, logger, registry,
  gateway);
* with ``--memory-merge`` (every file's process opted in to the kernel's samepage merging), the
  same once the kernel's merging thread has scanned everything three times since the last file
  opened (at most ``_MERGE_WAIT_S``), and again after one more append on each lease (a
  merged page written again is copied back);
* the leases are released, and a bounded poll waits until idle passivation has retired every
  SessionFile actor; the group's memory is measured again.

N = 500 needs about 4 descriptors per actor in the admin: the soft ``RLIMIT_NOFILE`` is raised
toward the hard limit first, and the level is skipped (with the reason) if that is not enough.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable
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
_MERGE_IDLE_MS = 60_000
"""With ``--memory-merge``, the default ``idle_ms``: a file checked for idleness every second
runs code each second, which copies back the pages the kernel merged (passivation is then not
measured)."""
_FDS_PER_FILE = 4
_FD_RESERVE = 512
_POLL_S = 0.25
_SPARE_FILES = 8
_MERGE_SCANS = 3
"""Full scans of the merging thread to wait for: a page is merged once its contents were the
same at two of its scans and its twin was found in the same scan (the first one counted may
have begun before the last file opened)."""
_MERGE_WAIT_S = 300.0
_KSM_FULL_SCANS = "/sys/kernel/mm/ksm/full_scans"


def run(ctx: BenchContext) -> dict[str, Any]:
    levels = (10, 100) if ctx.quick else (10, 100, 500)
    result: dict[str, Any] = {"idle_ms": _MERGE_IDLE_MS if ctx.memory_merge else _IDLE_MS}
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
        ctx.service(
            f"{NAME}-{n}",
            idle_ms=_MERGE_IDLE_MS if ctx.memory_merge else _IDLE_MS,
            max_files=n + _SPARE_FILES,
        ) as (
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
        per_file = _uss_kb(files)
        merged = _merged(ctx, n, files, members, leases) if ctx.memory_merge else None
        for lease in leases:
            lease.release()
        passivation = _passivation(ctx, n, system, canonical, files)
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
        **({"merged": merged} if merged is not None else {}),
        "after_passivation": passivation,
    }


def _passivation(
    ctx: BenchContext, n: int, system: Any, canonical: set[str], files: Iterable[int]
) -> dict[str, Any]:
    """The leases released: wait (bounded) until idle passivation retired every file."""
    if ctx.memory_merge:
        return {"skipped": f"idle_ms is {_MERGE_IDLE_MS} with --memory-merge"}
    ctx.progress.step(f"{n} files: released, waiting for idle passivation")
    released = time.monotonic()
    deadline = released + 3 * _IDLE_MS / 1000.0 + 10.0 + 0.05 * n
    alive = list(files)
    while alive and time.monotonic() < deadline:
        ctx.sleep(_POLL_S)
        alive = list(holders(system.members(), canonical))
    after = _group(system.members())
    return {
        "sessionfiles_alive": len(alive),
        "seconds": rounded(time.monotonic() - released, 2),
        "group_processes": after["processes"],
        "group_uss_mb": after["uss_mb"],
        "group_pss_mb": after["pss_mb"],
    }


def _merged(
    ctx: BenchContext, n: int, files: Iterable[int], members: list[int], leases: list[Any]
) -> dict[str, Any]:
    """The files' memory once the kernel merged their pages, then after one more append each."""
    ctx.progress.step(f"{n} files: waiting for the kernel to merge their pages")
    began = time.monotonic()
    first = _full_scans()
    while _full_scans() < first + _MERGE_SCANS and time.monotonic() - began < _MERGE_WAIT_S:
        ctx.sleep(_POLL_S)
    waited = time.monotonic() - began
    scans = _full_scans() - first
    merged, merged_group = _uss_kb(files), _group(members)
    for i, lease in enumerate(leases):
        lease.append(record(1, i))
    again, again_group = _uss_kb(files), _group(members)
    return {
        "waited_s": rounded(waited, 1),
        "full_scans": scans,
        "sessionfile_uss_mb_p50": _mb(percentile(merged, 50)),
        "group_uss_mb": merged_group["uss_mb"],
        "after_one_append_each": {
            "sessionfile_uss_mb_p50": _mb(percentile(again, 50)),
            "group_uss_mb": again_group["uss_mb"],
        },
    }


def _full_scans() -> int:
    try:
        with open(_KSM_FULL_SCANS) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def _uss_kb(pids: Iterable[int]) -> list[float]:
    return [u.uss_kb for pid in pids if (u := usage(pid)) is not None]


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
        if "skipped" in after:
            after = {"group_uss_mb": None, "sessionfiles_alive": "-", "seconds": None}
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
    tables = [
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
    merged = [
        [
            str(m["files"]),
            fmt(m["sessionfile_uss_mb_p50"], 1),
            fmt(m["merged"]["sessionfile_uss_mb_p50"], 1),
            fmt(m["merged"]["group_uss_mb"], 0),
            fmt(m["merged"]["after_one_append_each"]["sessionfile_uss_mb_p50"], 1),
            fmt(m["merged"]["after_one_append_each"]["group_uss_mb"], 0),
            f"{m['merged']['full_scans']} in {fmt(m['merged']['waited_s'], 1)} s",
        ]
        for key, m in result.items()
        if key.startswith("files") and "merged" in m
    ]
    if merged:
        tables.append(
            table(
                "scale, memory_merge: the same files once the kernel merged their pages",
                [
                    "N",
                    "USS/file MB before",
                    "merged USS/file MB",
                    "merged group USS MB",
                    "after 1 append each USS/file MB",
                    "group USS MB",
                    "full scans",
                ],
                merged,
            )
        )
    return tables
