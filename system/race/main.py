"""``sessionlane race``: start an embedded service, run both systems, print, clean up.

Exit status 0 only if sessionlane lost, interleaved and tore nothing and failed no turn. The
embedded service and every lane process are stopped before this returns, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sessionlane.system.race.runner import Progress, RunResult, run_race

__all__ = ["run", "sessionlane_clean"]

_MUST_BE_ZERO = ("records_lost", "interleaved_turns", "torn_lines", "turns_failed")


def sessionlane_clean(metrics: dict[str, Any]) -> list[str]:
    """The metrics that break the promise (each must be 0), as ``name=value`` strings."""
    return [f"{key}={metrics[key]}" for key in _MUST_BE_ZERO if metrics.get(key)]


def service_overrides(speed: float) -> dict[str, int]:
    """The service's own clocks, compressed by the same factor as the workload's."""
    return {
        "aging_ms": max(50, int(10_000 / speed)),
        "max_hold_ms": max(1_000, int(300_000 / speed)),
        "wait_timeout_ms": max(2_000, int(600_000 / speed)),
        "keepalive_ms": 2_000,
    }


PLOT_EXTRA_MISSING = (
    "sessionlane: race --plot needs matplotlib, which a plain install leaves out:"
    " pip install 'sessionlane[plot]'"
)


def plotting_available() -> bool:
    """Whether matplotlib (the ``plot`` extra) can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def run(args: argparse.Namespace) -> int:
    from sessionlane.system.race.report import render_table
    from sessionlane.system.runtime.service import embedded_service

    if getattr(args, "plot", None) and not plotting_available():
        # Checked before the race, not after minutes of it.
        print(PLOT_EXTRA_MISSING, file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="sessionlane-race-"))
    overrides: dict[str, Any] = service_overrides(args.speed)
    try:
        with (
            embedded_service(
                [str(workdir)],
                log_file=workdir / "service.log",
                **overrides,
            ) as service,
            _progress(quiet=args.json) as progress,
        ):
            results = run_race(args, service.address, workdir=workdir, progress=progress)
        metrics = {name: dict(result.metrics) for name, result in results.items()}
        broken = sessionlane_clean(metrics["sessionlane"])
        if args.json:
            print(json.dumps(metrics, indent=2))
        else:
            print(render_table(metrics))
            print(_verdict(results, broken, args))
        return 1 if broken else 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _verdict(results: dict[str, RunResult], broken: list[str], args: argparse.Namespace) -> str:
    base = results["baseline"].metrics
    lines = [
        f"seed {args.seed}, {args.sessions} sessions, {args.duration:.0f} s per system, "
        f"speed x{args.speed:g} (model times and lock budgets divided by it)",
    ]
    if broken:
        lines.append("FAIL: sessionlane broke its promise: " + ", ".join(broken))
    else:
        lines.append(
            "sessionlane: no turn failed, nothing lost, interleaved or torn; "
            f"the baseline failed {base['turns_failed']} turns "
            f"({base['takeover_errors']} takeover errors, {base['lock_timeouts']} lock timeouts)."
        )
    if getattr(args, "plot", None):
        lines.append(f"wait-time distributions written to {args.plot}")
    return "\n".join(lines)


@contextmanager
def _progress(quiet: bool) -> Iterator[Progress | None]:
    """A live progress bar per system on stderr (plain lines when stderr is not a terminal)."""
    if quiet:
        yield None
        return
    if not sys.stderr.isatty():
        shown: dict[str, int] = {}

        def plain(system: str, elapsed: float, expected: float) -> None:
            step = int(elapsed // 10)
            if shown.get(system) != step:
                shown[system] = step
                print(f"race: {system} {elapsed:.0f}/{expected:.0f} s", file=sys.stderr, flush=True)

        yield plain
        return
    from rich.console import Console
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    bar = Bar(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def update(system: str, elapsed: float, expected: float) -> None:
        if system not in tasks:
            tasks[system] = bar.add_task(system, total=expected)
        bar.update(tasks[system], completed=min(elapsed, expected))

    with bar:
        yield update
