"""The lifeline watchdog process (``sessionlane.system.runtime.lifeline``): kill an actor system
when its starter dies.

Run as ``python -I -S _watchdog.py FD LOG_FILE STARTER_PID``; standard library only, so it
starts in milliseconds and inherits nothing of the starter but the pipe's read end ``FD``.
That is why ``_members`` reads ``/proc`` itself instead of using ``sessionlane.actors.procfs``.

Protocol on the pipe, one ASCII line each: ``arm PGID`` (the actor system's process group,
once it is known) and ``disarm`` (the starter stopped the system itself). At end of file (the
starter closed the pipe, or died: the kernel closes it either way) an armed watchdog SIGKILLs
the group, waits (bounded) until no member is left, logs one line and exits; a disarmed or
never-armed one just exits. It is in neither the starter's terminal signals (SIGINT and SIGHUP
are ignored) nor the group it kills, and its stdio is ``/dev/null``: it holds no output pipe.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

_KILL_WAIT_S = 5.0


def _members(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(int(entry))
    return found


def _log(path: str, line: str) -> None:
    """Append ``line`` to the service's log file, or to stderr when ``path`` is ``-``."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    text = f"{stamp} p{os.getpid()} WARNING system.runtime.lifeline: {line}\n"
    if path == "-":
        with contextlib.suppress(OSError):
            sys.stderr.write(text)
            sys.stderr.flush()
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as fh:  # the log's mode: owner only
            fh.write(text)


def main(argv: list[str]) -> int:
    fd, log_path, starter = int(argv[1]), argv[2], int(argv[3])
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    pgid: int | None = None
    buffer = b""
    while True:
        try:
            data = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not data:
            break
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            word, _, value = line.decode("ascii", "replace").partition(" ")
            if word == "arm":
                pgid = int(value)
            elif word == "disarm":
                pgid = None
    if pgid is None:
        return 0
    started = time.monotonic()
    left = _members(pgid)
    count = len(left)
    while left and time.monotonic() - started < _KILL_WAIT_S:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        time.sleep(0.01)
        left = _members(pgid)
    elapsed_ms = (time.monotonic() - started) * 1000
    outcome = f"{len(left)} survived SIGKILL: {left}" if left else "all gone"
    _log(
        log_path,
        f"the process that started this actor system (pid {starter}) is gone: killed its "
        f"process group {pgid} ({count} processes, {outcome}) in {elapsed_ms:.0f} ms",
    )
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
