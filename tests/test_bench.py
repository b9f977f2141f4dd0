"""``sessionlane bench``: the hand-off arithmetic, the options, and a quick real run.

The quick run is the real thing (a service, spawned worker processes, the peers) in a
subprocess tagged with its own ``SESSIONLANE_TEST_TAG``, so that anything it leaves running is
found afterwards. Numbers are checked for shape and sanity only: the issue's targets are
reported by the bench, never asserted here (this machine's load decides them).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from leftovers import TAG_VARIABLE, find_leftovers, kill_leftovers
from rich.console import Console

from sessionlane.system.bench import SUITES, add_bench_arguments
from sessionlane.system.bench._report import table
from sessionlane.system.bench._stats import percentile, ratio
from sessionlane.system.bench.handoff import analyse

REPO = Path(__file__).resolve().parent.parent
CONTENDERS = ("sessionlane", "sessionlane_fused", "filelock", "flock", "lockfile")


def stamps(*cycles: tuple[float, float, float, float]) -> list[tuple[float, float, float, float]]:
    """Cycles as ``(asked, granted, releasing, released)`` in milliseconds -> seconds."""
    return [(a / 1e3, g / 1e3, r / 1e3, d / 1e3) for a, g, r, d in cycles]


def test_a_fair_queue_hands_off_from_each_release_to_the_next_grant() -> None:
    a = stamps((0, 0, 1, 1.1), (1.2, 4, 5, 5.1))
    b = stamps((0.5, 2, 3, 3.1))
    result = analyse([a, b])
    assert result["cycles"] == 3
    assert result["handoffs"] == 2
    assert result["regrant_pct"] == 0.0
    assert result["handoff_ms_p50"] == pytest.approx(1.0)
    assert result["overlaps"] == 0


def test_a_lock_retaken_by_its_releaser_is_charged_from_the_first_release_the_waiter_saw() -> None:
    hog = stamps((0, 0, 1, 1), (1, 1, 2, 2), (2, 2, 3, 3))
    waiter = stamps((0.5, 13, 14, 14))
    result = analyse([hog, waiter])
    assert result["handoffs"] == 1
    assert result["handoff_ms_p50"] == pytest.approx(12.0)  # from the release at 1 ms
    assert result["wakeup_ms_p50"] == pytest.approx(10.0)  # from the last release, at 3 ms
    assert result["regrant_pct"] == pytest.approx(66.7)
    assert result["fairness"] == pytest.approx(1 / 3, abs=1e-3)


def test_a_grant_before_the_previous_holder_let_go_is_counted_as_an_overlap() -> None:
    result = analyse([stamps((0, 0, 5, 5)), stamps((0, 2, 3, 3))])
    assert result["overlaps"] == 1


def test_percentiles_interpolate_and_ratios_refuse_a_zero_denominator() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([], 50) is None
    assert ratio(1.0, 2000.0) == pytest.approx(0.0005)  # small ratios keep their digits
    assert ratio(3.0, 0.0) is None
    assert ratio(None, 1.0) is None


def test_a_table_prints_brackets_and_error_details_as_text_never_as_markup() -> None:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(table("files in [/srv/x]", ["path [a]"], [["[/tmp/s/a.jsonl]"], ["[bold]x"]]))
    text = console.export_text()
    assert "[/srv/x]" in text and "path [a]" in text
    assert "[/tmp/s/a.jsonl]" in text and "[bold]x" in text


def test_the_bench_options_parse() -> None:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args(["--suite", "turn", "--suite", "handoff", "--quick", "--json"])
    assert args.suites == ["turn", "handoff"] and args.quick and args.json
    assert parser.parse_args([]).suites is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--suite", "nope"])
    assert set(SUITES) == {"handoff", "turn", "append", "scale", "gateway", "cost"}


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


@pytest.mark.tcp
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_quick_run_reports_every_contender_and_leaves_nothing_running(tmp_path: Path) -> None:
    results = quick_run(
        tmp_path, "--suite", "handoff", "--suite", "turn", "--suite", "append", timeout=120
    )
    assert results["meta"]["quick"] is True

    handoff = results["handoff"]
    redis_here = shutil.which("redis-server") is not None
    if redis_here:
        assert "redis" in handoff and "skipped" not in handoff
    else:
        assert handoff["skipped"] == {"redis": "redis-server is not on PATH"}
    for name in CONTENDERS + (("redis",) if redis_here else ()):
        k2 = handoff[name]["k2"]
        for key in ("cycles_per_s", "handoff_ms_p50", "handoff_ms_p99", "wait_ms_p50"):
            assert positive(k2[key]), (name, key, k2[key])
        assert k2["overlaps"] == 0, name
        assert positive(handoff[name]["files2"]["cycles_per_s"]), name
    for peer in ("filelock", "flock", "lockfile") + (("redis",) if redis_here else ()):
        for key in ("handoff_p50", "handoff_p99", "cycles"):
            assert positive(handoff["ratios"]["k2"][peer][key]), (peer, key)
            assert positive(handoff["ratios_fused"]["k2"][peer][key]), (peer, key)

    turn = results["turn"]
    assert positive(turn["direct"]["ms_p50"]) and positive(turn["direct"]["ms_p99"])
    for name in ("sessionlane", "sessionlane_10_appends", "flock", "lockfile"):
        assert positive(turn[name]["ms_p50"]) and positive(turn[name]["ms_p99"]), name
        assert finite(turn[name]["overhead_ms_p50"]) and finite(turn[name]["overhead_ms_p99"])

    append = results["append"]
    for key in ("sessionlane_1_file", "sessionlane_16_files", "sessionlane_pipelined"):
        assert positive(append[key]["records_per_s"]), key
        assert positive(append[key]["syncs_per_append"]), key
        assert positive(append["ratios"][key]["of_ceiling"]), key
    for key in ("fsync_each", "batched_w", "ceiling"):
        assert positive(append[key]["records_per_s"]), key

    targets = {t["target"]: t for t in results["targets"]}
    assert len(targets) == 14
    assert not any("issue" in name for name in targets), "goals speak of the product"
    piped = targets["pipelined durable appends, 8 writers on one file"]
    assert piped["measured"] is None or positive(piped["measured"])  # K = 4 when quick
    turn_target = targets["uncontended turn overhead over the direct write (p50)"]
    assert finite(turn_target["measured"]) and isinstance(turn_target["met"], bool)


def quick_run(tmp_path: Path, *options: str, timeout: float) -> dict[str, Any]:
    """What ``sessionlane bench --quick --json OPTIONS`` wrote (its ``--out``), run in a
    subprocess whose ``SESSIONLANE_TEST_TAG`` is its own, working in ``tmp_path``. Fails the
    test if it did not exit 0 or left a process running (what it left is killed)."""
    tag = f"bench-{uuid.uuid4().hex[:12]}"
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "sessionlane.system.ops.cli", "bench", "--quick", "--json"]
    with (tmp_path / "stderr.txt").open("w") as stderr:
        completed = subprocess.run(
            [*command, *options, "--out", str(out), "--dir", str(tmp_path)],
            cwd=REPO,
            env={**os.environ, TAG_VARIABLE: tag},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            timeout=timeout,
        )
    left = _leftovers(tag)
    assert completed.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert not left, f"the bench left processes running: {left}"
    results: dict[str, Any] = json.loads(out.read_text())
    return results


def _leftovers(tag: str) -> list[tuple[int, str]]:
    """Processes still carrying ``tag`` after a short grace (exiting ones get to finish)."""
    deadline = time.monotonic() + 3.0
    while (left := find_leftovers(tag)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        kill_leftovers(left)
    return left
