"""The open-file limit: raised at start, and ``max_files`` sized to fit in it.

Every actor is a process forked from the one that starts the actor system, so the soft
``RLIMIT_NOFILE`` of that process is every actor's. Distributions default it to 1,024 while
the hard limit is usually far higher; an unprivileged process may raise its soft limit up to
the hard one, so ``raise_open_file_limit`` does that before the system forks.

What a live SessionFile costs, measured on ``multiprocTCPBase`` (thespian 4.0.1) with
``tests/test_capacity.py``'s ``test_descriptors_per_live_file_match_what_the_cap_assumes``:

* the Registry, its parent: 3 descriptors per file (thespian's sockets to the child and the
  child's sentinel pipe), on a base of about 20;
* the gateway: 2 per file (the file's channel and thespian's socket), plus one per client
  connection;
* the admin: nothing per file (files are the Registry's children, not the admin's);
* each SessionFile inherits the Registry's descriptors at fork, so it never has more than
  the Registry had, plus its own dozen.

``fit_max_files`` takes the smallest of what fits in the Registry and in the gateway, keeping
a margin for each process's own base and the Registry's ``FD_RESERVE``.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
from dataclasses import dataclass

from sessionlane.actors.capacity import FD_RESERVE

__all__ = [
    "BASE_FDS",
    "GATEWAY_FDS_PER_FILE",
    "REGISTRY_FDS_PER_FILE",
    "FileCap",
    "explain_create_failure",
    "fit_max_files",
    "raise_open_file_limit",
]

log = logging.getLogger(__name__)

REGISTRY_FDS_PER_FILE = 3
GATEWAY_FDS_PER_FILE = 2
BASE_FDS = 64
"""Descriptors a process of the system needs besides its files and connections (measured
about 20; the rest is margin for logging, thespian's connections and the admin)."""


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit; return (old, new).

    Call before the actor system forks: every actor inherits the limit. Never lowers it; a
    refusal by the kernel leaves it as it was (and is logged).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
        return soft, soft
    log.info("raised the open-file limit from %d to %d", soft, hard)
    return soft, hard


@dataclass(frozen=True, slots=True)
class FileCap:
    """``max_files`` as configured and as it fits in the open-file limit."""

    configured: int
    effective: int
    """What the Registry enforces: ``configured`` or, when that does not fit, ``fits``."""
    fits: int
    """Most live files the descriptor limit allows (see the module comment)."""
    limit: int
    """The soft open-file limit the numbers are for."""

    @property
    def lowered(self) -> bool:
        return self.effective < self.configured

    def warning(self) -> str:
        return (
            f"max_files {self.configured} does not fit in the open-file limit {self.limit} "
            f"(the registry needs {REGISTRY_FDS_PER_FILE} descriptors per live file, the gateway "
            f"{GATEWAY_FDS_PER_FILE} per file plus one per connection): serving at most "
            f"{self.effective} files; raise the hard limit (ulimit -Hn, LimitNOFILE=) to "
            "serve more"
        )


def fit_max_files(max_files: int, max_connections: int, limit: int | None = None) -> FileCap:
    """Size ``max_files`` to the open-file ``limit`` (default: this process's soft limit)."""
    if limit is None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit == resource.RLIM_INFINITY:
        return FileCap(max_files, max_files, max_files, limit)
    registry = (limit - BASE_FDS - FD_RESERVE) // REGISTRY_FDS_PER_FILE
    gateway = (limit - BASE_FDS - max_connections) // GATEWAY_FDS_PER_FILE
    fits = max(1, min(registry, gateway))
    return FileCap(max_files, min(max_files, fits), fits, limit)


_EXHAUSTED = (os.strerror(errno.EMFILE), os.strerror(errno.ENFILE))


def explain_create_failure(exc: BaseException) -> str:
    """What a failed ``createActor`` means; fd exhaustion said plainly, with the limit."""
    text = str(exc)
    if any(reason in text for reason in _EXHAUSTED):
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return (
            f"out of file descriptors (open-file limit {soft}; thespian reported "
            f"{type(exc).__name__}: {text})"
        )
    return f"{type(exc).__name__}: {text}"
