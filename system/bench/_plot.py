"""``sessionlane bench --plot FILE``: the cost model as a figure (SVG, PNG or PDF by suffix).

Four panels, drawn from the ``cost`` suite's points (and the ``scale`` suite's, when it ran):
service CPU per lease cycle against lanes and files, service CPU per append against writers,
the group's memory against live files, the gateway's memory against idle connections. Each
"per" figure in the titles is the suite's least-squares slope (``cost.model``). matplotlib comes
with the ``plot`` extra (``bench`` brings it too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["PLOT_EXTRA_MISSING", "plot_available", "write_plot"]

PLOT_EXTRA_MISSING = (
    "sessionlane: bench --plot needs matplotlib, which a plain install leaves out:"
    " pip install 'sessionlane[bench]'"
)


def plot_available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plot(results: dict[str, Any], path: Path) -> bool:
    """Draw the cost model from ``results`` (a bench run's) into ``path``; False if the run
    has no ``cost`` results to draw."""
    cost = results.get("cost")
    if not isinstance(cost, dict) or "model" not in cost:
        return False
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    meta = results.get("meta", {})
    figure = Figure(figsize=(10, 7), dpi=100)
    FigureCanvasAgg(figure)
    m = cost["model"]
    cycles, appends, files, conns = (figure.add_subplot(2, 2, i) for i in range(1, 5))

    one = cost["cycle_one_file"]
    own = cost["cycle_own_file"]
    cycles.plot(
        [p["lanes"] for p in one],
        [p["cpu_ms_per_cycle"] for p in one],
        "o-",
        label="L lanes on one file",
    )
    cycles.plot(
        [p["lanes"] for p in own],
        [p["cpu_ms_per_cycle"] for p in own],
        "s--",
        label="L lanes, one file each",
    )
    cycles.set_xlabel("client processes (lanes) L")
    cycles.set_ylabel("service CPU ms per lease cycle")
    cycles.set_title("CPU per cycle (acquire, append, release)")
    cycles.set_ylim(bottom=0)
    cycles.legend(loc="lower right")

    app = cost["append_one_file"]
    appends.plot([p["writers"] for p in app], [p["cpu_ms_per_append"] for p in app], "o-")
    appends.set_xlabel("writers on one file")
    appends.set_ylabel("service CPU ms per append")
    appends.set_title("CPU per durable append (group commit)")
    appends.set_ylim(bottom=0)

    mem = cost["memory_files"]
    files.plot(
        [p["files"] for p in mem], [p["group_uss_mb"] for p in mem], "o-", label="cost suite"
    )
    scale = results.get("scale")
    if isinstance(scale, dict):
        points = [
            (v["files"], v["group_uss_mb"])
            for k, v in scale.items()
            if k.startswith("files") and isinstance(v, dict) and "group_uss_mb" in v
        ]
        if points:
            files.plot(*zip(*points, strict=True), "s", label="scale suite")
    files.set_xlabel("live files (one process each)")
    files.set_ylabel("service USS, MB")
    files.set_title(f"memory: {m['uss_mb_per_file']} MB per live file")
    files.legend(loc="upper left")

    con = [p for p in cost["memory_connections"] if p["gateway_uss_mb"] is not None]
    conns.plot([p["connections"] for p in con], [p["gateway_uss_mb"] for p in con], "o-")
    conns.set_xlabel("idle client connections")
    conns.set_ylabel("gateway USS, MB")
    conns.set_title(f"memory: {m['uss_kb_per_connection']} KB per connection")
    conns.set_ylim(bottom=0)

    for axes in (cycles, appends, files, conns):
        axes.grid(True, alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    load = meta.get("loadavg_at_start", [None])[0]
    figure.suptitle(
        f"sessionlane cost model: {meta.get('cpus', '?')} CPUs, Python {meta.get('python', '?')},"
        f" load average {load} at start ({meta.get('started', '')})"
    )
    figure.tight_layout()
    svg = str(path).endswith(".svg")
    # Text stays text in an SVG (smaller, searchable); no date, so a redraw diffs cleanly.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "sessionlane"}):
        figure.savefig(str(path), metadata={"Date": None} if svg else None)
    return True
