"""The lifeline: a thespian actor system dies with the process that started it.

thespian's admin ``setsid()``s and double-forks (``thespian/system/multiprocCommon.py``),
so neither the starter's death nor ``PR_SET_PDEATHSIG`` reaches it, and a ``kill -9`` of
``sessionlane serve`` used to leave the admin, Registry, gateway and every SessionFile running,
granting leases nobody supervised and holding the ports.

So every started system gets a small watchdog process (``system/runtime/_watchdog.py``, exec'd: it
inherits no threads, locks or descriptors but one) that holds the read end of a pipe whose only
write end stays in the starter. When the starter dies, however it dies, the kernel closes that
write end, the watchdog reads end of file and SIGKILLs the system's process group; the gateway's
sockets close with it, so clients see their connections (and leases) lost at once, and the
kernel releases every file ownership lock (``sessionlane.actors.ownership``). A starter that stops
the system itself disarms the watchdog first.

The write end must stay in the starter alone: the admin is forked from the starter and would
otherwise inherit it (thespian closes no inherited descriptors), keeping the pipe open forever.
A fork handler closes every lifeline write end in any child forked from the starter (the
descriptors are also close-on-exec). The watchdog is not in the group it kills, ignores the
terminal's SIGINT/SIGHUP, and writes nothing to the starter's stdout/stderr (its one log line
goes to the service's log file), so it never holds a CI output pipe open.

The remaining window: the group is armed right after thespian's ``ActorSystem()`` returns; a
starter killed during those ~50 ms leaves the system to ``sessionlane stop``/``doctor``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["Lifeline"]

log = logging.getLogger(__name__)

_WATCHDOG = Path(__file__).with_name("_watchdog.py")
_EXIT_WAIT_S = 5.0

_write_ends: set[int] = set()
"""Every lifeline write end open in this process (closed in each forked child)."""


def _close_in_child() -> None:
    for fd in _write_ends:
        with contextlib.suppress(OSError):
            os.close(fd)
    _write_ends.clear()


os.register_at_fork(after_in_child=_close_in_child)


class Lifeline:
    """One watchdog guarding one actor system. Not thread-safe: drive it from one thread."""

    def __init__(self, proc: subprocess.Popen[bytes], write_end: int):
        self.proc = proc
        self._fd: int | None = write_end

    @classmethod
    def spawn(cls, log_file: str | Path | None) -> Lifeline:
        """Start a watchdog (disarmed). Call before the actor system is forked.

        ``log_file`` ``None``: the service logs to stderr, and so does the watchdog's one line
        (it then shares the starter's stderr until it exits: disarmed at a clean stop, or
        within a few seconds of killing the group).
        """
        read_end, write_end = os.pipe()  # both close-on-exec; the watchdog gets read_end
        _write_ends.add(write_end)
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    str(_WATCHDOG),
                    str(read_end),
                    "-" if log_file is None else str(log_file),
                    str(os.getpid()),
                ],
                pass_fds=(read_end,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=None if log_file is None else subprocess.DEVNULL,
                process_group=0,  # a killpg of the starter's group must not take it first
            )
        except BaseException:
            _write_ends.discard(write_end)
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        return cls(proc, write_end)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def arm(self, pgid: int) -> None:
        """From now on, the starter's death kills process group ``pgid``."""
        self._say(f"arm {pgid}\n")

    def close(self, *, disarm: bool = True) -> None:
        """Let the watchdog go (disarmed first, unless the group must still be killed)."""
        if self._fd is None:
            return
        if disarm:
            self._say("disarm\n")
        fd, self._fd = self._fd, None
        _write_ends.discard(fd)
        os.close(fd)
        try:
            self.proc.wait(_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            log.warning("lifeline watchdog %d did not exit: killing it", self.proc.pid)
            self.proc.kill()
            self.proc.wait(_EXIT_WAIT_S)

    def _say(self, line: str) -> None:
        if self._fd is None:
            raise RuntimeError("the lifeline is closed")
        try:
            os.write(self._fd, line.encode("ascii"))
        except BrokenPipeError:
            # Someone killed the watchdog: the system now has no lifeline. Say so; stopping
            # it still works, only a kill -9 of this process would leave it behind.
            log.error("lifeline watchdog %d is gone: this actor system has no lifeline", self.pid)
