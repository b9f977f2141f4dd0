"""The one way integration tests wait for something: poll a condition, bounded, then fail.

A test waits only for a state it can observe (a status, a log line, a process gone), never for
time to pass: ``eventually`` returns as soon as the condition holds, and fails the test with
what it waited for when it does not hold within ``timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["eventually", "eventually_async"]


def eventually(
    check: Callable[[], Any], what: str, timeout: float = 10.0, every: float = 0.01
) -> Any:
    """Poll ``check`` until it returns something truthy, and return that; ``AssertionError``
    naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)
    return result


async def eventually_async(
    check: Callable[[], Awaitable[Any]], what: str, timeout: float = 10.0, every: float = 0.01
) -> Any:
    """``eventually`` for a coroutine check, without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while not (result := await check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(every)
    return result
