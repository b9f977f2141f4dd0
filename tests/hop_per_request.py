"""What the sync client's reader-thread hop costs per request on a direct channel.

Usage: ``python tests/hop_per_request.py [CYCLES] [ROUNDS]`` (default 3000 and 3), with the
``python`` of the install to measure; prints one JSON line per client and round.

One uncontended lane loops fused cycles (acquire, then append one record with
``release=True``: two requests per cycle) on one file over its direct channel, in a child
process, two ways, alternating ``ROUNDS`` times:

- ``sync``: the public sync client (``connect``), whose reader thread reads each reply and
  wakes the caller;
- ``raw``: the same frames on a direct channel opened the same way, but the caller writes
  each request and reads its reply itself (blocking ``recv``, one ``FrameReader``): no
  reader thread, no lock, no ``Event``; the floor a client without the hop could reach.

Each child reports its wall time per cycle and its own CPU per cycle (``os.times``: all its
threads) and its voluntary context switches per cycle (``getrusage``). The service's CPU is
not counted (``tests/cpu_per_cycle.py`` does that). The gap between the two is what the hop,
the lock, the ``Event`` and the rest of the client's bookkeeping cost together.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from sessionlane.system.runtime.service import embedded_service

SYNC = """
import os, resource, sys, time
from sessionlane import connect
address, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with connect(address) as sl:
    lane = sl.lane("w")
    for i in range(50):  # warm: the direct channel opened, caches filled
        with lane.lease(path, purpose="write") as lease:
            lease.append({"warm": i}, release=True)
    began, ru, t0 = os.times(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for i in range(n):
        with lane.lease(path, purpose="write") as lease:
            lease.append({"i": i, "text": "x" * 160}, release=True)
    wall = time.perf_counter() - t0
    ended, ru2 = os.times(), resource.getrusage(resource.RUSAGE_SELF)
cpu = (ended.user - began.user) + (ended.system - began.system)
print(wall, cpu, ru2.ru_nvcsw - ru.ru_nvcsw)
"""

RAW = """
import os, resource, socket, struct, sys, time
import msgpack
from sessionlane.messages.codec import FrameReader
address, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
HEADER = struct.Struct(">I")
kind, _, where = address.partition("://")
host, _, port = where.rpartition(":")
gw = socket.create_connection((host, int(port)))
gw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
frames = {}
def send(sock, message):
    body = msgpack.packb(message, use_bin_type=True)
    sock.sendall(HEADER.pack(len(body)) + body)
def recv(sock):
    reader = frames.setdefault(sock, (FrameReader(1 << 24), []))
    while not reader[1]:
        data = sock.recv(256 * 1024)
        if not data:
            raise SystemExit("closed")
        reader[1].extend(reader[0].feed(data))
    return msgpack.unpackb(reader[1].pop(0), raw=False)
send(gw, {"v": 1, "id": 1, "type": "hello", "client": "raw", "direct": True})
assert recv(gw)["type"] == "welcome"
send(gw, {"v": 1, "id": 2, "type": "direct", "lane": "w", "path": path})
offer = recv(gw)
ch = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
ch.connect("\\0" + offer["address"])
send(ch, {"k": "direct", "v": 1, "ticket": offer["ticket"]})
assert recv(ch)["k"] == "welcome"
rid = 10
def request(message):
    global rid
    rid += 1
    send(ch, {"v": 1, "id": rid, **message})
    while True:
        reply = recv(ch)
        if reply.get("id") == rid and reply["type"] != "queued":
            return reply
def cycle(record, i):
    granted = request({"type": "acquire", "lane": "w", "path": path, "purpose": "write"})
    assert granted["type"] == "granted", granted
    done = request({"type": "append", "lease": granted["lease"], "fence": granted["fence"],
                    "records": [record], "aid": f"aid-{i:012d}", "release": True})
    assert done["type"] == "appended", done
for i in range(50):
    cycle({"warm": i}, i)
began, ru, t0 = os.times(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for i in range(n):
    cycle({"i": i, "text": "x" * 160}, 100 + i)
wall = time.perf_counter() - t0
ended, ru2 = os.times(), resource.getrusage(resource.RUSAGE_SELF)
cpu = (ended.user - began.user) + (ended.system - began.system)
print(wall, cpu, ru2.ru_nvcsw - ru.ru_nvcsw)
"""


def main() -> None:
    cycles = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        with embedded_service([str(root)], log_file=Path(tmp) / "service.log") as service:
            for r in range(rounds):
                for name, code in (("sync", SYNC), ("raw", RAW)):
                    path = str(root / f"{name}{r}.jsonl")
                    out = subprocess.run(
                        [sys.executable, "-c", code, service.address, path, str(cycles)],
                        cwd=tmp,
                        capture_output=True,
                        text=True,
                        timeout=600,
                        check=True,
                    ).stdout.split()
                    wall, cpu, switches = float(out[0]), float(out[1]), int(out[2])
                    print(
                        json.dumps(
                            {
                                "client": name,
                                "round": r,
                                "cycles": cycles,
                                "wall_us_per_cycle": round(wall * 1e6 / cycles, 1),
                                "client_cpu_us_per_cycle": round(cpu * 1e6 / cycles, 1),
                                "voluntary_switches_per_cycle": round(switches / cycles, 2),
                                "loadavg": os.getloadavg()[0],
                            }
                        ),
                        flush=True,
                    )


if __name__ == "__main__":
    main()
