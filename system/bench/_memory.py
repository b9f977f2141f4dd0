"""Process memory and file ownership, read from ``/proc`` (Linux only).

USS (unique set size: ``Private_Clean + Private_Dirty``) is what a process costs: the memory
that would be freed if it exited. PSS splits shared pages among their sharers, so its sum over
a process group is the group's share of RAM. Both come from ``/proc/<pid>/smaps_rollup``.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable
from dataclasses import dataclass

from sessionlane.actors import procfs

__all__ = ["Usage", "ensure_limit", "holders", "usage"]


@dataclass(frozen=True)
class Usage:
    """One process's memory, in KiB."""

    uss_kb: int
    pss_kb: int
    rss_kb: int


def usage(pid: int) -> Usage | None:
    """The memory of ``pid``, or None if it is gone or unreadable."""
    fields = procfs.memory_kb(pid)
    if fields is None:
        return None
    return Usage(
        uss_kb=fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
        pss_kb=fields.get("Pss", 0),
        rss_kb=fields.get("Rss", 0),
    )


def holders(pids: Iterable[int], paths: set[str]) -> dict[int, str]:
    """Which of ``pids`` hold one of ``paths`` open: pid -> path (a SessionFile keeps its
    transcript open for its whole life, so this finds the SessionFile actors)."""
    found: dict[int, str] = {}
    for pid in pids:
        target = next((t for t in procfs.fd_targets(pid) if t in paths), None)
        if target is not None:
            found[pid] = target
    return found


def ensure_limit(kind: int, needed: int) -> tuple[bool, str]:
    """Raise the soft ``RLIMIT_*`` ``kind`` towards ``needed`` (up to the hard limit).

    Returns whether the soft limit now reaches ``needed``, and what was done.
    """
    soft, hard = resource.getrlimit(kind)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return True, f"soft limit {soft} suffices"
    target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    if target > soft:
        resource.setrlimit(kind, (target, hard))
    if target >= needed:
        return True, f"soft limit raised from {soft} to {target}"
    return False, f"soft limit {target} (hard {hard}) is below the {needed} needed"
