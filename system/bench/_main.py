"""``sessionlane bench``: arguments, the run loop over suites, and the output.

Suites run one after another, each against its peers in the same run; each starts and stops
its own service and workers. A suite that fails is reported with its error and the others still
run (exit status 1). Results go to stdout as rich tables, or as JSON with ``--json``; ``--out``
also writes the JSON to a file. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from sessionlane.actors import page_merge

__all__ = ["SUITES", "add_bench_arguments", "run_bench"]

log = logging.getLogger(__name__)

SUITES = ("handoff", "turn", "append", "scale", "gateway", "cost")
"""Every suite, in the order they run; each is the module ``sessionlane.system.bench.<name>``."""

_DURATION_S = 4.0
_QUICK_DURATION_S = 0.6
_WIDTH = 160


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    parser.add_argument(
        "--suite",
        action="append",
        dest="suites",
        choices=SUITES,
        metavar="NAME",
        help=f"run only this suite (repeatable; default all: {', '.join(SUITES)})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few seconds per suite (small K, 100 files at most)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON results to FILE")
    parser.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help=f"seconds per timed run (default {_DURATION_S:g}, quick {_QUICK_DURATION_S:g})",
    )
    parser.add_argument(
        "--plot",
        metavar="FILE",
        help="draw the cost model (the cost suite's points) into FILE (.svg, .png or .pdf)",
    )
    parser.add_argument(
        "--memory-merge",
        action="store_true",
        help="start every service with memory_merge = true (Linux 6.4+, ksmd running); the"
        " scale suite then also measures its files once the kernel has merged their pages",
    )
    parser.add_argument(
        "--dir",
        metavar="DIR",
        help="where the transcripts go (default: the system temp dir); measures that disk",
    )


def run_bench(args: argparse.Namespace) -> int:
    """Run the selected suites; 0 if every one completed, 1 otherwise."""
    from sessionlane.system.bench import _targets
    from sessionlane.system.bench._context import BenchContext
    from sessionlane.system.bench._progress import Progress

    selected = [name for name in SUITES if name in (args.suites or SUITES)]
    duration = args.duration or (_QUICK_DURATION_S if args.quick else _DURATION_S)
    if duration <= 0:
        print("sessionlane bench: --duration must be positive", file=sys.stderr)
        return 2
    plot = getattr(args, "plot", None)
    if plot:
        from sessionlane.system.bench._plot import PLOT_EXTRA_MISSING, plot_available

        if "cost" not in selected:
            print(
                "sessionlane bench: --plot draws the cost suite: add --suite cost", file=sys.stderr
            )
            return 2
        if not plot_available():
            print(PLOT_EXTRA_MISSING, file=sys.stderr)
            return 2
    memory_merge = bool(getattr(args, "memory_merge", False))
    if memory_merge and (why := page_merge.unavailable()) is not None:
        print(f"sessionlane bench: --memory-merge: {why}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="sessionlane-bench-", dir=args.dir))
    seconds: dict[str, float] = {}
    results: dict[str, Any] = {"meta": _meta(args, duration, workdir, seconds)}
    failed: list[str] = []
    try:
        with Progress(len(selected)) as progress:
            ctx = BenchContext(
                quick=bool(args.quick),
                workdir=workdir,
                progress=progress,
                duration=duration,
                memory_merge=memory_merge,
            )
            for name in selected:
                progress.suite(name)
                began = time.monotonic()
                try:
                    results[name] = importlib.import_module(f"sessionlane.system.bench.{name}").run(
                        ctx
                    )
                except Exception as exc:
                    log.exception("bench suite %s failed", name)
                    results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                    failed.append(name)
                seconds[name] = round(time.monotonic() - began, 1)
                progress.suite_done()
    finally:
        if not failed:
            shutil.rmtree(workdir, ignore_errors=True)
    results["meta"]["loadavg_at_end"] = _loadavg()
    results["targets"] = _targets.targets(results)
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if plot and "cost" not in failed:
        from sessionlane.system.bench._plot import write_plot

        write_plot(results, Path(plot))
        print(f"sessionlane bench: cost model drawn in {plot}", file=sys.stderr)
    if args.json:
        print(text)
    else:
        _print_tables(results, selected)
    if failed:
        print(
            f"sessionlane bench: failed: {', '.join(failed)} (logs kept in {workdir})",
            file=sys.stderr,
        )
        return 1
    return 0


def _meta(
    args: argparse.Namespace, duration: float, workdir: Path, seconds: dict[str, float]
) -> dict[str, Any]:
    """What the results were measured with (``seconds`` fills in as suites finish)."""
    from sessionlane.system.bench._peers import lockfile_source

    return {
        "command": "sessionlane bench " + " ".join(sys.argv[2:])
        if len(sys.argv) > 1 and sys.argv[1] == "bench"
        else None,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": bool(args.quick),
        "duration_s": duration,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "workdir": str(workdir),
        "lockfile": lockfile_source(),
        "loadavg_at_start": _loadavg(),
        "seconds": seconds,
        "memory_merge": _ksm() if getattr(args, "memory_merge", False) else None,
    }


def _ksm() -> dict[str, str]:
    """The kernel's merging settings a ``--memory-merge`` run was measured with."""
    found = {}
    for name in ("run", "pages_to_scan", "sleep_millisecs"):
        try:
            found[name] = (page_merge.KSM_RUN.parent / name).read_text().strip()
        except OSError:
            found[name] = "?"
    return found


def _loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages: a busy machine makes every number worse."""
    return [round(x, 2) for x in os.getloadavg()]


def _print_tables(results: dict[str, Any], selected: list[str]) -> None:
    from sessionlane.system.bench import _targets

    console = Console()
    if not console.is_terminal:
        console = Console(width=_WIDTH)
    meta = results["meta"]
    console.print(
        f"sessionlane bench: {meta['cpus']} CPUs, Python {meta['python']}, {meta['platform']}; "
        f"{meta['duration_s']:g} s per timed run{' (quick)' if meta['quick'] else ''}; "
        f"lockfile = {meta['lockfile']}; load average {meta['loadavg_at_start'][0]:g} at start, "
        f"{meta['loadavg_at_end'][0]:g} at end"
    )
    busy = max(meta["loadavg_at_start"][0], meta["loadavg_at_end"][0])
    if meta["cpus"] and busy > meta["cpus"]:
        console.print(
            f"[bold yellow]warning:[/] load average up to {busy:g} on {meta['cpus']} CPUs: other "
            "processes competed for the CPUs during this run, so latencies are pessimistic"
        )
    for name in selected:
        result = results[name]
        console.print()
        if "error" in result:
            console.print(f"[bold red]{name} failed:[/] {escape(str(result['error']))}")
            continue
        for renderable in importlib.import_module(f"sessionlane.system.bench.{name}").render(
            result
        ):
            console.print(renderable)
            console.print()
    console.print(_targets.render(results["targets"]))
