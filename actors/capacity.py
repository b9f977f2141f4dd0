"""Running out of descriptors is a refusal, never a crash: the Registry's side of capacity.

Each live SessionFile costs its parent (the Registry) a few descriptors: thespian's sockets to
the child and the child process's sentinel pipe. When the Registry runs out, thespian's
``createActor`` does not raise: it logs, reports the child as exited (``ChildActorExited``
with the placeholder address it returned) and drops every message sent to it. Restarting such
a child fails again at once, a loop that used to end with the whole actor system restarted.

So the Registry asks ``fd_headroom`` before it starts a file (a refusal when fewer than
``FD_RESERVE`` descriptors are left under the soft limit), and recognises a child that never
came up with ``never_started`` (it is then not restarted). The configured ``max_files`` is
the first line of defence; ``sessionlane.system.runtime.limits`` sizes it to the limit at start.
"""

from __future__ import annotations

import resource
from typing import Any

from thespian.system.addressManager import ActorLocalAddress

from sessionlane.actors import procfs
from sessionlane.actors.confined import is_fd_exhaustion

__all__ = ["FD_RESERVE", "fd_headroom", "never_started", "open_fds"]

FD_RESERVE = 32
"""Descriptors the Registry keeps free: one more child (about 3), plus room for thespian's
connections to lanes, the gateway and the admin, and for logging, which must never fail."""


def open_fds() -> int:
    """How many descriptors this process has open (Linux: entries of ``/proc/self/fd``)."""
    return len(procfs.fd_numbers()) - 1  # minus the one the listing itself opened


def fd_headroom(reserve: int = FD_RESERVE) -> str | None:
    """Why this process should not start one more child now, or None when it may.

    Costs one ``listdir`` of ``/proc/self/fd`` (about 0.1 ms per 1,000 open descriptors).
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        used = open_fds()
    except OSError as exc:
        if is_fd_exhaustion(exc):
            return f"the registry is out of file descriptors (limit {soft})"
        return None  # no /proc: only max_files applies
    if soft != resource.RLIM_INFINITY and used + reserve > soft:
        return (
            f"the registry has {used} of its {soft} file descriptors open; a new file needs "
            f"{reserve} to spare: retry once idle files are passivated, or lower max_files"
        )
    return None


def never_started(child: Any) -> bool:
    """Whether a ``ChildActorExited`` names a child whose process thespian never started.

    Such a child is still known only by the placeholder address ``createActor`` returned,
    with no real address behind it. A child that came up and died later is reported under
    its real address.
    """
    details = getattr(child, "addressDetails", None)
    if not isinstance(details, ActorLocalAddress):
        return False
    return details.addressManager.exportAddr(details) is None
