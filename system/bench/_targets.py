"""The product's performance goals, checked against one run's results: reported, never asserted.

Each goal names the figure it reads; a figure the run did not measure (a suite not selected,
``--quick`` without K = 8 or 500 files, a peer that cannot run here) is reported with ``met``
None.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.table import Table

from sessionlane.system.bench._report import fmt, table

__all__ = ["render", "targets"]


def _get(results: dict[str, Any], *keys: str) -> Any:
    value: Any = results
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _min(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _gb(mb: float | None) -> float | None:
    return None if mb is None else round(mb / 1024.0, 2)


_TARGETS: list[tuple[str, str, str, Callable[[dict[str, Any]], Any], Callable[[float], bool]]] = [
    (
        "hand-off p50, 8 processes on one file",
        "< 1 ms",
        "ms",
        lambda r: _get(r, "handoff", "sessionlane", "k8", "handoff_ms_p50"),
        lambda v: v < 1.0,
    ),
    (
        "fairness, 8 processes on one file (fewest / most cycles)",
        ">= 0.99",
        "",
        lambda r: _get(r, "handoff", "sessionlane", "k8", "fairness"),
        lambda v: v >= 0.99,
    ),
    (
        "lease cycles/s, 8 processes on one file",
        ">= 1500/s",
        "/s",
        lambda r: _get(r, "handoff", "sessionlane", "k8", "cycles_per_s"),
        lambda v: v >= 1500.0,
    ),
    (
        "lease cycles/s, 8 processes on 8 files",
        ">= 3000/s",
        "/s",
        lambda r: _get(r, "handoff", "sessionlane", "files8", "cycles_per_s"),
        lambda v: v >= 3000.0,
    ),
    (
        "lease cycles/s, 8 processes on one file, append and release",
        ">= 1500/s",
        "/s",
        lambda r: _get(r, "handoff", "sessionlane_fused", "k8", "cycles_per_s"),
        lambda v: v >= 1500.0,
    ),
    (
        "lease cycles/s, 8 processes on 8 files, append and release",
        ">= 3000/s",
        "/s",
        lambda r: _get(r, "handoff", "sessionlane_fused", "files8", "cycles_per_s"),
        lambda v: v >= 3000.0,
    ),
    (
        "worst wait at K=8 vs the polling locks (worse of filelock, lockfile, redis)",
        ">= 20x lower",
        "x",
        lambda r: _min(
            _get(r, "handoff", "ratios", "k8", "filelock", "wait_max"),
            _get(r, "handoff", "ratios", "k8", "lockfile", "wait_max"),
            _get(r, "handoff", "ratios", "k8", "redis", "wait_max"),
        ),
        lambda v: v >= 20.0,
    ),
    (
        "lease cycles/s vs a Redis lock, 8 processes on one file",
        ">= 1x (moonshot)",
        "x",
        lambda r: _get(r, "handoff", "ratios", "k8", "redis", "cycles"),
        lambda v: v >= 1.0,
    ),
    (
        "uncontended turn overhead over the direct write (p50)",
        "< 5 ms",
        "ms",
        lambda r: _get(r, "turn", "sessionlane", "overhead_ms_p50"),
        lambda v: v < 5.0,
    ),
    (
        "pipelined durable appends, 8 writers on one file",
        ">= 20000/s",
        "/s",
        lambda r: _get(r, "append", "sessionlane_pipelined", "records_per_s"),
        lambda v: v >= 20000.0,
    ),
    (
        "private memory (USS) of the service holding 500 live files",
        "< 1.5 GB",
        "GB",
        lambda r: _gb(_get(r, "scale", "files500", "group_uss_mb")),
        lambda v: v < 1.5,
    ),
    (
        "the same with memory_merge (--memory-merge), once the kernel merged their pages",
        "< 1.5 GB",
        "GB",
        lambda r: _gb(_get(r, "scale", "files500", "merged", "group_uss_mb")),
        lambda v: v < 1.5,
    ),
    (
        "the same with memory_merge, right after one more append on every file",
        "< 1.5 GB",
        "GB",
        lambda r: _gb(
            _get(r, "scale", "files500", "merged", "after_one_append_each", "group_uss_mb")
        ),
        lambda v: v < 1.5,
    ),
    (
        "activation of a new file (first grant p50, 500 files)",
        "< 10 ms",
        "ms",
        lambda r: _get(r, "scale", "files500", "first_grant_ms_p50"),
        lambda v: v < 10.0,
    ),
]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per target: what it is, the goal, the measured value and whether it is met."""
    out = []
    for name, goal, unit, read, check in _TARGETS:
        value = read(results)
        out.append(
            {
                "target": name,
                "goal": goal,
                "measured": value,
                "unit": unit,
                "met": None if value is None else check(value),
            }
        )
    return out


def render(entries: list[dict[str, Any]]) -> Table:
    rows = [
        [
            e["target"],
            e["goal"],
            "-" if e["measured"] is None else f"{fmt(e['measured'], 2)} {e['unit']}",
            "not measured" if e["met"] is None else ("met" if e["met"] else "NOT met"),
        ]
        for e in entries
    ]
    return table("goals: where sessionlane stands", ["goal", "target", "measured", ""], rows)
