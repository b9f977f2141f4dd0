"""Keep thespian's idle connections few, so that a pass of its loop does not grow with them.

thespian 4.0.1 keeps every connection it sent or received a message on as an idle socket
(``TCPTransport._openSockets``) for 20 minutes, to send the next message without connecting
again, and every pass of its loop walks all of them in Python: the address's hash, an expiry
view, a look in the list of readable descriptors, on top of registering each in the pass's
selector. Every file's process connects to the Registry as it starts, so with many live files
the Registry paid for each of them on every pass: 8.7 ms of its CPU per new file at 400 live
files against 3 ms at 10, and a first contact's p50 15.6-27.6 ms against 12 (a probe of 200
new files, docs/activation.md, "Idle connections").

:func:`install` bounds them: once a transport holds more than ``2 * KEPT`` idle sockets, it
closes those unused for ``MIN_IDLE_S`` or more, least recently used first, until ``KEPT`` are
left. A connection in use (the gateway's to the Registry, a file's in its activation) is never
among them. thespian closes idle sockets itself (after 20 minutes, or the oldest when it runs
out of descriptors: ``close_oldest_idle_sockets``); the peer sees the connection end and
connects again for its next message. A peer that sent on the connection at the very moment it
was closed gets no acknowledgement and sends again on a new one, thespian's rule for two sides
that transmit on one idle socket at once; the wait of ``MIN_IDLE_S`` makes that moment rare.

Like ``sessionlane.system.runtime.poll_loop`` it must run before the actor system forks, is
idempotent, and applies to thespian 4.0.1 only: it checks that the two methods that return a
socket to the idle set still do so as read here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from sessionlane.system.runtime.loopback import SUPPORTED_THESPIAN

__all__ = ["KEPT", "MIN_IDLE_S", "install", "installed", "trim"]

KEPT = 32
"""Idle sockets a transport keeps at least (the most recently used)."""

MIN_IDLE_S = 1.0
"""An idle socket used less than this long ago is never closed here."""

_installed = False

_RETURNS_TO_IDLE = ("_finishIntent", "_finishIncoming")
"""The ``TCPTransport`` methods that put a socket back in ``_openSockets``."""


def trim(opened: dict[Any, Any], now: float, period_s: float, close: Callable[[Any], None]) -> int:
    """Close idle sockets of ``opened`` (``_openSockets``: each value's ``validity`` expires
    ``period_s`` after its last use, at ``validity._time_to_quit``, thespian's ``currentTime``
    clock) as :mod:`this module <sessionlane.system.runtime.idle_sockets>` says; how many."""
    if len(opened) <= 2 * KEPT:
        return 0
    unused_since = now + period_s - MIN_IDLE_S  # expiry times before this: idle long enough
    aged = sorted(
        (quit_at, n, key)
        for n, (key, idle) in enumerate(opened.items())
        if (quit_at := idle.validity._time_to_quit) is not None and quit_at <= unused_since
    )
    closed = 0
    for _, _, key in aged[: len(opened) - KEPT]:
        close(opened.pop(key))
        closed += 1
    return closed


def install() -> None:
    global _installed
    if _installed:
        return
    from importlib import metadata

    from thespian.system.timing import currentTime
    from thespian.system.transport import TCPTransport as module

    if metadata.version("thespian") != SUPPORTED_THESPIAN:
        return  # for the pinned version; anything else runs unpatched
    transport = module.TCPTransport
    for name in _RETURNS_TO_IDLE:
        if "IdleSocket(" not in inspect.getsource(getattr(transport, name)):
            return
    period_s = module.MAX_IDLE_SOCKET_PERIOD.total_seconds()
    close = module._safeSocketShutdown

    def bounded(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def returning_to_idle(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = method(self, *args, **kwargs)
            opened = getattr(self, "_openSockets", None)
            if opened is not None and len(opened) > 2 * KEPT:
                trim(opened, currentTime(), period_s, close)
            return result

        return returning_to_idle

    for name in _RETURNS_TO_IDLE:
        setattr(transport, name, bounded(getattr(transport, name)))
    _installed = True


def installed() -> bool:
    return _installed
