"""Runs one system through the plan with one OS process per lane, then verifies the files.

Lane processes are ``python -m system.race.lane`` subprocesses, each in its own session and
process group (never forked from the parent, which may own an actor system). The runner
waits for all of them to say ``ready``, hands them one common t0, waits at most until
``t0 + duration + grace + EXIT_SLACK_S`` and then kills whatever is left by process group
(SIGTERM, then SIGKILL), so no process survives a run, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sessionlane.system.race._spec import LaneSpec, params_to_dict
from sessionlane.system.race.backends import Backend, BaselineBackend
from sessionlane.system.race.verify import (
    METRIC_KEYS,
    VerifyReport,
    read_ack_log,
    summarize,
    verify,
)
from sessionlane.system.race.workload import LANE_KINDS, LaneKind, Plan, make_plan
from sessionlane.system.runtime.launch import group_members

__all__ = [
    "EXIT_SLACK_S",
    "METRIC_KEYS",
    "LaneStartError",
    "Progress",
    "RunResult",
    "add_race_arguments",
    "run_race",
    "run_system",
]

EXIT_SLACK_S = 3.0
"""How long past a lane's own bound the runner waits before killing its process group."""
TERM_GRACE_S = 1.0
"""Between SIGTERM and SIGKILL for a straggler's process group."""

Progress = Callable[[str, float, float], None]
"""``progress(system, elapsed_s, expected_s)``, called about ten times a second."""


class LaneStartError(RuntimeError):
    """A lane process did not report ready (its stderr tail is in the message)."""


@dataclass(frozen=True)
class RunResult:
    """One system's run: the race metrics (exactly ``METRIC_KEYS``) and the full report."""

    system: str
    metrics: dict[str, float]
    report: VerifyReport
    lane_exit_codes: dict[str, int | None] = field(default_factory=dict)
    killed: tuple[str, ...] = ()
    """Lanes the runner had to kill (they should stop by themselves)."""


def run_system(
    backend: Backend,
    plan: Plan,
    workdir: Path,
    *,
    progress: Progress | None = None,
    startup_timeout_s: float = 30.0,
) -> RunResult:
    """Replay ``plan`` through ``backend`` in ``workdir`` and verify the outcome.

    ``workdir`` gets ``sessions/`` (the transcripts, created empty first), ``logs/`` (one
    acknowledgement log per lane), ``activity/``, ``stderr/`` and the lane specs. A sessionlane
    service must accept paths under ``workdir / "sessions"``.
    """
    workdir = Path(workdir).resolve()  # lane processes run in another directory
    for name in ("sessions", "logs", "activity", "stderr", "specs"):
        (workdir / name).mkdir(parents=True, exist_ok=True)
    for session in plan.sessions:
        plan.session_file(workdir / "sessions", session).touch()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    killed: list[str] = []
    t0 = time.monotonic()
    ended = t0
    try:
        for lane in LANE_KINDS:
            procs[lane] = _spawn(backend, plan, workdir, lane)
        _await_ready(procs, workdir, startup_timeout_s)
        t0 = time.monotonic() + 0.05
        for proc in procs.values():
            assert proc.stdin is not None
            proc.stdin.write(f"{t0!r}\n".encode())
            proc.stdin.close()
        expected = plan.duration_s + plan.grace_s
        deadline = t0 + expected + EXIT_SLACK_S
        while any(proc.poll() is None for proc in procs.values()) and time.monotonic() < deadline:
            if progress is not None:
                progress(backend.name, max(0.0, time.monotonic() - t0), plan.duration_s)
            time.sleep(0.1)
        ended = time.monotonic()
    finally:
        killed = _reap(procs)
    entries = []
    log_errors = 0
    for lane in LANE_KINDS:
        lane_entries, bad = read_ack_log(workdir / "logs" / f"{lane}.jsonl")
        entries.extend(lane_entries)
        log_errors += bad
    files = {s: plan.session_file(workdir / "sessions", s).read_bytes() for s in plan.sessions}
    report = verify(files, entries, log_errors)
    return RunResult(
        system=backend.name,
        metrics=summarize(report, ended - t0),
        report=report,
        lane_exit_codes={lane: proc.returncode for lane, proc in procs.items()},
        killed=tuple(killed),
    )


def _spawn(backend: Backend, plan: Plan, workdir: Path, lane: LaneKind) -> subprocess.Popen[bytes]:
    spec = LaneSpec(
        lane=lane,
        backend=backend.spec(),
        seed=plan.seed,
        sessions=len(plan.sessions),
        duration_s=plan.duration_s,
        speed=plan.speed,
        workdir=str(workdir),
        params=params_to_dict(plan.params),
    )
    spec_path = workdir / "specs" / f"{lane}.json"
    spec_path.write_text(spec.to_json())
    # The directory holding the ``sessionlane`` package (not resolved: in a source checkout
    # ``sessionlane/system`` is a link to ``system/``, and the link's side is the package's).
    root = str(Path(__file__).absolute().parents[3])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with open(workdir / "stderr" / f"{lane}.log", "wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "sessionlane.system.race.lane", str(spec_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=root,
            env=env,
            start_new_session=True,  # own process group: the runner can kill it as a whole
        )


def _await_ready(
    procs: dict[str, subprocess.Popen[bytes]], workdir: Path, timeout_s: float
) -> None:
    """Wait until every lane printed ``ready``; ``LaneStartError`` otherwise."""
    pending = set(procs)
    with selectors.DefaultSelector() as selector:
        for lane, proc in procs.items():
            assert proc.stdout is not None
            selector.register(proc.stdout, selectors.EVENT_READ, data=lane)
        deadline = time.monotonic() + timeout_s
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LaneStartError(_stderr_tails(workdir, sorted(pending), "not ready in time"))
            for key, _ in selector.select(remaining):
                lane = str(key.data)
                stdout = procs[lane].stdout
                assert stdout is not None
                if stdout.readline().strip() != b"ready":
                    raise LaneStartError(_stderr_tails(workdir, [lane], "exited before ready"))
                selector.unregister(stdout)
                pending.discard(lane)


def _stderr_tails(workdir: Path, lanes: list[str], what: str) -> str:
    parts = [f"lane process(es) {what}:"]
    for lane in lanes:
        path = workdir / "stderr" / f"{lane}.log"
        tail = path.read_text(errors="replace")[-2000:] if path.exists() else ""
        parts.append(f"--- {lane}\n{tail}")
    return "\n".join(parts)


def _reap(procs: dict[str, subprocess.Popen[bytes]]) -> list[str]:
    """Kill every lane still running by process group, then wait for all. Returns the killed."""
    stragglers = [lane for lane, proc in procs.items() if proc.poll() is None]
    for lane in stragglers:
        _signal_group(procs[lane], signal.SIGTERM)
    deadline = time.monotonic() + TERM_GRACE_S
    for lane in stragglers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            procs[lane].wait(max(0.0, deadline - time.monotonic()))
    for proc in procs.values():
        # SIGKILL the whole group even if the leader is gone: nothing of a lane may survive.
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
        _wait_for_group_gone(proc.pid)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
    return stragglers


def _wait_for_group_gone(pgid: int, timeout: float = 5.0) -> None:
    """Wait (bounded) until no live process is left in group ``pgid``.

    SIGKILL is delivered asynchronously: a grandchild may still be running for a moment after
    ``killpg`` returns, and the caller promises nothing of the lane survives.
    """
    deadline = time.monotonic() + timeout
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.005)  # a bounded wait for the kernel to finish the kill


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


# ---------------------------------------------------------------------------------------------
# The race


def add_race_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``sessionlane race`` options."""
    parser.add_argument(
        "--duration", type=float, default=30.0, help="seconds of workload per system (default 30)"
    )
    parser.add_argument(
        "--sessions", type=int, default=8, help="session files in the workload (default 8)"
    )
    parser.add_argument("--seed", type=int, default=7, help="workload seed (default 7)")
    parser.add_argument(
        "--speed",
        type=float,
        default=20.0,
        help="time compression: model times and lock budgets are divided by it (default 20)",
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        default=None,
        help="write the wait-time distributions (needs the plot extra: sessionlane[plot])",
    )
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run_race(
    args: argparse.Namespace,
    service_address: str | None,
    *,
    workdir: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, RunResult]:
    """Run sessionlane (if ``service_address`` is given) then the baseline on the same plan.

    ``workdir``: where both runs keep their files (``<workdir>/sessionlane``,
    ``<workdir>/baseline``); the service must accept paths under it. When None, a temporary
    directory is used and removed afterwards. Writes ``args.plot`` if set. Returns the results
    keyed ``"sessionlane"`` and ``"baseline"`` (in that order).
    """
    plan = make_plan(args.seed, args.sessions, args.duration, args.speed)
    owned = workdir is None
    base = Path(tempfile.mkdtemp(prefix="sessionlane-race-")) if workdir is None else Path(workdir)
    results: dict[str, RunResult] = {}
    try:
        if service_address is not None:
            from sessionlane.system.race.sessionlane_backend import SessionlaneBackend

            backend = SessionlaneBackend(service_address)
            results["sessionlane"] = run_system(
                backend, plan, base / "sessionlane", progress=progress
            )
        results["baseline"] = run_system(
            BaselineBackend(), plan, base / "baseline", progress=progress
        )
    finally:
        if owned:
            shutil.rmtree(base, ignore_errors=True)
    if getattr(args, "plot", None):
        from sessionlane.system.race.report import plot_waits

        plot_waits(results, Path(args.plot))
    return results
