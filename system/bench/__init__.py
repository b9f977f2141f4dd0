"""``sessionlane bench``: sessionlane's speed, cost and scale against its peers, in one run.

Suites (``--suite NAME``, repeatable; all by default): ``handoff``, ``turn``, ``append``,
``scale``, ``gateway``. Each module's docstring says what it measures and how. ``--quick`` runs
each in a few seconds, ``--json`` prints machine-readable results, ``--out FILE`` also writes
them to a file.
"""

from sessionlane.system.bench._main import SUITES, add_bench_arguments, run_bench

__all__ = ["SUITES", "add_bench_arguments", "run_bench"]
