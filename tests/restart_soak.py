"""The durability kill test with restarts in the loop: ``sessionlane serve`` is killed with
SIGKILL and started again while writers hold prompt leases and append. Prints one JSON line:
the turns that completed and were interrupted (by the exception that interrupted them), the
acknowledged records, and how many of them are lost or duplicated in the files.

    python tests/restart_soak.py --restarts 6 --writers 4 --grace-ms 10000
    python tests/restart_soak.py --restarts 6 --writers 4 --grace-ms 0   # reclaim off
    PYTHONPATH=/path/to/older/checkout python tests/restart_soak.py --grace-ms -1  # before

Not a pytest test (it runs for a minute); ``docs/restarts.md`` reports its numbers.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from ports import listen_port
from test_serve import Serve

from sessionlane.messages.errors import SessionLaneError
from sessionlane.system.client import connect


def kill_9(serve: Serve) -> None:
    """SIGKILL serve and its actor system, and wait for every process of it to be gone."""
    for pgid in serve.groups():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    serve.proc.wait(10)
    deadline = time.monotonic() + 10
    while serve.leftovers() and time.monotonic() < deadline:
        time.sleep(0.01)


def writer(
    address: str,
    paths: list[Path],
    w: int,
    args: argparse.Namespace,
    stop: threading.Event,
    out: dict[str, Any],
) -> None:
    """Turns until told to stop: a prompt lease, ``--appends`` appends with a think time
    between them (the model call), release. An exception ends the turn as interrupted."""
    acked: list[tuple[int, int, int]] = out["acked"]
    interrupted: collections.Counter[str] = out["interrupted"]
    sl = connect(address, reconnect_for=args.reconnect_for, keepalive=1.0)
    turn = 0
    try:
        while not stop.is_set():
            turn += 1
            path = paths[(w + turn) % len(paths)]
            try:
                with sl.lane(f"writer{w}").lease(
                    str(path), purpose="prompt", wait_timeout=120
                ) as lease:
                    assert lease is not None
                    for i in range(args.appends):
                        lease.append({"w": w, "turn": turn, "i": i})
                        acked.append((w, turn, i))
                        time.sleep(args.think)
                out["completed"] += 1
            except SessionLaneError as exc:
                reason = getattr(exc, "reason", None)
                interrupted[f"{type(exc).__name__}:{reason or exc.code}"] += 1
    finally:
        sl.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--restarts", type=int, default=6)
    parser.add_argument("--every", type=float, default=3.0, help="seconds between kills")
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--files", type=int, default=2)
    parser.add_argument("--appends", type=int, default=5)
    parser.add_argument("--think", type=float, default=0.1)
    parser.add_argument("--grace-ms", type=int, default=10_000)
    parser.add_argument("--reconnect-for", type=float, default=30.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="restart-soak-") as tmp_name:
        tmp = Path(tmp_name)
        root = tmp / "sessions"
        root.mkdir()
        listen = f"tcp://127.0.0.1:{listen_port()}"
        # -1: leave the key unset (a service from before reclaim refuses unknown keys).
        env = {"SESSIONLANE_RECLAIM_GRACE_MS": str(args.grace_ms)} if args.grace_ms >= 0 else {}
        serves: list[Serve] = []

        def start() -> Serve:
            log = str(tmp / f"serve{len(serves)}.log")
            serve = Serve(tmp, "--root", str(root), "--listen", listen, "--log-file", log, env=env)
            serves.append(serve)
            serve.wait_ready()
            return serve

        paths = [root / f"s{n}.jsonl" for n in range(args.files)]
        stop = threading.Event()
        outs = [
            {"acked": [], "interrupted": collections.Counter(), "completed": 0}
            for _ in range(args.writers)
        ]
        try:
            serve = start()
            threads = [
                threading.Thread(target=writer, args=(listen, paths, w, args, stop, outs[w]))
                for w in range(args.writers)
            ]
            for t in threads:
                t.start()
            for _ in range(args.restarts):
                time.sleep(args.every)  # let turns run, then crash the service under them
                kill_9(serve)
                serve = start()
            time.sleep(args.every)
            stop.set()
            for t in threads:
                t.join(180)
        finally:
            stop.set()
            for s in serves:
                s.kill()

        seen: collections.Counter[tuple[int, int, int]] = collections.Counter()
        for path in paths:
            if path.exists():
                for line in path.read_text().splitlines():
                    r = json.loads(line)
                    seen[(r["w"], r["turn"], r["i"])] += 1
        acked = [a for o in outs for a in o["acked"]]
        interrupted: collections.Counter[str] = collections.Counter()
        for o in outs:
            interrupted.update(o["interrupted"])
        print(
            json.dumps(
                {
                    "grace_ms": args.grace_ms,
                    "reconnect_for": args.reconnect_for,
                    "restarts": args.restarts,
                    "writers": args.writers,
                    "turns_completed": sum(o["completed"] for o in outs),
                    "turns_interrupted": sum(interrupted.values()),
                    "interrupted_by": dict(interrupted),
                    "records_acked": len(acked),
                    "acked_lost": sum(1 for a in acked if seen[a] == 0),
                    "duplicated": sum(1 for n in seen.values() if n > 1),
                }
            )
        )


if __name__ == "__main__":
    main()
