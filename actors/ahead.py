"""What a file's actor is given ahead of thespian: its channel listener and its ``FileInit``.

Activation used to wait for every hop in turn: the Registry's ``createActor``, thespian
starting the child's actor and telling the Registry its address, the Registry's ``FileInit``
then sent to it, the file's offer of a listener sent to the gateway, the gateway's hello. Two
things are now handed to the child before it is an actor, through the zygote
(``sessionlane.system.runtime.zygote``), which parks every child ahead:

* **its listener**: the zygote binds a fresh abstract Unix socket and its token for every
  child it parks. When the Registry creates the actor, the zygote answers with the child's
  pid, the listener's name and its token (``spawned`` here, in the Registry's process), and
  the Registry answers the ``OpenChannel`` that activated the file with an offer of that
  listener at once (and does not forward it). The gateway connects and says hello; its
  connection waits in the listener's backlog while the child starts. The child
  (``inherited`` here, in its process) serves the listener once ``FileInit`` has opened the
  file and taken its ownership lock, and only then accepts: nothing is served before the lock,
  as before.
* **its ``FileInit``**: the Registry hands it to the zygote with the request (``first`` here),
  and the child delivers it to its actor as its first message, from the Registry's address,
  before thespian has told the Registry where the child is. The Registry sends it by thespian
  only to a child that was not parked (``spawned`` said no listener); the file ignores a
  ``FileInit`` of the incarnation it already has.

A child that cannot serve the listener (its activation failed, or it offers no sockets) closes
it: the connection waiting in it is refused before its welcome, and the gateway asks the
Registry again, saying so (``OpenChannel.ahead`` false): that ask goes to the file as any later
contact does, and its refusal (or a carried channel) answers it.

The listener is guarded like any other (``sessionlane.actors.file_channels``): its token
travels only in the zygote's pipes and in the Registry's offer to the asker, as a file's own
offer does; a hello without it is refused.

Not thread-safe: each process hands over at most one of each at a time, from one thread.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BACKLOG",
    "BOUND_NAME_BYTES",
    "BOUND_TOKEN_BYTES",
    "NAME_PREFIX",
    "BoundAhead",
    "bind",
    "close_inherited",
    "defer",
    "first",
    "inherit",
    "run_deferred",
    "spawned",
    "take_first",
    "take_inherited",
    "take_spawned",
]

NAME_PREFIX = "sessionlane-"
"""Every channel listener's abstract name starts with this (then 16 random hex digits)."""
BOUND_NAME_BYTES = 8
"""Random bytes in a listener's name (written as hex after ``NAME_PREFIX``)."""
BOUND_TOKEN_BYTES = 24
"""Random bytes in a listener's token (written as URL-safe base64, as ``token_urlsafe``)."""
BACKLOG = 64
"""Connections a listener holds before its actor accepts them."""


@dataclass(frozen=True, slots=True)
class BoundAhead:
    """A listener bound ahead: its abstract name (without the leading NUL) and its token."""

    name: str
    token: str

    @classmethod
    def from_bytes(cls, name: bytes, token: bytes) -> BoundAhead:
        """The listener named by the random bytes ``name`` and ``token`` (see ``to_bytes``)."""
        text = base64.urlsafe_b64encode(token).rstrip(b"=").decode("ascii")
        return cls(NAME_PREFIX + name.hex(), text)

    @classmethod
    def fresh(cls) -> tuple[BoundAhead, bytes, bytes]:
        """A new random name and token, with the bytes they are written from."""
        name, token = os.urandom(BOUND_NAME_BYTES), os.urandom(BOUND_TOKEN_BYTES)
        return cls.from_bytes(name, token), name, token


def bind(bound: BoundAhead) -> socket.socket:
    """Listen on ``bound``'s name (non-blocking); ``OSError`` if it cannot be bound."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind("\0" + bound.name)
        listener.listen(BACKLOG)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


_inherited: tuple[socket.socket, BoundAhead] | None = None
_spawned: BoundAhead | None = None


def inherit(listener: socket.socket, bound: BoundAhead) -> None:
    """In a parked child about to become a file's actor: the listener it is to serve."""
    global _inherited
    _inherited = (listener, bound)


def take_inherited() -> tuple[socket.socket, BoundAhead] | None:
    """The listener this process was given (once; None if it was given none)."""
    global _inherited
    found, _inherited = _inherited, None
    return found


def close_inherited() -> None:
    """This process will serve no listener bound ahead: close it (its waiting connections are
    refused, and their gateways ask the Registry again)."""
    found = take_inherited()
    if found is not None:
        with contextlib.suppress(OSError):
            found[0].close()


def spawned(bound: BoundAhead | None) -> None:
    """In the Registry's process: the listener of the child the zygote just started (None:
    the child was forked without one)."""
    global _spawned
    _spawned = bound


def take_spawned() -> BoundAhead | None:
    """The listener of the child just started, if it has one (once)."""
    global _spawned
    found, _spawned = _spawned, None
    return found


_first: Any = None


def first(message: Any) -> None:
    """In the Registry's process: the first message of the actor about to be created (its
    ``FileInit``), for the zygote to hand its child with the request (None: nothing)."""
    global _first
    _first = message


def take_first() -> Any:
    """The first message set for the actor about to be created (once; None if none)."""
    global _first
    found, _first = _first, None
    return found


_deferred: list[Callable[[], None]] = []


def defer(action: Callable[[], None]) -> None:
    """In the Registry's process: run ``action`` once the Registry has sent what the new
    file's first contact waits for (``run_deferred``): the zygote's next fork, which would
    otherwise take a core from it on a busy machine."""
    _deferred.append(action)


def run_deferred() -> None:
    """Run what was deferred (the Registry calls this once it has answered a first contact)."""
    actions = list(_deferred)
    _deferred.clear()
    for action in actions:
        action()
