"""One lane process of the race: ``python -m system.race.lane SPEC.json``.

Protocol with the runner: the process builds its plan (a pure function of the spec, so every
lane sees the same plan), opens its backend lane, prints ``ready`` on stdout, then reads the
run's t0 (a ``time.monotonic()`` value, shared by all processes on Linux) from stdin. It
starts each of its units at ``t0 + start_s`` on its own thread, writes one acknowledgement
line per unit, and exits by itself at ``t0 + duration_s + grace_s`` at the latest, logging
units still running then as ``cutoff``. Nothing else is printed on stdout.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from sessionlane.system.race._apparatus import AckLog, ActivityBoard, UnitContext, UnitOutcome
from sessionlane.system.race._spec import LaneSpec
from sessionlane.system.race.backends import LaneRunner, backend_from_spec
from sessionlane.system.race.verify import UnitKind
from sessionlane.system.race.workload import Plan

__all__ = ["LaneSpec", "main", "run_lane"]


class _Driver:
    """Schedules one lane's units and logs them exactly once."""

    def __init__(self, spec: LaneSpec, runner: LaneRunner, plan: Plan, t0: float) -> None:
        root = Path(spec.workdir)
        self._spec = spec
        self._runner = runner
        self._plan = plan
        self._t0 = t0
        self._sessions = root / "sessions"
        self._board = ActivityBoard(root / "activity")
        self._log = AckLog(root / "logs" / f"{spec.lane}.jsonl")
        self._hard_stop = t0 + plan.duration_s + plan.grace_s
        self._mutex = threading.Lock()
        self._open: dict[str, UnitContext] = {}
        self._threads: list[threading.Thread] = []

    def run(self) -> None:
        if self._spec.lane == "recovery":
            self._watch()
        elif self._spec.lane == "compaction":
            for compaction in self._plan.compactions:
                if not self._sleep_until(self._t0 + compaction.start_s):
                    break
                ctx = self._context("compaction", compaction.unit, compaction.session, 0)
                self._start(ctx, partial(self._runner.run_compaction, compaction, ctx))
        else:
            for turn in self._plan.turns_for(self._spec.lane):
                if not self._sleep_until(self._t0 + turn.start_s):
                    break
                ctx = self._context("turn", turn.turn, turn.session, turn.records)
                self._start(ctx, partial(self._runner.run_turn, turn, ctx))
        for thread in list(self._threads):
            thread.join(max(0.0, self._hard_stop - time.monotonic()))
        with self._mutex:
            leftovers = list(self._open.values())
            self._open.clear()
        for ctx in leftovers:
            self._log.write(
                ctx.entry(UnitOutcome("cutoff", None, "still running at the hard stop"))
            )
            ctx.idle()

    def close(self) -> None:
        # The connection/lock cleanup must not keep the process past its bound.
        closer = threading.Thread(target=self._runner.close, daemon=True)
        closer.start()
        closer.join(1.0)
        self._log.close()

    # -- recovery watcher -------------------------------------------------------------------

    def _watch(self) -> None:
        """Fire one recovery per stuck unit, coalesced per session (as upstream)."""
        policy = self._plan.recovery
        pools = {session: list(policy.runs_for(session)) for session in self._plan.sessions}
        fired: set[str] = set()
        active: dict[str, threading.Thread] = {}
        end = self._t0 + self._plan.duration_s
        while (
            self._sleep_until(min(end, time.monotonic() + policy.poll_s)) and time.monotonic() < end
        ):
            now = time.monotonic()
            for running in self._board.scan():
                if running.lane == "recovery" or running.unit in fired:
                    continue
                if now - running.since < policy.threshold_s or running.session not in pools:
                    continue
                busy = active.get(running.session)
                if (busy is not None and busy.is_alive()) or not pools[running.session]:
                    continue
                fired.add(running.unit)
                turn = pools[running.session].pop(0)
                ctx = self._context("turn", turn.turn, turn.session, turn.records)
                active[running.session] = self._start(
                    ctx, partial(self._runner.run_recovery, turn, ctx, running.unit)
                )

    # -- internals ----------------------------------------------------------------------------

    def _context(self, kind: UnitKind, unit: str, session: str, planned: int) -> UnitContext:
        return UnitContext(
            kind=kind,
            unit=unit,
            lane=self._spec.lane,
            session=session,
            path=self._plan.session_file(self._sessions, session),
            planned=planned,
            hard_stop=self._hard_stop,
            board=self._board,
        )

    def _start(self, ctx: UnitContext, work: Callable[[], UnitOutcome]) -> threading.Thread:
        with self._mutex:
            self._open[ctx.unit] = ctx
        thread = threading.Thread(
            target=self._execute, args=(ctx, work), name=ctx.unit, daemon=True
        )
        self._threads.append(thread)
        thread.start()
        return thread

    def _execute(self, ctx: UnitContext, work: Callable[[], UnitOutcome]) -> None:
        try:
            outcome = work()
        except Exception as error:  # a bug or an unexpected system error: log, never crash
            outcome = UnitOutcome("failed", "error", f"{type(error).__name__}: {error}")
        with self._mutex:
            if self._open.pop(ctx.unit, None) is None:
                return  # already logged as cutoff
            self._log.write(ctx.entry(outcome))

    def _sleep_until(self, when: float) -> bool:
        """Sleep until ``when``; False if that is past the end of the planned run."""
        if when >= self._t0 + self._plan.duration_s + 1e-9 and self._spec.lane != "recovery":
            return False
        delay = when - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return True


def run_lane(spec: LaneSpec, read_t0: Callable[[], float | None], ready: Callable[[], None]) -> int:
    """Open the lane, announce readiness, wait for t0, run, clean up. Returns an exit code."""
    plan = spec.plan()
    runner = backend_from_spec(spec.backend).open_lane(spec.lane, plan)
    ready()
    t0 = read_t0()
    if t0 is None:
        runner.close()
        return 2
    driver = _Driver(spec, runner, plan, t0)
    try:
        driver.run()
    finally:
        driver.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m system.race.lane SPEC.json", file=sys.stderr)
        return 64
    spec = LaneSpec.from_json(Path(args[0]).read_text())

    def ready() -> None:
        sys.stdout.write("ready\n")
        sys.stdout.flush()

    def read_t0() -> float | None:
        line = sys.stdin.readline()
        try:
            return float(line)
        except ValueError:
            return None

    return run_lane(spec, read_t0, ready)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Unit threads that outlived the bound are daemons; leave without waiting for them.
    os._exit(code)
