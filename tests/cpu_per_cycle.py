"""CPU the service spends per contended lease cycle (acquire, append one record, release).

Usage: ``python tests/cpu_per_cycle.py [CYCLES] [WORKERS] [FILES] [CYCLE]`` (default 300, 2,
``one`` and ``three``), with the ``python`` of the install to measure; prints one JSON line.
``CYCLE`` = ``fused``: the append carries the release (``Lease.append(..., release=True)``,
two requests per cycle instead of three). An embedded
service runs in this process; ``WORKERS`` client processes loop on one file (``FILES`` =
``one``: they contend) or each on its own (``each``: nothing to hand off, as the bench's
``files8``). The figure is the utime + stime of
every process of the service's actor system plus this process, over the measured cycles,
divided by the cycles: CPU time, so less sensitive to a busy machine than a rate. The files'
status counters give the messages thespian delivered to them per cycle and the channel input
they served in their own turn (``docs/channel-loop.md``; absent from older versions: 0). The
clients' figure is each worker's own CPU over its cycles (``os.times``: all its threads), summed
and divided the same way. It imports
the service from ``sessionlane.system`` or, for a version before the one namespace, from
``system``, so the same script measures before and after.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from sessionlane.system.runtime.service import embedded_service
except ImportError:
    # A version before the one namespace, measured for a before/after pair: its layer was
    # top-level then. By name, so no import statement names a layer by its folder.
    embedded_service = importlib.import_module("system.runtime.service").embedded_service

WORKER = """
import os, sys
from sessionlane import connect
address, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
fused = sys.argv[4] == "fused"
with connect(address) as sl:
    lane = sl.lane("w")
    with lane.lease(path, purpose="write") as lease:
        lease.append({"warm": 1})
    sys.stdout.write("ready\\n")
    sys.stdout.flush()
    sys.stdin.readline()
    began = os.times()
    for i in range(n):
        with lane.lease(path, purpose="write", wait_timeout=600) as lease:
            if fused:
                lease.append({"i": i, "text": "x" * 160}, release=True)
            else:
                lease.append({"i": i, "text": "x" * 160})
    ended = os.times()
    # This process's CPU over its cycles (every thread: the caller's and the reader's).
    sys.stdout.write(f"{(ended.user - began.user) + (ended.system - began.system)}\\n")
"""


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime (and of waited-for children) of ``pids``, in seconds."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(f) for f in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def file_counters(address: str, paths: list[str]) -> dict[str, int]:
    """``deliveries`` and ``loop_rounds`` summed over the files' status counters (0 where a
    version has neither: thespian then delivers every channel frame)."""
    from sessionlane import connect

    summed = {"deliveries": 0, "loop_rounds": 0}
    with connect(address) as sl:
        for path in sorted(set(paths)):
            for found in sl.status(path).files:
                for key in summed:
                    summed[key] += int(found.counters.get(key, 0))
    return summed


def main() -> None:
    cycles = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    files = sys.argv[3] if len(sys.argv) > 3 else "one"
    if files not in ("one", "each"):
        raise SystemExit(f"FILES is one or each, not {files!r}")
    cycle = sys.argv[4] if len(sys.argv) > 4 else "three"
    if cycle not in ("three", "fused"):
        raise SystemExit(f"CYCLE is three or fused, not {cycle!r}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        with embedded_service([str(root)], log_file=Path(tmp) / "service.log") as service:
            paths = [
                str(root / ("a.jsonl" if files == "one" else f"a{i}.jsonl")) for i in range(workers)
            ]
            procs = [
                subprocess.Popen(
                    [sys.executable, "-c", WORKER, service.address, path, str(cycles), cycle],
                    cwd=tmp,  # ``-c`` imports from the working directory first: not a checkout
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for path in paths
            ]
            for proc in procs:
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            counted = file_counters(service.address, paths)
            members = service.running.system.members()
            before, mine, began = cpu_seconds(members), os.times(), time.monotonic()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            clients = 0.0
            for proc in procs:
                assert proc.stdout is not None
                clients += float(proc.stdout.readline())
                assert proc.wait(600) == 0
            wall = time.monotonic() - began
            after, now = cpu_seconds(service.running.system.members()), os.times()
            counts = file_counters(service.address, paths)
    own = (now.user - mine.user) + (now.system - mine.system)
    n = cycles * workers
    print(
        json.dumps(
            {
                "cycles": n,
                "files": files,
                "cycle": cycle,
                "service_cpu_ms_per_cycle": round((after - before + own) * 1000 / n, 3),
                "client_cpu_ms_per_cycle": round(clients * 1000 / n, 3),
                "cycles_per_s": round(n / wall, 1),
                # messages thespian delivered to the files, and channel input they served in
                # their own turn (``docs/channel-loop.md``), per cycle
                "deliveries_per_cycle": round(
                    (counts["deliveries"] - counted["deliveries"]) / n, 3
                ),
                "loop_rounds_per_cycle": round(
                    (counts["loop_rounds"] - counted["loop_rounds"]) / n, 3
                ),
                "loadavg": os.getloadavg()[0],
            }
        )
    )


if __name__ == "__main__":
    main()
