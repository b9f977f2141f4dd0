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

The state directory is trusted only if it is this user's own: :func:`private_dir` creates it
0700 and refuses one that is a symbolic link, not a directory, another user's, or writable by
other users (``StateDirError``, saying what to do); one of ours that others may only read or
search is made 0700 (nobody else can have put a file in it). Otherwise another user could pre-create
``/tmp/sessionlane-<uid>`` and plant a state file naming their own port, and ``status`` would
talk to them. A state file that is not this user's own is skipped all the same.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sessionlane.actors import procfs
from sessionlane.system.config import ConfigError, normalize_listen

__all__ = [
    "Choice",
    "Found",
    "StateDirError",
    "StopPlan",
    "choose",
    "found_services",
    "is_live",
    "is_serve_process",
    "plan_stop",
    "private_dir",
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


class StateDirError(RuntimeError):
    """The state directory cannot be trusted; the message says why and what to do."""


def private_dir(path: Path) -> Path:
    """``path``, created 0700 if missing, once found to be this user's private directory.

    Raises :class:`StateDirError` if it is a symbolic link, not a directory, owned by another
    user, or writable by other users: its state files could then be anyone's. Ours and only
    readable by others (an older or hand-made 0755): made 0700.
    """
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StateDirError(
            f"cannot create the state directory {path}: {exc.strerror or exc}; set"
            " XDG_RUNTIME_DIR to a directory of your own"
        ) from None
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise StateDirError(f"cannot inspect the state directory {path}: {exc}") from None
    problem = _untrusted(info)
    if problem is None:
        if info.st_mode & 0o077:
            os.chmod(path, 0o700, follow_symlinks=False)
        return path
    raise StateDirError(
        f"the state directory {path} {problem}, so its state files could be another user's"
        f" (one could send status to their port): refusing to use it. {_remedy(path, info)}"
    )


def _untrusted(info: os.stat_result) -> str | None:
    """What makes a state directory untrustworthy, or None."""
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a directory"
    if info.st_uid != os.getuid():
        return f"belongs to uid {info.st_uid}, not to this user (uid {os.getuid()})"
    if info.st_mode & 0o022:
        return f"is writable by other users (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def _remedy(path: Path, info: os.stat_result) -> str:
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
        return (
            f"Check that every file in it is yours, then chmod 700 {path} (or remove it: it"
            " holds only state files)."
        )
    return (
        f"Have it removed (it is not yours: ask its owner or root to rm -r {path}), or set"
        " XDG_RUNTIME_DIR to a private directory of your own."
    )


def read_states(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every readable state file of this user's in ``directory`` and its content (live or
    not). A file another user owns, or a link, is skipped: it is nobody's state of ours."""
    found = []
    for path in sorted(directory.glob("serve-*.json")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with open(fd, encoding="utf-8") as fh:
                if os.fstat(fh.fileno()).st_uid != os.getuid():
                    continue
                state = json.loads(fh.read())
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
