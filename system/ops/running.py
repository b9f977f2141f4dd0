"""Which ``sessionlane serve`` a client command (``status``, ``stop``) means.

Every ``serve`` leaves a state file in this user's state directory
(``sessionlane.system.runtime.service`` ``state_dir()``): its pid, its ``listen`` (canonical
spelling), the addresses it bound, its roots, its actor group. ``status`` and ``stop`` find
services the same way, through these files:

* with ``--listen ADDR`` (or ``$SESSIONLANE_LISTEN``), the service started with that address
  or bound to it, whichever spelling (``HOST:PORT`` or ``tcp://HOST:PORT``);
* without, the one service of this user, and only if it can be told apart: exactly one
  candidate. Anything else is refused with the list of candidates, never guessed.

``choose`` is the pure decision; ``found_services`` reads the files and checks each pid is a
live ``serve`` of this user (a recycled pid, or another user's process, is not "running").
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sessionlane.actors import procfs
from sessionlane.system.config import ConfigError, normalize_listen

__all__ = [
    "Choice",
    "Found",
    "StopPlan",
    "choose",
    "found_services",
    "is_live",
    "is_serve_process",
    "plan_stop",
    "process_start",
    "read_states",
]


@dataclass(frozen=True)
class Found:
    """One state file and whether its serve process is running."""

    path: Path
    """The state file."""
    state: dict[str, Any]
    """Its contents (``sessionlane.system.runtime.service.Service.write_state``)."""
    live: bool
    """Its pid is a live ``serve`` process of this user."""

    @property
    def pid(self) -> int:
        return int(self.state.get("pid") or 0)

    @property
    def listen(self) -> str:
        return str(self.state.get("listen") or "")

    @property
    def addresses(self) -> list[str]:
        """The addresses the gateway bound (the real port when ``listen`` asked for 0)."""
        found = self.state.get("addresses")
        return [str(a) for a in found] if isinstance(found, list) else []

    def answers_to(self, address: str) -> bool:
        """Whether ``address`` names this service: its ``listen`` or a bound address."""
        wanted = _canonical(address)
        known = {_canonical(a) for a in [self.listen, *self.addresses]}
        return wanted is not None and wanted in known

    def describe(self) -> str:
        """One line for a list of candidates."""
        roots = ", ".join(str(r) for r in self.state.get("roots") or []) or "?"
        where = ", ".join(self.addresses) or self.listen or "?"
        alive = "" if self.live else " [not running: `sessionlane stop --listen` cleans up]"
        return f"{where} (pid {self.pid}, roots {roots}){alive}"


@dataclass(frozen=True)
class Choice:
    """The outcome of :func:`choose`."""

    kind: Literal["one", "none", "several"]
    candidates: tuple[Found, ...]
    """The chosen one (``one``), or every candidate that could be meant (``several``)."""

    @property
    def found(self) -> Found:
        assert self.kind == "one", self
        return self.candidates[0]


def choose(found: Sequence[Found], listen: str | None, *, live_only: bool) -> Choice:
    """Which of ``found`` a command means.

    ``listen``: the address the user named (``None``: none named). ``live_only``: only a
    running service will do (``status``); otherwise a dead one's leftovers count too
    (``stop`` cleans them up). A named address matching a live and a dead state file means
    the live one.
    """
    candidates = [f for f in found if f.live or not live_only]
    if listen is not None:
        candidates = [f for f in candidates if f.answers_to(listen)]
        if len(candidates) > 1 and any(f.live for f in candidates):
            candidates = [f for f in candidates if f.live]
    if not candidates:
        return Choice("none", ())
    if len(candidates) > 1:
        return Choice("several", tuple(candidates))
    return Choice("one", (candidates[0],))


@dataclass(frozen=True)
class StopPlan:
    """What ``stop`` does (:func:`plan_stop`)."""

    live: Choice
    """The live service to stop (``one``), none, or several to refuse to guess between."""
    stale: tuple[Found, ...]
    """State files of dead services to clean up (none when refusing)."""


def plan_stop(found: Sequence[Found], listen: str | None) -> StopPlan:
    """``stop``'s decision (pure): among the services ``listen`` names (all, if ``None``), the
    live one to stop and the dead ones to clean up after; several live ones are refused, and
    nothing is cleaned then. Dead services are no choice to make: cleaning up after every one
    of them is safe."""
    meant = [f for f in found if listen is None or f.answers_to(listen)]
    live = choose([f for f in meant if f.live], listen, live_only=True)
    stale = () if live.kind == "several" else tuple(f for f in meant if not f.live)
    return StopPlan(live, stale)


def read_states(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every readable state file in ``directory`` and its content (live or not)."""
    found = []
    for path in sorted(directory.glob("serve-*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict):
            found.append((path, state))
    return found


def found_services(directory: Path) -> list[Found]:
    """Every readable state file in ``directory``, with whether its service runs."""
    return [Found(path, state, is_live(state)) for path, state in read_states(directory)]


def process_start(pid: int) -> str | None:
    """``pid``'s start time (clock ticks since boot), or None if it does not run."""
    stat = procfs.stat(pid)
    return str(stat.start) if stat is not None and stat.live else None


def is_live(state: dict[str, Any]) -> bool:
    """Whether the ``serve`` that wrote ``state`` still runs: its pid, of this user, started
    at the recorded time (a recycled pid does not count). State files written before start
    times were recorded fall back to "the pid is a live ``serve`` of this user"."""
    pid = state.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or not is_serve_process(pid):
        return False
    recorded = state.get("pid_start")
    return recorded is None or recorded == process_start(pid)


def is_serve_process(pid: int) -> bool:
    """Whether ``pid`` is a live ``serve`` of this user (a recycled pid must not be signalled)."""
    if pid <= 0 or procfs.uid(pid) != os.getuid():
        return False
    argv = procfs.cmdline(pid)
    stat = procfs.stat(pid)
    if argv is None or stat is None or not stat.live:
        return False
    # Its argv (``sessionlane serve ...``), or the title ``serve`` gives itself.
    return "serve" in argv or (bool(argv) and argv[0].startswith(SERVE_TITLE))


SERVE_TITLE = "sessionlane: serve "
"""How ``serve`` titles its process (``sessionlane.system.ops.cli``)."""


def _canonical(address: str) -> str | None:
    try:
        return normalize_listen(address)
    except ConfigError:
        return None
