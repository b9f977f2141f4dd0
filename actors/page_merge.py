"""Let the kernel merge a file process's pages with the identical pages of the others (KSM).

Every SessionFile is forked from the zygote's frozen heap (``sessionlane.system.runtime.zygote``)
and still ends up with about 7 MB of private memory: CPython 3.11 writes every object a file's
code reads (its reference count, the adaptive counters of its code), so a lease cycle copies
some 4 MB of inherited pages, most of which hold, once the cycle is over, exactly what they
held before (``docs/cost-model.md``, "What is left"). Those copies are alike from one file's
process to the next. Linux's samepage merging (KSM) scans the memory of the processes that
opted in and maps pages with the same bytes to one shared, write-protected page; a page mapped
by several processes is no process's private memory.

``memory_merge = true`` has each SessionFile opt in as it starts (``PR_SET_MEMORY_MERGE``, which
covers what it maps later too). It needs Linux 6.4 or newer and the kernel's merging thread
running (``/sys/kernel/mm/ksm/run`` = 1, which only root can set; the service never changes it).
What it costs (measured in ``docs/memory-merge.md``): the merging thread's CPU, scanning; a
merged page written again is copied back on that write (a fault of about a microsecond), so a
file that just ran a cycle holds a few MB again until the next scan; and merging is a timing
side channel: a process of another user that also opts in can tell, by timing its own writes,
whether a page with contents it guessed exists in a merged process. Off by default.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

__all__ = ["KSM_RUN", "opt_in", "opt_in_supported", "unavailable"]

_PR_SET_MEMORY_MERGE = 67
_PR_GET_MEMORY_MERGE = 68
KSM_RUN = Path("/sys/kernel/mm/ksm/run")
"""The kernel's switch for its merging thread: 1 runs it, 0 stops it, 2 unmerges everything."""


def _prctl(option: int, value: int = 0) -> int:
    """``prctl(option, value)``; ``OSError`` if the kernel refuses it."""
    libc = ctypes.CDLL(None, use_errno=True)
    result = int(libc.prctl(option, value, 0, 0, 0))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def opt_in() -> str | None:
    """Mark this process's memory, and what it maps later, as the kernel's to merge. ``None``
    once done, else why it could not be (the process runs on unmerged, as without it)."""
    try:
        _prctl(_PR_SET_MEMORY_MERGE, 1)
    except OSError as exc:
        return f"prctl(PR_SET_MEMORY_MERGE) failed: {exc.strerror} (it needs Linux 6.4 or newer)"
    return None


def opt_in_supported() -> str | None:
    """Why this kernel cannot merge a process's pages on its asking, or ``None`` if it can
    (asked without opting this process in)."""
    try:
        _prctl(_PR_GET_MEMORY_MERGE)
    except OSError as exc:
        return f"this kernel cannot merge a process's pages ({exc.strerror}; Linux 6.4 or newer)"
    return None


def unavailable(run_file: Path = KSM_RUN) -> str | None:
    """Why ``memory_merge`` would merge nothing on this machine, or ``None`` if it can.

    Asked once as a service starts with ``memory_merge`` set (a warning names the reason);
    asks the kernel without opting this process in.
    """
    if (why := opt_in_supported()) is not None:
        return why
    try:
        running = run_file.read_text().strip()
    except OSError:
        return f"this kernel has no samepage merging ({run_file} is missing)"
    if running != "1":
        return (
            f"the kernel's merging thread is not running ({run_file} is {running}): as root,"
            f" `echo 1 > {run_file}`"
        )
    return None
