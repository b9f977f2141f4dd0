"""Worker processes for the bench: spawned once per suite, started together, always reaped.

A measurement with K processes needs them to start at the same instant and to be gone
afterwards, whatever happened. ``WorkerPool`` spawns (never forks: the bench process may hold
threads and an actor system's sockets) ``size`` workers that each wait for tasks. ``run``
sends one task per worker, waits until every one has finished its set-up and called
``gate.wait()``, then releases them all at a common ``start_at`` on the system-wide monotonic
clock, and collects their results within a deadline. ``close`` stops the workers and kills
any that do not exit within a bound.

A task is a module-level function ``fn(params, gate) -> result`` named by ``"module:name"``;
params and results must pickle.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import queue
import time
import traceback
from collections.abc import Callable
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from types import TracebackType
from typing import Any, Self

__all__ = ["BenchError", "Gate", "WorkerPool"]

_POLL_S = 0.1
_SETUP_TIMEOUT_S = 60.0
_START_DELAY_S = 0.05
_JOIN_S = 5.0


class BenchError(RuntimeError):
    """A benchmark could not be carried out (a worker failed, died or ran past its deadline)."""


class _Stop(Exception):
    """The pool is closing while a task waits at its gate."""


class Gate:
    """What a task calls once its set-up is done: blocks until the common start, returns it."""

    def __init__(self, index: int, inbox: Queue[Any], outbox: Queue[Any]) -> None:
        self.index = index
        self._inbox = inbox
        self._outbox = outbox

    def wait(self) -> float:
        self._outbox.put(("ready", self.index, None))
        message = self._inbox.get()
        if message[0] != "go":
            raise _Stop
        start_at: float = message[1]
        delay = start_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return start_at


def _worker_main(index: int, inbox: Queue[Any], outbox: Queue[Any]) -> None:
    """The loop of one worker process: run tasks until told to stop."""
    while True:
        message = inbox.get()
        if message[0] == "stop":
            return
        _, target, params = message
        try:
            module, _, name = target.partition(":")
            fn = getattr(importlib.import_module(module), name)
            result = fn(params, Gate(index, inbox, outbox))
        except _Stop:
            return
        except BaseException:
            outbox.put(("error", index, traceback.format_exc()))
        else:
            outbox.put(("result", index, result))


class WorkerPool:
    """``size`` spawned worker processes; use as a context manager so they are always reaped.

    ``tick`` is called about every 0.1 s while the pool waits (the progress display).
    """

    def __init__(self, size: int, *, tick: Callable[[], None] | None = None) -> None:
        self.size = size
        self._tick = tick or (lambda: None)
        self._ctx = multiprocessing.get_context("spawn")
        self._outbox: Queue[Any] = self._ctx.Queue()
        self._inboxes: list[Queue[Any]] = []
        self._procs: list[SpawnProcess] = []
        self._closed = False

    def __enter__(self) -> Self:
        try:
            for index in range(self.size):
                inbox: Queue[Any] = self._ctx.Queue()
                proc = self._ctx.Process(
                    target=_worker_main,
                    args=(index, inbox, self._outbox),
                    name=f"sessionlane-bench-{index}",
                    daemon=True,
                )
                proc.start()
                self._inboxes.append(inbox)
                self._procs.append(proc)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs if proc.pid is not None]

    def run(self, target: str, params: list[dict[str, Any]], *, timeout: float) -> list[Any]:
        """Run ``target`` on the first ``len(params)`` workers at once; their results in order.

        ``timeout`` bounds the measured part (after the common start). Raises ``BenchError``
        if a worker raises, dies or does not finish in time; the pool is then unusable.
        """
        if len(params) > self.size:
            raise ValueError(f"{len(params)} tasks for a pool of {self.size}")
        for index, p in enumerate(params):
            self._inboxes[index].put(("task", target, p))
        self._await("ready", len(params), _SETUP_TIMEOUT_S)
        start_at = time.monotonic() + _START_DELAY_S
        for index in range(len(params)):
            self._inboxes[index].put(("go", start_at))
        found = self._await("result", len(params), timeout + _START_DELAY_S)
        return [found[index] for index in range(len(params))]

    def _await(self, kind: str, count: int, timeout: float) -> dict[int, Any]:
        deadline = time.monotonic() + timeout
        found: dict[int, Any] = {}
        while len(found) < count:
            self._tick()
            if time.monotonic() > deadline:
                raise BenchError(f"workers did not report {kind} within {timeout:.0f} s")
            try:
                what, index, value = self._outbox.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [p.name for p in self._procs if p.exitcode is not None]
                if dead:
                    raise BenchError(f"worker processes died: {', '.join(dead)}") from None
                continue
            if what == "error":
                raise BenchError(f"worker {index} failed:\n{value}")
            if what != kind:
                raise BenchError(f"worker {index}: expected {kind}, got {what}")
            found[index] = value
        return found

    def close(self) -> None:
        """Stop every worker: ask, wait a bounded time, then terminate and kill. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for inbox in self._inboxes:
            with contextlib.suppress(Exception):
                inbox.put(("stop",))
        deadline = time.monotonic() + _JOIN_S
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(1.0)
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
        for q in [*self._inboxes, self._outbox]:
            q.close()
            q.cancel_join_thread()
        self._procs.clear()
        self._inboxes.clear()
