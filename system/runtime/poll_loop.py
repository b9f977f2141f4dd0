"""Give thespian's TCP transport a ``poll`` selector instead of a fresh ``epoll`` per pass.

thespian 4.0.1's ``TCPTransport._runWithExpiry`` builds a new ``selectors.DefaultSelector()``
on every pass of its loop (its own comment: "creates selector on each loop, perhaps this could
be optimized"), registers every socket and watched fd in it, selects once and closes it. On
Linux that is ``epoll``: one ``epoll_create``, one ``epoll_ctl`` per fd, one ``epoll_wait``
and one ``close`` per pass, which for a gateway watching its clients and channels is a few
dozen syscalls per message. ``PollSelector`` registers in a dict and selects with one
``poll`` call, so a pass costs one syscall whatever the number of fds (and ``poll`` has no
1,024-fd limit, unlike ``select``).

The selector it installs is not the standard library's ``selectors.PollSelector`` but
:class:`PollSelector` below, the few lines of it the loop uses: ``register``, ``select``,
``close``. The standard one builds a ``SelectorKey`` per registration and keeps two maps in
step, which for a gateway that re-registers ten descriptors on every pass was about a tenth of
its CPU under load (``docs/hot-path.md``); this one keeps one dict and builds a key only for a
descriptor that is ready. What ``select`` returns and raises is the standard one's.

:func:`install` swaps the selector class the transport module sees; like
``sessionlane.system.runtime.loopback`` it must run before the actor system forks, is idempotent,
and applies to thespian 4.0.1 only (it checks the transport still builds its selector the way
described).
"""

from __future__ import annotations

import inspect
import math
import select
import selectors
import types
from typing import Any

from sessionlane.system.runtime.loopback import SUPPORTED_THESPIAN

__all__ = ["PollSelector", "install", "installed"]

_installed = False

_POLL_READ = select.POLLIN
_POLL_WRITE = select.POLLOUT


class PollSelector:
    """A ``poll`` selector for a loop that fills a fresh one, selects once and closes it.

    Same contract as ``selectors.PollSelector`` for ``register``, ``select``, ``close`` and
    ``get_map``: a file object or a descriptor, ``ValueError`` for a bad one or bad events,
    ``KeyError`` for one registered twice, ``(SelectorKey, events)`` pairs from ``select``,
    where a descriptor ``poll`` reports in error or hung up is ready for what it was
    registered for.
    """

    __slots__ = ("_data", "_events", "_objects")

    def __init__(self) -> None:
        self._events: dict[int, int] = {}
        self._objects: dict[int, Any] = {}
        self._data: dict[int, Any] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        if not events or events & ~(selectors.EVENT_READ | selectors.EVENT_WRITE):
            raise ValueError(f"Invalid events: {events!r}")
        fd = fileobj if type(fileobj) is int else _fileobj_to_fd(fileobj)
        if fd < 0:
            raise ValueError(f"Invalid file descriptor: {fd}")
        if fd in self._events:
            raise KeyError(f"{fileobj!r} (FD {fd}) is already registered")
        self._events[fd] = events
        if fileobj is not fd or data is not None:
            self._objects[fd] = fileobj
            self._data[fd] = data
        return selectors.SelectorKey(fileobj, fd, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        poller = select.poll()
        for fd, events in self._events.items():
            mask = 0
            if events & selectors.EVENT_READ:
                mask |= _POLL_READ
            if events & selectors.EVENT_WRITE:
                mask |= _POLL_WRITE
            poller.register(fd, mask)
        if timeout is None:
            wait = None
        elif timeout <= 0:
            wait = 0
        else:
            wait = math.ceil(timeout * 1e3)  # at least ``timeout``, as the standard one waits
        try:
            polled = poller.poll(wait)
        except InterruptedError:
            return []
        ready = []
        for fd, event in polled:
            registered = self._events.get(fd)
            if registered is None:
                continue
            events = 0
            if event & ~_POLL_READ:
                events |= selectors.EVENT_WRITE
            if event & ~_POLL_WRITE:
                events |= selectors.EVENT_READ
            key = selectors.SelectorKey(
                self._objects.get(fd, fd), fd, registered, self._data.get(fd)
            )
            ready.append((key, events & registered))
        return ready

    def get_map(self) -> dict[int, selectors.SelectorKey]:
        return {
            fd: selectors.SelectorKey(self._objects.get(fd, fd), fd, events, self._data.get(fd))
            for fd, events in self._events.items()
        }

    def close(self) -> None:
        self._events.clear()
        self._objects.clear()
        self._data.clear()

    def __enter__(self) -> PollSelector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fileobj_to_fd(fileobj: Any) -> int:
    try:
        return int(fileobj.fileno())
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"Invalid file object: {fileobj!r}") from None


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
    shim.DefaultSelector = PollSelector  # type: ignore[attr-defined]
    module.selectors = shim
    _installed = True


def installed() -> bool:
    return _installed
