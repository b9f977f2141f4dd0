"""What every sessionlane actor shares: explicit dispatch and a handler guard.

A handler that raises is re-delivered by thespian and then bounced as ``PoisonMessage``, which
would run a half-applied transition twice. So the guard catches, logs and answers instead:
handlers never raise out of ``receiveMessage``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from thespian.actors import Actor

__all__ = ["Handler", "ShellActor", "addr_key", "monotonic_ms"]

Handler = Callable[[Any, Any], None]


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
        self._table: dict[type, Handler] = self.handlers()

    def handlers(self) -> dict[type, Handler]:
        raise NotImplementedError

    def receiveMessage(self, msg: Any, sender: Any) -> None:
        handler = self._table.get(type(msg))
        if handler is None:
            self.log.debug("%s dropped unexpected %s", type(self).__name__, type(msg).__name__)
            return
        try:
            handler(msg, sender)
        except Exception as exc:
            self.log.exception("%s failed on %s", type(self).__name__, type(msg).__name__)
            try:
                self.on_handler_error(msg, sender, exc)
            except Exception:
                self.log.exception("%s error handler failed", type(self).__name__)

    def on_handler_error(self, msg: Any, sender: Any, exc: Exception) -> None:
        """Answer the request that failed, if there is one to answer; default: nothing."""
