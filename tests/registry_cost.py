"""The Registry's CPU per new file, and a new file's first append, with many files live.

Usage: ``python tests/registry_cost.py LIVE NEW [off]`` (with the ``python`` of the install to
measure). An embedded service; one client opens ``LIVE`` files (a lane-less append each), then
``NEW`` more, one after the other; prints one JSON line: the Registry process's CPU (utime +
stime from ``/proc``) over the ``NEW`` files divided by them, and the p50 and min of their
appends' wall time (a first contact, the file's activation, the append). ``off``: thespian's
idle connections are not bounded (``sessionlane.system.runtime.idle_sockets`` left out), for a
before/after pair in one install (docs/activation.md, "Idle connections"). Not a test.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sessionlane.actors import procfs
from sessionlane.system.client import connect
from sessionlane.system.runtime import idle_sockets
from sessionlane.system.runtime.service import embedded_service

REGISTRY_TITLE = "sessionlane: registry"


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    live, new = int(sys.argv[1]), int(sys.argv[2])
    if sys.argv[3:] == ["off"]:
        idle_sockets._installed = True  # install() then leaves thespian as it is
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory) / "root"
        root.mkdir()
        settings = {"max_files": live + new + 16, "idle_ms": 3_600_000}
        with embedded_service([str(root)], log_file=Path(directory) / "svc.log", **settings) as svc:
            assert svc.running is not None
            with connect(svc.address) as sl:
                lane = sl.lane("probe")
                for n in range(live):
                    lane.append(str(root / f"live{n}.jsonl"), {"n": n})
                titles = {p: procfs.command_line(p) for p in svc.running.system.members()}
                (registry,) = [p for p, t in titles.items() if t.startswith(REGISTRY_TITLE)]
                before = cpu_s(registry)
                took = []
                for n in range(new):
                    began = time.monotonic()
                    lane.append(str(root / f"new{n}.jsonl"), {"n": n})
                    took.append((time.monotonic() - began) * 1000)
                spent = cpu_s(registry) - before
    print(
        json.dumps(
            {
                "live": live,
                "new": new,
                "bounded": sys.argv[3:] != ["off"],
                "registry_cpu_ms_per_new_file": round(spent * 1000 / new, 2),
                "first_append_ms_p50": round(statistics.median(took), 2),
                "first_append_ms_min": round(min(took), 2),
                "loadavg": os.getloadavg()[0],
            }
        )
    )


if __name__ == "__main__":
    main()
