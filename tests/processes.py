"""Processes in tests: which of a service's are file actors, how much memory one holds, and
running a command so that nothing it starts outlives the test.

A test that means "no file actor was started" or "the refused actors retired" counts
:func:`file_processes`, never the size of the system's process group: besides the actors, the
group holds the zygote, the child it keeps forked ahead for the next file, and, while it forks
that child, a short-lived first child, so the group's size changes whenever a file actor
starts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path

from sessionlane.actors import procfs
from sessionlane.actors._shell import TITLE_PREFIX
from sessionlane.system.runtime.launch import TcpSystem

__all__ = ["RssPeak", "file_processes", "is_file_process", "rss_kb", "run_in_session"]

# A file actor's process as thespian titles it when it starts it (setproctitle installed),
# then as the actor titles itself once it knows its path.
_FILE_TITLES = ("SessionFile ActorAddr", TITLE_PREFIX + "file ")


def file_processes(system: TcpSystem) -> list[int]:
    """The system's live processes that are a file's actor (titled ``sessionlane: file PATH``,
    or still thespian's ``SessionFile ActorAddr-...`` before it has its path). Not the zygote,
    the child it parks ahead or the short-lived child it forks that one through."""
    return [p for p in system.members() if is_file_process(p)]


def is_file_process(pid: int) -> bool:
    """Whether ``pid`` is a file's actor (see :func:`file_processes`)."""
    return procfs.command_line(pid).startswith(_FILE_TITLES)


def rss_kb(pid: int) -> int:
    """``pid``'s resident set size now, in KiB (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class RssPeak:
    """The highest RSS of ``pid`` while a ``with`` block runs, sampled every 10 ms by a thread:
    ``before`` (KiB, at entry) and ``peak`` (KiB, at least ``before``)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = self.peak = rss_kb(pid)
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, rss_kb(self.pid))
            self._done.wait(0.01)

    def __enter__(self) -> RssPeak:
        self._sampler.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._sampler.join(5)


def run_in_session(
    args: list[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    merge_stderr: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` in a session of its own, stdin empty, with ``env`` as its environment
    (default: this process's), and return what it printed (with ``merge_stderr``, its stderr
    in its stdout). Its process group is killed once it has exited, and when it outlives
    ``timeout`` seconds: then ``subprocess.TimeoutExpired`` is raised with what it printed as
    ``output``."""
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=None if env is None else dict(env),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as late:
        _kill_group(proc)
        out, err = proc.communicate(timeout=10)
        raise subprocess.TimeoutExpired(args, timeout, out, err) from late
    finally:
        _kill_group(proc)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
