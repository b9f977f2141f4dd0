"""``sessionlane race`` end to end: the real command, an embedded service, both systems."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sessionlane.system.race.runner import METRIC_KEYS


def test_a_short_race_prints_both_systems_and_sessionlane_loses_nothing() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sessionlane.system.ops.cli",
            "race",
            "--duration",
            "4",
            "--sessions",
            "3",
            "--seed",
            "11",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    assert list(results) == ["sessionlane", "baseline"]
    for metrics in results.values():
        assert set(metrics) == set(METRIC_KEYS)
        assert metrics["turns_attempted"] > 0
    ours = results["sessionlane"]
    assert ours["records_acked"] > 0
    for key in ("records_lost", "interleaved_turns", "torn_lines", "turns_failed"):
        assert ours[key] == 0, (key, ours)
