"""Append latency through one member's gateway to a file another member owns (and to its own).

Usage: ``python tests/convention_append.py SESSIONLANE_BIN WORKDIR [APPENDS]`` (default 300),
with the ``python`` of the install to measure (its ``sessionlane`` is ``SESSIONLANE_BIN``).
Starts a two-member convention on loopback (leader ``a``, member ``b``, a shared
``cluster_key_file``), then one client of ``a``'s gateway takes a lease on a file under
``b``'s root and appends ``APPENDS`` records one at a time (``remote``), then the same on a
file under ``a``'s own root (``local``). Prints one JSON line: p50 and p99 ms per append and
appends/s for each. Both members are stopped (process groups) whatever happens.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ports import listen_port

TOKEN = "convention-append-token-0123456789"

CLIENT = r"""
import json, sys, time
from sessionlane.system.client import connect
address, token, path, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with connect(address, token=token) as sl:
    lane = sl.lane("bench")
    deadline = time.monotonic() + 60
    while True:  # b may not be in a's table yet
        try:
            lease = lane.acquire(path, wait_timeout=5)
            break
        except Exception as exc:
            assert time.monotonic() < deadline, exc
            time.sleep(0.2)
    for _ in range(20):
        lease.append({"warm": 1})
    took = []
    began = time.monotonic()
    for i in range(n):
        t = time.perf_counter()
        lease.append({"i": i})
        took.append((time.perf_counter() - t) * 1000)
    total = time.monotonic() - began
    lease.release()
took.sort()
print(json.dumps({"p50": took[len(took) // 2], "p99": took[int(len(took) * 0.99)],
                  "per_s": n / total}))
"""


def main(binary: str, work: Path, appends: int) -> None:
    work.mkdir(parents=True, exist_ok=True)
    key, token = work / "cluster.key", work / "token"
    key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    token.write_text(TOKEN)
    key.chmod(0o600)
    token.chmod(0o600)
    procs: list[subprocess.Popen[bytes]] = []

    def serve(name: str, leader: str | None) -> tuple[Path, int]:
        root, run = work / f"root-{name}", work / f"run-{name}"
        root.mkdir(exist_ok=True)
        run.mkdir(exist_ok=True)
        port, config, out = listen_port(), work / f"{name}.toml", work / f"{name}.out"
        config.write_text(
            f'bind_host = "127.0.0.1"\ncluster_key_file = "{key}"\n'
            f'token_file = "{token}"\nlisten = "unix://{work / name}.sock"\n'
        )
        argv = [binary, "serve", "--root", str(root), "--config", str(config)]
        argv += ["--admin-port", str(port), "--log-file", str(work / f"{name}.log")]
        argv += ["--leader", leader] if leader else []
        keep = ("SESSIONLANE_TEST_TAG",)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONLANE_") or k in keep}
        env["XDG_RUNTIME_DIR"] = str(run)
        with out.open("wb") as sink:
            procs.append(
                subprocess.Popen(
                    argv, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            )
        deadline = time.monotonic() + 60
        while b"sessionlane serving" not in out.read_bytes():
            if time.monotonic() > deadline or procs[-1].poll() is not None:
                raise SystemExit(out.read_text())
            time.sleep(0.1)
        return root, port

    try:
        root_a, port_a = serve("a", None)
        root_b, _ = serve("b", f"127.0.0.1:{port_a}")
        result = {}
        for label, root in (("remote", root_b), ("local", root_a)):
            argv = [sys.executable, "-c", CLIENT, f"unix://{work / 'a'}.sock", TOKEN]
            done = subprocess.run(
                [*argv, str(root / "s.jsonl"), str(appends)],
                capture_output=True,
                text=True,
                timeout=300,
                check=True,
            )
            result[label] = json.loads(done.stdout)
        print(json.dumps(result))
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 300)
