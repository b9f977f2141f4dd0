"""How long a caller waits on a stopped service while its client rides the loss out: the figures
of docs/restarts.md ("Budgets and windows, before and after").

    python tests/ride_out_budgets.py [--node DIST]

1. Python, ``reconnect_for=60``: a lease is held, the service stops, then
   ``acquire(wait_timeout=0.4)`` on another lane (its budget must end it, not the ride-out).
2. Python, ``reconnect_for=3``: a lease is held, the service stops, then ``lease.append``
   (the lease is lost after one window).
3. With ``--node DIST`` (the built package's ``dist``): the OpenClaw drop-in's
   ``acquireSessionWriteLock({timeoutMs: 400})`` against a loopback port nothing listens on.

Not a test (timings, on whatever machine): a measurement, with the load printed beside it.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from sessionlane import connect
from sessionlane.messages.errors import SessionLaneError
from sessionlane.system.runtime.service import embedded_service

NODE_SCRIPT = """
import net from 'node:net';
import { once } from 'node:events';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
const { createSessionWriteLocks } = await import(`${process.argv[1]}/openclaw.mjs`);
const server = net.createServer(); server.listen(0, '127.0.0.1'); await once(server, 'listening');
const port = server.address().port; server.close(); await once(server, 'close');
const locks = createSessionWriteLocks({ address: `tcp://127.0.0.1:${port}` });
const started = Date.now();
try {
  const dir = mkdtempSync(`${tmpdir()}/sl-budget-`);
  await locks.acquireSessionWriteLock({ sessionFile: `${dir}/a.jsonl`, timeoutMs: 400 });
} catch (err) {
  console.log(`${err.name} after ${Date.now() - started} ms`);
}
await locks.close();
"""


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def acquire_during_ride_out() -> str:
    with tempfile.TemporaryDirectory() as root:
        path = str(Path(root) / "a.jsonl")
        with embedded_service([root]) as service:
            sl = connect(service.address, reconnect_for=60.0)
            sl.lane("holder").acquire(path)
            service.stop()
        started = time.monotonic()
        try:
            sl.lane("late").acquire(path, wait_timeout=0.4)
            outcome = "granted"
        except SessionLaneError as exc:
            outcome = type(exc).__name__
        took = time.monotonic() - started
        sl.close()
    return f"python acquire(wait_timeout=0.4), reconnect_for=60: {outcome} after {took:.2f} s"


def append_after_stop() -> str:
    with tempfile.TemporaryDirectory() as root:
        path = str(Path(root) / "a.jsonl")
        with embedded_service([root]) as service:
            sl = connect(service.address, reconnect_for=3.0)
            lease = sl.lane("holder").acquire(path)
            assert lease is not None
            lease.append({"n": 1})
            service.stop()
            started = time.monotonic()
        try:
            lease.append({"n": 2})
            outcome = "appended"
        except SessionLaneError as exc:
            outcome = f"{type(exc).__name__}({getattr(exc, 'reason', '')})"
        took = time.monotonic() - started
        sl.close()
    return f"python lease.append after the stop, reconnect_for=3: {outcome} after {took:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--node", help="the built Node package's dist directory")
    args = parser.parse_args()
    print(f"{acquire_during_ride_out()} (load {load()})")
    print(f"{append_after_stop()} (load {load()})")
    if args.node:
        dist = str(Path(args.node).resolve())
        done = subprocess.run(
            ["node", "--input-type=module", "-e", NODE_SCRIPT, dist],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        print(
            f"node drop-in acquire(timeoutMs 400), nothing listening: {done.stdout.strip()}"
            f" (load {load()})"
        )


if __name__ == "__main__":
    main()
