"""A short baseline-only race: real lane processes, real files, nothing left behind."""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

import pytest

from sessionlane.system.race import METRIC_KEYS, add_race_arguments, render_table, run_race
from sessionlane.system.race.runner import LaneStartError, _reap, run_system
from sessionlane.system.race.verify import read_ack_log
from sessionlane.system.race.workload import make_plan


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry))
    return found


def _children_of(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rfind(")") + 2 :].split()[1]) == pid:
            children.append(int(entry))
    return children


@pytest.mark.slow
def test_a_short_baseline_race_yields_the_metrics_and_leaves_no_process(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_race_arguments(parser)
    plot = tmp_path / "waits.png"
    args = parser.parse_args(
        ["--duration", "2.5", "--sessions", "3", "--seed", "4", "--plot", str(plot)]
    )
    before = set(_children_of(os.getpid()))

    results = run_race(args, None, workdir=tmp_path / "race")

    assert list(results) == ["baseline"]
    result = results["baseline"]
    metrics = result.metrics
    assert tuple(metrics) == METRIC_KEYS
    assert metrics["turns_attempted"] > 0 and metrics["records_acked"] > 0
    assert metrics["turns_attempted"] >= metrics["turns_completed"] + metrics["turns_failed"]
    assert metrics["torn_lines"] == 0
    assert 2.5 <= metrics["wall_s"] < 2.5 + 2.0 + 3.0  # duration + grace + exit slack
    assert result.killed == ()  # every lane stopped by itself
    assert set(result.lane_exit_codes.values()) == {0}
    logs = sorted(p.name for p in (tmp_path / "race" / "baseline" / "logs").iterdir())
    assert logs == [f"{lane}.jsonl" for lane in sorted(result.lane_exit_codes)]
    entries, bad = read_ack_log(tmp_path / "race" / "baseline" / "logs" / "channel.jsonl")
    assert entries and bad == 0
    assert plot.stat().st_size > 10_000
    table = render_table({name: r.metrics for name, r in results.items()})
    assert "takeover_errors" in table and "baseline" in table
    # Nothing survives: no lane process, no child of ours.
    assert _processes_mentioning(str(tmp_path)) == []
    assert set(_children_of(os.getpid())) <= before


class _BrokenBackend:
    """A backend no lane process can rebuild: every lane dies before saying ready."""

    name = "broken"

    def spec(self) -> dict[str, object]:
        return {"name": "no-such-backend"}

    def open_lane(self, lane: object, plan: object) -> object:
        raise AssertionError("never called in the parent")


def test_a_lane_that_cannot_start_fails_the_run_with_its_stderr_and_is_reaped(
    tmp_path: Path,
) -> None:
    plan = make_plan(1, 1, 1.0, 20.0)
    with pytest.raises(LaneStartError, match="unknown backend 'no-such-backend'"):
        run_system(_BrokenBackend(), plan, tmp_path)  # type: ignore[arg-type]
    assert _processes_mentioning(str(tmp_path)) == []


def test_stragglers_are_killed_with_their_whole_process_group() -> None:
    marker = "61.123"
    proc = subprocess.Popen(
        ["sh", "-c", f"sleep {marker} & sleep {marker}; wait"], start_new_session=True
    )
    try:
        deadline = time.monotonic() + 5
        while len(_processes_mentioning(f"sleep\0{marker}")) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # polling for the grandchild to exist, not ordering anything
        assert len(_processes_mentioning(f"sleep\0{marker}")) == 2
        assert _reap({"stuck": proc}) == ["stuck"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _processes_mentioning(f"sleep\0{marker}") == []
