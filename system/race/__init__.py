"""``sessionlane race``: the same multi-lane workload through sessionlane and a lock-file baseline.

Public surface:

* ``add_race_arguments(parser)`` and ``run_race(args, service_address)``: the CLI's entry points;
* ``run_system(backend, plan, workdir)``: one system, one plan (``RunResult``);
* ``render_table(results)`` and ``plot_waits(results, path)``: presentation;
* ``make_plan`` (``sessionlane.system.race.workload``), ``verify``
  (``sessionlane.system.race.verify``), ``BaselineBackend`` / ``SessionlaneBackend``.

Importing this package loads neither rich nor matplotlib nor the sessionlane client.
"""

from __future__ import annotations

from sessionlane.system.race.backends import Backend, BaselineBackend, LaneRunner
from sessionlane.system.race.report import plot_waits, render_table
from sessionlane.system.race.runner import (
    METRIC_KEYS,
    RunResult,
    add_race_arguments,
    run_race,
    run_system,
)
from sessionlane.system.race.sessionlane_backend import SessionlaneBackend
from sessionlane.system.race.workload import Plan, make_plan

__all__ = [
    "METRIC_KEYS",
    "Backend",
    "BaselineBackend",
    "LaneRunner",
    "Plan",
    "RunResult",
    "SessionlaneBackend",
    "add_race_arguments",
    "make_plan",
    "plot_waits",
    "render_table",
    "run_race",
    "run_system",
]
