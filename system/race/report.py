"""Presentation of race results: a side-by-side table (rich) and a wait-time plot (matplotlib).

Both libraries are imported inside the functions so lane processes never load them.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from sessionlane.system.race.runner import RunResult
from sessionlane.system.race.verify import METRIC_KEYS, percentile

__all__ = ["METRIC_MEANINGS", "plot_waits", "render_table"]

METRIC_MEANINGS: dict[str, str] = {
    "turns_attempted": "turns started: completed + failed + skipped (busy) + cut off at the end",
    "turns_completed": "turns whose every record was acknowledged",
    "turns_failed": "turns that ended in an error: the user's reply is lost",
    "takeover_errors": "fence tripped: the file changed while the lock was released for the model",
    "lock_timeouts": "gave up waiting for a busy session (lock / lease / owner budget ran out)",
    "records_acked": "records the system told a lane were written",
    "records_lost": "acknowledged records missing from the files afterwards",
    "interleaved_turns": "turns whose records are not one contiguous run in the file",
    "torn_lines": "lines that are not JSON objects, or a last line without newline",
    "wait_ms_p50": "median time a turn waited for the session (lock, lease or queue), ms",
    "wait_ms_p99": "99th percentile of that wait, ms",
    "handoff_ms_p50": "median time from one holder's release to the next waiter's grant, ms",
    "handoff_ms_p99": "99th percentile of the hand-off, ms",
    "wall_s": "wall time of the run, s",
}


def _format(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def render_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """The metrics of each system side by side, one row per metric with its meaning.

    ``results`` maps a system name to its metrics dict (``RunResult.metrics``).
    """
    from rich.console import Console
    from rich.table import Table

    table = Table(title="sessionlane race", show_lines=False)
    table.add_column("metric", style="bold")
    for name in results:
        table.add_column(name, justify="right")
    table.add_column("meaning", style="dim")
    for key in METRIC_KEYS:
        cells = [_format(metrics[key]) if key in metrics else "-" for metrics in results.values()]
        table.add_row(key, *cells, METRIC_MEANINGS[key])
    buffer = io.StringIO()
    console = Console(file=buffer, width=140, force_terminal=False, color_system=None)
    console.print(table)
    return buffer.getvalue()


def plot_waits(results: Mapping[str, RunResult | Sequence[float]], path: Path) -> None:
    """Write one PNG with the wait-time distribution (ECDF, log scale) of every system.

    ``results`` maps a system name to its ``RunResult`` or directly to wait samples in ms.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for name, result in results.items():
        samples = result.report.wait_samples_ms if isinstance(result, RunResult) else result
        # Zero waits cannot sit on a log axis: show them at 0.01 ms.
        values = sorted(max(0.01, float(v)) for v in samples)
        if not values:
            continue
        fractions = [(i + 1) / len(values) for i in range(len(values))]
        p50, p99 = percentile(values, 50), percentile(values, 99)
        axes.step(
            values, fractions, where="post", label=f"{name} (p50 {p50:.0f} ms, p99 {p99:.0f} ms)"
        )
    axes.set_xscale("log")
    axes.set_xlabel("wait per turn for the session, ms (log scale)")
    axes.set_ylabel("fraction of turns")
    axes.set_ylim(0.0, 1.0)
    axes.grid(True, which="both", alpha=0.3)
    axes.set_title("sessionlane race: time turns waited for their session")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(str(path))
