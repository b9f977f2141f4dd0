"""Fork thespian's admin without the sockets of the process that starts it.

``ActorSystem("multiprocTCPBase", ...)`` first opens this process's own endpoint (a socket
listening on a port of ``bind_host``), then forks the admin, and the admin forks the logger and
every actor. thespian 4.0.1 closes nothing an admin inherits (``closeUnusedFiles`` is commented
out in ``multiprocCommon.startAdmin``), so every process of the system held a copy of that
listening socket, and of any other socket this process had open (another service's endpoint,
a client connection): a copy keeps a port bound and a peer's connection open after this
process closed its own.

:func:`install` wraps ``multiprocCommon.startAdmin`` (the function the admin's
``multiprocessing.Process`` runs, looked up when the system starts) so that, first thing in
the forked child, every inherited socket descriptor is pointed at ``/dev/null``: the kernel
drops the child's reference to the socket, and the descriptor number stays taken, so a stale
socket object the child still holds cannot close a descriptor reused for something else. The
admin needs none of them: it opens its own listener and connects back to the starter by
address. The logger, forked from the admin, is started the same way (``startupASLogger``): it
would otherwise hold the admin's listening socket and its connections, and keep the admin's
port bound after the admin died. Like ``sessionlane.system.runtime.loopback`` it runs before the
system is created, is idempotent, and fails closed on another thespian or if ``startAdmin`` or
``startupASLogger`` moved.
"""

from __future__ import annotations

import functools
import inspect
import os
import stat
import threading
from collections.abc import Collection
from typing import Any

from sessionlane.actors import procfs
from sessionlane.system.runtime.loopback import require_supported_thespian

__all__ = ["install", "installed", "release_inherited_sockets"]

_lock = threading.Lock()
_installed = False


def installed() -> bool:
    return _installed


def install() -> None:
    """Make every admin (and its logger) forked from this process drop the sockets it inherits.
    Raises ``RuntimeError`` on a thespian other than the pinned one or if what it wraps moved."""
    global _installed
    with _lock:
        if _installed:
            return
        require_supported_thespian(__name__, "admin start", "multiprocCommon.py")
        from thespian.system import multiprocCommon

        start_admin = getattr(multiprocCommon, "startAdmin", None)
        starter = getattr(getattr(multiprocCommon, "multiprocessCommon", None), "_startAdmin", None)
        if not inspect.isfunction(start_admin) or not inspect.isfunction(starter):
            raise RuntimeError("thespian's multiprocCommon.startAdmin moved: cannot patch it")
        if "target=startAdmin" not in inspect.getsource(starter):
            raise RuntimeError("thespian no longer forks its admin with target=startAdmin")

        @functools.wraps(start_admin)
        def start_admin_without_inherited_sockets(*args: Any, **kwargs: Any) -> Any:
            release_inherited_sockets()
            return start_admin(*args, **kwargs)

        start_logger = getattr(multiprocCommon, "startupASLogger", None)
        spawner = getattr(multiprocCommon, "startASLogger", None)
        if not inspect.isfunction(start_logger) or not inspect.isfunction(spawner):
            raise RuntimeError("thespian's multiprocCommon.startupASLogger moved: cannot patch it")
        if "target=startupASLogger" not in inspect.getsource(spawner):
            raise RuntimeError("thespian no longer forks its logger with target=startupASLogger")

        @functools.wraps(start_logger)
        def start_logger_without_inherited_sockets(*args: Any, **kwargs: Any) -> Any:
            release_inherited_sockets()
            return start_logger(*args, **kwargs)

        multiprocCommon.startAdmin = start_admin_without_inherited_sockets
        multiprocCommon.startupASLogger = start_logger_without_inherited_sockets
        _installed = True


def release_inherited_sockets(keep: Collection[int] = ()) -> list[int]:
    """Point every socket descriptor of this process but ``keep`` at ``/dev/null``; the
    numbers released.

    Only for a freshly forked child that must not keep its parent's sockets.
    """
    released = []
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in procfs.fd_numbers():
            try:
                is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
            except OSError:
                continue  # the directory listing's own descriptor, already closed
            if is_socket and fd != null and fd not in keep:
                os.dup2(null, fd)
                released.append(fd)
    finally:
        os.close(null)
    return released
