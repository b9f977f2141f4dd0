"""``sessionlane bench --suite cost``: the model's arithmetic, the plot, and a quick real run.

The real run is a subprocess tagged with its own ``SESSIONLANE_TEST_TAG`` (anything it leaves
running is found and killed); its numbers are checked for shape and sanity only, never
against a goal (this machine's load decides them).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

import pytest
from test_bench import positive, quick_run

from sessionlane.system.bench import add_bench_arguments, run_bench
from sessionlane.system.bench._plot import write_plot
from sessionlane.system.bench.cost import model, slope


def points() -> dict[str, Any]:
    """A cost result as the suite makes it: 3 MB per file over a 20 MB base, 12 KB per
    connection after a first one that costs 500 KB."""
    return {
        "cycle_one_file": [
            {
                "lanes": k,
                "files": 1,
                "cycles": 100,
                "cycles_per_s": 50.0,
                "cpu_s": 0.1 * k,
                "cpu_ms_per_cycle": float(k),
            }
            for k in (1, 2, 4)
        ],
        "cycle_own_file": [
            {
                "lanes": 2,
                "files": 2,
                "cycles": 10,
                "cycles_per_s": 5.0,
                "cpu_s": 0.02,
                "cpu_ms_per_cycle": 2.0,
            }
        ],
        "append_one_file": [
            {
                "writers": 1,
                "appends": 10,
                "appends_per_s": 5.0,
                "cpu_s": 0.01,
                "cpu_ms_per_append": 1.0,
            },
            {
                "writers": 8,
                "appends": 10,
                "appends_per_s": 5.0,
                "cpu_s": 0.005,
                "cpu_ms_per_append": 0.5,
            },
        ],
        "memory_files": [
            {"files": n, "processes": 5 + n, "group_uss_mb": 20.0 + 3.0 * n} for n in (0, 1, 10, 50)
        ],
        "memory_connections": [
            {"connections": 0, "gateway_uss_mb": 8.0, "group_uss_mb": 20.0},
            *(
                {"connections": c, "gateway_uss_mb": 8.5 + 12.0 * c / 1024.0, "group_uss_mb": 21.0}
                for c in (1, 50, 200)
            ),
        ],
    }


def test_the_slope_is_least_squares_and_needs_two_distinct_points() -> None:
    assert slope([(0, 1.0), (1, 3.0), (2, 5.0)]) == pytest.approx(2.0)
    assert slope([(0, 0.0), (1, 1.0), (2, 1.0), (3, 3.0)]) == pytest.approx(0.9)
    assert slope([(1, 1.0), (1, 2.0)]) is None
    assert slope([]) is None


def test_the_model_takes_per_unit_costs_as_slopes_not_averages() -> None:
    m = model(points())
    assert m["uss_mb_per_file"] == pytest.approx(3.0)
    assert m["base_uss_mb"] == 20.0
    # The first connection's 500 KB is a fixed cost, not spread over the others.
    assert m["uss_kb_per_connection"] == pytest.approx(12.0)
    assert m["cpu_ms_per_cycle"] == [1.0, 4.0]
    assert m["cpu_ms_per_append"] == [0.5, 1.0]


def test_the_plot_draws_the_four_panels_into_an_svg(tmp_path: Path) -> None:
    result = points()
    result["model"] = model(result)
    results = {"meta": {"cpus": 2, "python": "3.11", "loadavg_at_start": [1.5]}, "cost": result}
    out = tmp_path / "cost.svg"
    assert write_plot(results, out)
    svg = out.read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    for title in (
        "CPU per cycle",
        "CPU per durable append",
        "3.0 MB per live file",
        "12.0 KB per connection",
    ):
        assert title in svg, title
    assert not write_plot({"meta": {}}, tmp_path / "none.svg")
    assert not (tmp_path / "none.svg").exists()


def test_plot_without_the_cost_suite_is_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args(["--suite", "turn", "--plot", str(tmp_path / "x.svg")])
    assert run_bench(args) == 2
    assert "--suite cost" in capsys.readouterr().err
    assert not (tmp_path / "x.svg").exists()


@pytest.mark.tcp
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_quick_cost_run_measures_every_point_draws_it_and_leaves_nothing(tmp_path: Path) -> None:
    plot = tmp_path / "cost.svg"
    cost = quick_run(tmp_path, "--suite", "cost", "--plot", str(plot), timeout=150)["cost"]
    for p in (*cost["cycle_one_file"], *cost["cycle_own_file"]):
        assert p["cycles"] > 0 and positive(p["cpu_ms_per_cycle"]), p
    for p in cost["append_one_file"]:
        assert p["appends"] > 0 and positive(p["cpu_ms_per_append"]), p
    files = cost["memory_files"]
    assert [p["file_processes"] for p in files] == [p["files"] for p in files]
    # The group grows by a process per file, give or take the parked child: it may be
    # between becoming the last file's process and its successor's fork when counted.
    assert all(p["processes"] - files[0]["processes"] >= p["files"] - 1 for p in files)
    assert all(a["group_uss_mb"] < b["group_uss_mb"] for a, b in itertools.pairwise(files))
    assert all(positive(p["gateway_uss_mb"]) for p in cost["memory_connections"])
    assert positive(cost["model"]["uss_mb_per_file"])
    assert "<svg" in plot.read_text()
