"""Argument checks of the client's public calls, shared by both surfaces.

A bad argument is the caller's mistake: it raises ``ValueError`` (a ``TypeError`` for a
value of the wrong type) at the call that was given it, naming the argument and what it
accepts, and nothing is sent. Without these checks it surfaced later, and elsewhere, as a
pydantic ``ValidationError`` about a wire message the caller never wrote.

The accepted values are the wire's own ``Literal`` types (``sessionlane.messages.wire``), read
here with ``typing.get_args``: one list of names, never a copy.
"""

from __future__ import annotations

import math
import os
from typing import Any, get_args

from sessionlane.messages.wire import Durability, OnContention, Priority, Purpose

__all__ = [
    "check_abandon",
    "check_acquire",
    "check_choice",
    "check_durability",
    "check_lane",
    "check_name",
    "check_options",
    "check_path",
    "check_reason",
    "check_recover",
    "check_seconds",
]

_NAME_MAX = 256
"""The wire's limit on a lane name (``sessionlane.messages.wire._NAME``)."""
_REASON_MAX = 512
_PATH_MAX = 4096


def check_choice(argument: str, value: Any, allowed: Any) -> None:
    """``value`` is one of the ``Literal`` type ``allowed``'s values."""
    choices = get_args(allowed)
    if value not in choices:
        raise ValueError(
            f"{argument}={value!r} is not one of {', '.join(repr(c) for c in choices)}"
        )


def check_seconds(
    argument: str, value: Any, *, optional: bool = False, positive: bool = False
) -> None:
    """``value`` is a finite number of seconds, >= 0 (> 0 if ``positive``; None if
    ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{argument} must be a number of seconds, not {type(value).__name__}")
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{argument}={value!r} is not a finite number of seconds")
    if value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{argument}={value!r}: a number of seconds {bound} is needed")


def check_name(argument: str, value: Any, limit: int = _NAME_MAX) -> None:
    """``value`` is a non-empty string of at most ``limit`` characters."""
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a str, not {type(value).__name__}")
    if not value or len(value) > limit:
        raise ValueError(f"{argument} must be 1 to {limit} characters (got {len(value)})")


def check_options(options: dict[str, Any]) -> None:
    """``connect`` / ``connect_async``'s keyword options."""
    for name in ("timeout", "keepalive"):
        if name in options:
            check_seconds(name, options[name], positive=True)
    if "reconnect_for" in options:
        check_seconds("reconnect_for", options["reconnect_for"])
    for name in ("max_record_bytes", "max_frame_bytes"):
        value = options.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value <= 0
        ):
            raise ValueError(f"{name}={value!r}: a positive int, or None, is needed")


def check_lane(name: Any, priority: Any) -> None:
    """``SessionLane.lane(name, priority)``."""
    check_name("lane name", name)
    check_choice("priority", priority, Priority)


def check_acquire(
    path: Any, purpose: Any, wait_timeout: Any, max_hold: Any, on_contention: Any
) -> None:
    """``Lane.acquire`` / ``Lane.lease``."""
    check_path(path)
    check_choice("purpose", purpose, Purpose)
    check_seconds("wait_timeout", wait_timeout, optional=True)
    check_seconds("max_hold", max_hold, optional=True, positive=True)
    check_choice("on_contention", on_contention, OnContention)


def check_recover(path: Any, reason: Any, grace: Any, lane: Any) -> None:
    """``SessionLane.recover``."""
    check_path(path)
    check_reason(reason)
    check_seconds("grace", grace)
    check_name("lane", lane)


def check_abandon(path: Any, reason: Any) -> None:
    """``Lane.abandon``: an optional path and reason."""
    if path is not None:
        check_path(path)
    if reason is not None:
        check_reason(reason)


def check_reason(reason: Any) -> None:
    if not isinstance(reason, str) or len(reason) > _REASON_MAX:
        raise ValueError(f"reason must be a str of at most {_REASON_MAX} characters")


def check_durability(durability: Any) -> None:
    """``durability=`` of an append: None (the service's setting) or one of the modes."""
    if durability is not None:
        check_choice("durability", durability, Durability)


def check_path(path: Any) -> None:
    """A transcript's path: a non-empty ``str`` (or ``os.PathLike`` of one)."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
    if not path:
        raise ValueError("path must not be empty")
    full = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)  # as sent
    if len(full) > _PATH_MAX:
        raise ValueError(f"path must be at most {_PATH_MAX} characters (got {len(full)})")
