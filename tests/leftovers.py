"""Find (and optionally kill) processes a test run left behind.

``.ci/run`` exports ``SESSIONLANE_TEST_TAG=<unique>`` before pytest; every process forked or
spawned from the run (thespian admins, loggers and actors, service subprocesses) inherits it
in its environment, which ``/proc/<pid>/environ`` shows even after a daemon ``setsid()``s
away from the test's process tree. A leaked thespian admin keeps CI's output pipe open and
hangs the run, so CI fails loudly on any such process instead.

Usage: ``python tests/leftovers.py [--fail] [--kill]``. Linux only (``/proc``). It reads
``/proc`` itself rather than through ``sessionlane.actors.procfs``: it must run from a clean
checkout without the package installed (``python tests/leftovers.py`` puts ``tests/``, not the
repository, on ``sys.path``), with the standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

__all__ = ["TAG_VARIABLE", "find_leftovers", "kill_leftovers", "main"]

log = logging.getLogger(__name__)

TAG_VARIABLE = "SESSIONLANE_TEST_TAG"


def find_leftovers(tag: str) -> list[tuple[int, str]]:
    """``(pid, cmdline)`` of every live process whose environment has ``TAG_VARIABLE=tag``.

    The calling process and its ancestors (which carry the tag legitimately: the shell that
    exported it, pytest) are excluded, as are zombies (they hold nothing; their parent reaps
    them) and processes this user may not inspect.
    """
    needle = f"{TAG_VARIABLE}={tag}".encode()
    excluded = _self_and_ancestors()
    found: list[tuple[int, str]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in excluded:
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                environ = fh.read().split(b"\0")
            if needle not in environ or _is_zombie(pid):
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # exited meanwhile, or not ours to read
        found.append((pid, cmdline))
    return sorted(found)


def kill_leftovers(leftovers: Sequence[tuple[int, str]], wait: float = 5.0) -> list[int]:
    """SIGKILL each leftover and its process group (unless that group is ours).

    Waits up to ``wait`` seconds for them to go and returns the pids still running.
    """
    own_groups = {os.getpgid(pid) for pid in _self_and_ancestors() if _exists(pid)}
    for pid, _ in leftovers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            pgid = os.getpgid(pid)
            # Never our own group: that would kill the shell or CI job running this.
            if pgid not in own_groups:
                os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait
    while (left := [pid for pid, _ in leftovers if not _is_zombie(pid)]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.01)
    return left


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python tests/leftovers.py",
        description=f"List processes left behind by the test run tagged ${TAG_VARIABLE}.",
    )
    parser.add_argument("--fail", action="store_true", help="exit 1 if any were found")
    parser.add_argument("--kill", action="store_true", help="SIGKILL them and their groups")
    args = parser.parse_args(argv)

    tag = os.environ.get(TAG_VARIABLE)
    if not tag:
        print(f"{TAG_VARIABLE} is not set: no test run to check for leftover processes.")
        return 0
    leftovers = find_leftovers(tag)
    if not leftovers:
        print(f"no leftover processes for {TAG_VARIABLE}={tag}")
        return 0
    print(f"{len(leftovers)} leftover process(es) for {TAG_VARIABLE}={tag}:")
    for pid, cmdline in leftovers:
        print(f"  {pid}  {_one_line(cmdline)}")
    if args.kill:
        survivors = kill_leftovers(leftovers)
        print("killed them (SIGKILL, with their process groups)")
        if survivors:
            print(f"still running after SIGKILL: {survivors}")
    return 1 if args.fail else 0


def _one_line(cmdline: str, limit: int = 200) -> str:
    flat = " ".join(cmdline.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _self_and_ancestors() -> set[int]:
    pids: set[int] = set()
    pid = os.getpid()
    while pid > 0 and pid not in pids:
        pids.add(pid)
        pid = _ppid(pid)
    return pids


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3 on of ``/proc/<pid>/stat`` (state, ppid, ...), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # comm (field 2) may hold ")"


def _ppid(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields is not None else 0


def _is_zombie(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is None or fields[0] in ("Z", "X")


def _exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


if __name__ == "__main__":
    sys.exit(main())
