"""CPU the service spends per durable append: one at a time, or pipelined (``docs/pipelining.md``).

Usage, with the ``python`` of the install to measure (run from its tree, or with its
``PYTHONPATH``, to measure another version):

    python tests/append_cost.py lane [FILES] [APPENDS] [WRITERS]   # default 16 300 4
    python tests/append_cost.py pipelined [RECORDS] [WINDOW]       # default 3000 64

``lane``: ``WRITERS`` threads, each with its own connection, loop lane-less appends of one
record round-robin over ``FILES`` files (what ``bench --suite append`` does with processes).
``pipelined``: one lease, ``append_pipelined`` of ``RECORDS`` records with ``WINDOW`` in flight
(the version must have it). Prints one JSON line: the rate and the utime + stime of each
process of the service's actor system (by its title) and of this process, per append: CPU
time, so less sensitive to a busy machine than a rate.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sessionlane.system.client import connect
from sessionlane.system.runtime.service import embedded_service

RECORD = {"type": "message", "role": "assistant", "text": "x" * 160}


def cpu_by_process(pgid: int) -> dict[str, float]:
    """Seconds of CPU of each live process of group ``pgid``, by its title."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            title = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
        except OSError:
            continue
        if int(stat[2]) == pgid:
            name = title.split(" ")[1] if title.startswith("sessionlane:") else title[:40]
            out[name] = out.get(name, 0.0) + (int(stat[11]) + int(stat[12])) / tick
    return out


def measure(kind: str, args: list[int]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "s"
        root.mkdir()
        with embedded_service([str(root)], log_file=Path(tmp) / "log") as svc:
            assert svc.running is not None
            pgid = svc.running.system.pgid
            if kind == "lane":
                files, appends, writers = (args + [16, 300, 4][len(args) :])[:3]
                paths = [str(root / f"f{i}.jsonl") for i in range(files)]
                conns = [connect(svc.address) for _ in range(writers)]
                for path in paths:
                    conns[0].lane("setup").append(path, RECORD)

                def work(i: int) -> None:
                    lane = conns[i].lane(f"w{i}")
                    for k in range(appends):
                        lane.append(paths[(i + k) % files], RECORD)

                before, me, t0 = cpu_by_process(pgid), time.process_time(), time.monotonic()
                threads = [threading.Thread(target=work, args=(i,)) for i in range(writers)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                count = appends * writers
            else:
                records, window = (args + [3000, 64][len(args) :])[:2]
                conns = [connect(svc.address)]
                path = str(root / "piped.jsonl")
                with conns[0].lane("w").lease(path) as lease:
                    assert lease is not None
                    lease.append_pipelined([RECORD] * 100, window=window)  # warm
                    before, me, t0 = cpu_by_process(pgid), time.process_time(), time.monotonic()
                    lease.append_pipelined([RECORD] * records, window=window)
                count = records
            elapsed, mine = time.monotonic() - t0, time.process_time() - me
            after = cpu_by_process(pgid)
            for sl in conns:
                sl.close()
    per = {k: round((v - before.get(k, 0.0)) / count * 1e6) for k, v in after.items()}
    return {
        "kind": kind,
        "appends": count,
        "per_s": round(count / elapsed),
        "service_us_per_append": sum(per.values()),
        "client_us_per_append": round(mine / count * 1e6),
        "by_process_us": {k: v for k, v in per.items() if v > 0},
        "loadavg": os.getloadavg(),
    }


if __name__ == "__main__":
    kind = sys.argv[1] if len(sys.argv) > 1 else "lane"
    if kind not in ("lane", "pipelined"):
        sys.exit(__doc__)
    print(json.dumps(measure(kind, [int(a) for a in sys.argv[2:]])))
