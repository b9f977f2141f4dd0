"""Give thespian's TCP transport a ``poll`` selector instead of a fresh ``epoll`` per pass.

thespian 4.0.1's ``TCPTransport._runWithExpiry`` builds a new ``selectors.DefaultSelector()``
on every pass of its loop (its own comment: "creates selector on each loop, perhaps this could
be optimized"), registers every socket and watched fd in it, selects once and closes it. On
Linux that is ``epoll``: one ``epoll_create``, one ``epoll_ctl`` per fd, one ``epoll_wait``
and one ``close`` per pass, which for a gateway watching its clients and channels is a few
dozen syscalls per message. ``PollSelector`` registers in a dict and selects with one
``poll`` call, so a pass costs one syscall whatever the number of fds (and ``poll`` has no
1,024-fd limit, unlike ``select``).

:func:`install` swaps the selector class the transport module sees; like
``sessionlane.system.runtime.loopback`` it must run before the actor system forks, is idempotent,
and applies to thespian 4.0.1 only (it checks the transport still builds its selector the way
described).
"""

from __future__ import annotations

import inspect
import selectors
import types

from sessionlane.system.runtime.loopback import SUPPORTED_THESPIAN

__all__ = ["install", "installed"]

_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    from importlib import metadata

    from thespian.system.transport import TCPTransport as module

    version = metadata.version("thespian")
    if version != SUPPORTED_THESPIAN:
        return  # the optimisation is for the pinned version; anything else runs unpatched
    source = inspect.getsource(module.TCPTransport._runWithExpiry)
    if "selectors.DefaultSelector()" not in source:
        return
    shim = types.ModuleType("selectors")
    shim.__dict__.update(vars(selectors))
    shim.DefaultSelector = selectors.PollSelector  # type: ignore[attr-defined]
    module.selectors = shim
    _installed = True


def installed() -> bool:
    return _installed
