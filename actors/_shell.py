"""What every sessionlane actor shares: explicit dispatch and a handler guard.

A handler that raises is re-delivered by thespian and then bounced as ``PoisonMessage``, which
would run a half-applied transition twice. So the guard catches, logs and answers instead:
handlers never raise out of ``receiveMessage``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import setproctitle
from thespian.actors import Actor, ActorExitRequest

__all__ = [
    "TITLE_PREFIX",
    "Handler",
    "ShellActor",
    "addr_key",
    "monotonic_ms",
    "retitle",
    "set_title",
]

TITLE_PREFIX = "sessionlane: "
"""How every sessionlane process is titled in ``ps`` (``sessionlane: file /a.jsonl``)."""


def protect_environ() -> None:
    """Keep setproctitle off the environment block of this process and its future children
    (``SPT_NOENV``): thespian titles every actor process it forks, and ``/proc/PID/environ``
    must still show that process's environment (see ``set_title``). Called before any title
    is set: at this module's import and by ``start_tcp_system`` before it forks."""
    os.environ.setdefault("SPT_NOENV", "1")


protect_environ()

Handler = Callable[[Any, Any], None]

_OUR_PACKAGES = ("sessionlane",)
_AT_IMPORT = logging.getLogger(__name__)  # created before any fork: holds the original manager
_rehomed_root: object = None


def _rehome_loggers() -> None:
    """Point our module loggers at the log forwarder of this actor process.

    In a multiproc actor process thespian replaces ``logging.root`` (with a forwarder to its
    logger process) and ``Logger.manager``, but the loggers our modules created at import,
    before the fork, still hang off the old root: their records would never reach the log
    file (they went to whatever handler the starting process had). Done once per process; a
    no-op where the root was not replaced (simpleSystemBase).
    """
    global _rehomed_root
    root = logging.root
    manager = logging.Logger.manager
    if _rehomed_root is _EVERY_ROOT:
        # Forked after ``follow_every_root``: our loggers reach this root already, and their
        # cached levels were empty at the fork. Rewriting each one would copy its pages.
        _rehomed_root = root
        return
    if _rehomed_root is root or _AT_IMPORT.manager is manager:
        _rehomed_root = root
        return
    _rehomed_root = root
    for logger in list(_AT_IMPORT.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger):
            continue
        if logger.name.split(".")[0] not in _OUR_PACKAGES:
            continue
        logger.parent = root
        logger.manager = manager
        manager.loggerDict[logger.name] = logger
        logger._cache.clear()  # type: ignore[attr-defined]  # levels cached for the old root


class _CurrentRoot(logging.Logger):
    """The parent of our modules' loggers after ``follow_every_root``: whatever
    ``logging.root`` is in this process when a record is logged (its level and handlers)."""

    def __init__(self) -> None:
        super().__init__("sessionlane: the current root")

    @property
    def parent(self) -> logging.Logger:
        return logging.root

    @parent.setter
    def parent(self, value: Any) -> None:
        pass  # Logger.__init__ sets it

    @property
    def level(self) -> int:
        return logging.root.level

    @level.setter
    def level(self, value: int) -> None:
        pass


_EVERY_ROOT = _CurrentRoot()


def follow_every_root() -> None:
    """Hang our modules' loggers off whatever ``logging.root`` will be, and forget the levels
    they cached; for a process that forks actors and logs nothing itself (the zygote, before it
    freezes): a process forked after this need not rehome them (``_rehome_loggers``)."""
    global _rehomed_root
    for logger in list(_AT_IMPORT.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger) and logger.name.split(".")[0] in _OUR_PACKAGES:
            logger.parent = _EVERY_ROOT
            logger._cache.clear()  # type: ignore[attr-defined]  # levels of the root until now
    _rehomed_root = _EVERY_ROOT


def retitle(actor: Any, role: str) -> bool:
    """Title ``actor``'s process ``sessionlane: <role>`` (what ``ps``, ``top`` and ``doctor``
    show), if the actor has a process of its own; whether it did.

    thespian's multiproc bases title an actor's process with its class name and address when
    it starts (``SessionFile ActorAddr-(T|:port)``, with setproctitle installed): that title is
    the sign. An actor in its host's process (``simpleSystemBase``, in tests) leaves the
    host's title alone.
    """
    current = setproctitle.getproctitle()
    if not current.startswith((f"{type(actor).__name__} ActorAddr", TITLE_PREFIX)):
        return False
    set_title(role)
    return True


def set_title(role: str) -> str:
    """Title this process ``sessionlane: <role>``; the title set.

    ``SPT_NOENV`` (set for this process and its children when this module is imported) keeps
    setproctitle from writing over the environment block, which ``/proc/PID/environ`` shows
    (``tests/leftovers.py`` finds a test's processes there): a title then fits in the space
    of the original command line. A longer one keeps its start and its end (a file's name).
    """
    title = TITLE_PREFIX + role
    room = _title_room()
    if room is not None and len(title) > room:
        head = TITLE_PREFIX + role.split(" ", 1)[0] + " ..."
        title = (
            head + title[len(title) - max(0, room - len(head)) :]
            if room > len(head)
            else title[:room]
        )
    setproctitle.setproctitle(title)
    return title


def _title_room() -> int | None:
    """How long a title may be: the original command line's space (``None``: unknown)."""
    try:
        with open(f"/proc/{os.getpid()}/cmdline", "rb") as fh:
            # The space ends with two NULs that setproctitle keeps: the title's and argv's.
            return max(0, len(fh.read()) - 2)
    except OSError:
        return None


def monotonic_ms() -> float:
    """The actors' clock: milliseconds on the monotonic clock (never inside a state machine)."""
    return time.monotonic() * 1000.0


def addr_key(address: Any) -> str:
    """A hashable key for a thespian address (``ActorAddress`` defines ``__hash__ = None``)."""
    return str(address)


class ShellActor(Actor):  # type: ignore[misc]
    """An actor that dispatches on message type through ``handlers()``.

    Unknown messages are logged and dropped (thespian system messages included, unless a
    subclass lists them). A handler exception is logged and passed to ``on_handler_error``.
    """

    log: logging.Logger = logging.getLogger(__name__)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _rehome_loggers()
        self._table: dict[type, Handler] = self.handlers()

    def handlers(self) -> dict[type, Handler]:
        raise NotImplementedError

    def receiveMessage(self, msg: Any, sender: Any) -> None:
        handler = self._table.get(type(msg))
        if handler is None:
            self.log.debug("%s dropped unexpected %s", type(self).__name__, type(msg).__name__)
            if isinstance(msg, ActorExitRequest):
                self._forget_watches()
            return
        try:
            handler(msg, sender)
        except Exception as exc:
            self.log.exception("%s failed on %s", type(self).__name__, type(msg).__name__)
            try:
                self.on_handler_error(msg, sender, exc)
            except Exception:
                self.log.exception("%s error handler failed", type(self).__name__)
        finally:
            if isinstance(msg, ActorExitRequest):
                self._forget_watches()

    def _forget_watches(self) -> None:
        """Drop thespian's watch list before the exit drain.

        thespian applies a handler's ``ThespianWatch`` for every message but
        ``ActorExitRequest``, so the list of the message before stays in force while the actor
        drains its last sends. An exit handler that closed those fds frees their numbers, the
        transport's next socket takes one, and the drain registers it twice (``KeyError: 'N
        (FD N) is already registered'``): a traceback, and the messages sent on the way out
        are lost. Nothing of ours is watched after exit.
        """
        transport = getattr(getattr(self, "_myRef", None), "transport", None)
        set_watch = getattr(transport, "set_watch", None)
        if set_watch is not None:
            set_watch([])

    def on_handler_error(self, msg: Any, sender: Any, exc: Exception) -> None:
        """Answer the request that failed, if there is one to answer; default: nothing."""
