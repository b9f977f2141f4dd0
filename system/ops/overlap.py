"""Live services on this machine, and the friendly early refusal of overlapping roots.

The guarantee that one file has one owner is the kernel lock of ``sessionlane.actors.ownership``;
this module only makes a collision visible early. ``sessionlane serve`` writes a state file
(``sessionlane.system.runtime.service.state_dir()``) naming its pid, the pid's start time, its
addresses and its roots. A service is *live* when its pid runs and started at the recorded time (a
recycled pid does not count; state files of services written before start times were recorded fall
back to "the pid runs ``serve``"), so the state file a ``kill -9`` left behind never blocks
anything.

Two root sets overlap when a root of one equals, contains or lies inside a root of the other
(compared after ``realpath``). ``serve`` refuses to start on an overlap with a live service
unless ``allow_overlap`` says it is intended; ``doctor`` reports overlapping live services.
Services that write no state file (embedded in ``race``, ``bench`` or a test, or running as
another user) are not seen here: the kernel lock still keeps them from serving a file twice.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sessionlane.actors import procfs
from sessionlane.system.config import ConfigError, parse_listen
from sessionlane.system.ops.running import found_services, is_live, read_states

__all__ = [
    "LiveService",
    "Overlap",
    "Relation",
    "await_leftovers",
    "busy_listener_hint",
    "find_overlaps",
    "relation",
]

Relation = Literal["the same directory as", "inside", "contains"]


@dataclass(frozen=True)
class LiveService:
    """A running ``sessionlane serve``, as its state file describes it."""

    pid: int
    listen: str
    addresses: tuple[str, ...]
    roots: tuple[str, ...]
    state_path: Path

    @property
    def address(self) -> str:
        return self.addresses[0] if self.addresses else self.listen

    @classmethod
    def from_state(cls, path: Path, state: dict[str, Any]) -> LiveService:
        return cls(
            pid=int(state["pid"]),
            listen=str(state.get("listen", "")),
            addresses=tuple(str(a) for a in state.get("addresses") or []),
            roots=tuple(str(r) for r in state.get("roots") or []),
            state_path=path,
        )


def live_services(directory: Path) -> list[LiveService]:
    return [LiveService.from_state(f.path, f.state) for f in found_services(directory) if f.live]


def relation(mine: str, theirs: str) -> Relation | None:
    """How root ``mine`` relates to root ``theirs`` (both canonical), or None: disjoint."""
    if mine == theirs:
        return "the same directory as"
    if mine.startswith(theirs.rstrip(os.sep) + os.sep):
        return "inside"
    if theirs.startswith(mine.rstrip(os.sep) + os.sep):
        return "contains"
    return None


@dataclass(frozen=True)
class Overlap:
    """Root ``mine`` is ``relation`` root ``theirs`` of the live ``service``."""

    mine: str
    relation: Relation
    theirs: str
    service: LiveService

    @property
    def sentence(self) -> str:
        """``/a/b is inside /a``, ``/a contains /a/b``, ``/a is the same directory as /a``."""
        verb = self.relation if self.relation == "contains" else f"is {self.relation}"
        return f"{self.mine} {verb} {self.theirs}"

    def describe(self) -> str:
        return (
            f"root {self.sentence}, served by the live sessionlane service pid"
            f" {self.service.pid} at {self.service.address}"
        )


def find_overlaps(roots: Iterable[str], services: Iterable[LiveService]) -> list[Overlap]:
    """Every pair of one of ``roots`` and a live service's root that overlap (pure)."""
    found = []
    canonical = [os.path.realpath(r) for r in roots]
    for service in services:
        for theirs in service.roots:
            for mine in canonical:
                rel = relation(mine, os.path.realpath(theirs))
                if rel is not None:
                    found.append(Overlap(mine, rel, theirs, service))
    return found


def await_leftovers(listen: str, directory: Path, timeout: float) -> list[int]:
    """Wait (bounded) for the actor processes of dead services that listened on ``listen``.

    A ``kill -9`` of ``serve`` is followed within milliseconds by its lifeline killing the
    actor system, but a restart script may be faster: this lets a new ``serve`` on the same
    address start instead of failing on the port. Returns the pids still alive at the end.
    """
    with contextlib.suppress(ConfigError):
        parsed = parse_listen(listen)
        if parsed[0] == "tcp" and parsed[2] == 0:
            return []  # a fresh port each time: nothing to wait for
    groups = [
        int(state["pgid"])
        for _, state in read_states(directory)
        if state.get("listen") == listen
        and isinstance(state.get("pgid"), int)
        and not is_live(state)
    ]
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid, st in procfs.all_stats().items() if st.pgrp in groups and st.live]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


def busy_listener_hint(listen: Sequence[str], directory: Path) -> str:
    """Why a gateway address is taken, and how to clean up; "" when nothing useful is known.

    A state file naming the address tells whose it is: a live service (stop it or pick another
    address) or a dead one whose actor processes were left behind (``sessionlane stop``).
    """
    for address in listen:
        try:
            parsed = parse_listen(address)
        except ConfigError:
            continue
        if parsed[0] != "tcp" or parsed[2] == 0:
            continue
        port = parsed[2]
        if not any(p == port for _, p in procfs.listening_tcp().values()):
            continue
        for _, state in read_states(directory):
            if address not in {state.get("listen"), *(state.get("addresses") or [])}:
                continue
            if is_live(state):
                return (
                    f"; {address} is served by the live sessionlane service pid {state['pid']}:"
                    f" stop it (`sessionlane stop --listen {address}`) or pick another --listen"
                )
            return (
                f"; {address} is still held by the leftover actor processes of a sessionlane"
                f" service whose serve process (pid {state.get('pid')}) is gone: clean them up"
                f" with `sessionlane stop --listen {address}`"
            )
        return (
            f"; something else listens on port {port}: if it is a sessionlane service left"
            " behind, `sessionlane doctor` finds it and `sessionlane stop --listen"
            f" {address}` cleans it up"
        )
    return ""
