"""The TypeScript package (``clients/node``) against a real ``sessionlane serve``.

``npm test`` in the package (its ``node --test`` suites, ``tsc --noEmit`` on the sources and
on consumer files) runs against a serve subprocess whose address and root it gets from
``NODE_TEST_SESSIONLANE_ADDRESS`` and ``NODE_TEST_SESSIONLANE_ROOT`` (not ``SESSIONLANE_*``:
those are the service's config keys). Separate ``node`` processes contend on one file, present
a token, keep an idle connection alive. Skipped, with the reason, when ``node`` or ``npm`` is
missing or the package's dependencies are not installed (``npm ci`` in ``clients/node``, as
``.ci/run`` does).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nodejs import NODE_DIR, built_node
from processes import run_in_session
from test_serve import Serve, queued_lanes, tcp_serve
from waiting import eventually

from sessionlane.system.client import connect
from sessionlane.system.runtime.service import embedded_service

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(900)]

DEMO_TIMEOUT_S = 60.0
NPM_TEST_TIMEOUT_S = 600.0


@pytest.fixture(scope="module")
def node() -> str:
    """The ``node`` executable, with the package's dependencies installed and built."""
    return built_node("the Node.js client tests")


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    """``start(*serve_args)``: a serve subprocess (see ``test_serve``), always killed."""
    started: list[Serve] = []

    def make(*args: str) -> Serve:
        started.append(Serve(tmp_path, *args))
        return started[-1]

    yield make
    for serve in started:
        serve.kill()


class Demo:
    """One ``node demo.js ADDR PATH LANE N`` process, in its own session."""

    def __init__(self, node: str, address: str, path: Path, lane: str, count: int, **env: str):
        self.lane = lane
        self.proc = subprocess.Popen(
            [node, str(NODE_DIR / "demo.js"), address, str(path), lane, str(count)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **env},
            start_new_session=True,
        )

    def result(self) -> tuple[int, list[dict[str, Any]], str]:
        """Exit code, the JSON lines it printed, its stderr."""
        out, err = self.proc.communicate(timeout=DEMO_TIMEOUT_S)
        return self.proc.returncode, [json.loads(line) for line in out.splitlines()], err

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


@pytest.fixture
def demos() -> Iterator[list[Demo]]:
    made: list[Demo] = []
    yield made
    for demo in made:
        demo.kill()


def runs_by_lane(path: Path) -> list[tuple[str, list[int]]]:
    """The file as runs of consecutive records of one lane: ``(lane, seqs)``."""
    runs: list[tuple[str, list[int]]] = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        assert record["type"] == "demo"
        if runs and runs[-1][0] == record["lane"]:
            runs[-1][1].append(record["seq"])
        else:
            runs.append((record["lane"], [record["seq"]]))
    return runs


def test_the_typescript_package_passes_npm_test_against_a_real_serve(
    node: str, start: Callable[..., Serve], tmp_path: Path
) -> None:
    npm = shutil.which("npm")
    assert npm is not None
    root = tmp_path / "sessions"
    root.mkdir()
    serve = tcp_serve(start, root, tmp_path)
    env = {
        **os.environ,
        "NODE_TEST_SESSIONLANE_ADDRESS": serve.address,
        "NODE_TEST_SESSIONLANE_ROOT": str(root),
    }
    try:
        done = run_in_session(
            # The `node` fixture built the package: no `pretest` rebuild of `dist/` under
            # another worker's node (the whole suite runs on two).
            [npm, "test", "--ignore-scripts"],
            cwd=NODE_DIR,
            env=env,
            merge_stderr=True,
            timeout=NPM_TEST_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as late:
        pytest.fail(f"npm test took over {NPM_TEST_TIMEOUT_S} s:\n{(late.output or '')[-20000:]}")
    out = done.stdout
    assert done.returncode == 0, f"npm test failed:\n{out[-20000:]}"
    totals = {
        key: int(n) for key, n in re.findall(r"^# (pass|fail|skipped|cancelled) (\d+)$", out, re.M)
    }
    assert totals.get("fail") == 0 and totals.get("cancelled") == 0, out[-5000:]
    assert totals.get("skipped") == 0 and "# SKIP" not in out, "every suite ran against the service"
    assert totals.get("pass", 0) >= 30, out[-5000:]
    print(f"npm test: {totals['pass']} node tests passed")
    assert serve.terminate() == 0


def test_two_node_clients_contend_on_one_file_through_a_real_serve(
    node: str,
    start: Callable[..., Serve],
    demos: list[Demo],
    tmp_path: Path,
) -> None:
    root = tmp_path / "sessions"
    root.mkdir()
    serve = tcp_serve(start, root, tmp_path)
    path = root / "node.jsonl"
    count = 15
    with connect(serve.address) as sl:
        gate = sl.lane("gate").acquire(str(path))  # both demos must queue, in a known order
        assert gate is not None
        demos.append(Demo(node, serve.address, path, "node-a", count, SESSIONLANE_DEMO_PINGS="200"))
        eventually(lambda: queued_lanes(sl, path) == ["node-a"], "node-a to queue", timeout=30)
        demos.append(Demo(node, serve.address, path, "node-b", count))
        eventually(
            lambda: queued_lanes(sl, path) == ["node-a", "node-b"], "node-b to queue", timeout=30
        )
        gate.release()

        results = [demo.result() for demo in demos]
    for code, _, err in results:
        assert code == 0, err
    fences = []
    for (_, lines, _), demo in zip(results, demos, strict=True):
        steps = [line["step"] for line in lines if line["step"] != "pinged"]
        assert steps == ["granted"] + ["appended"] * count + ["released"]
        granted = next(line for line in lines if line["step"] == "granted")
        appended = [line for line in lines if line["step"] == "appended"]
        assert [a["seq"] for a in appended] == list(range(count))
        assert {a["fence"] for a in appended} == {granted["fence"]}
        assert [a["offset"] for a in appended] == sorted({a["offset"] for a in appended})
        assert all(line["lane"] == demo.lane for line in lines if "lane" in line)
        fences.append(granted["fence"])
    assert gate.fence < fences[0] < fences[1], "fences increase in the printed (grant) order"
    assert runs_by_lane(path) == [("node-a", list(range(count))), ("node-b", list(range(count)))]

    pinged = next(line for line in results[0][1] if line["step"] == "pinged")
    rtts = [line["rtt_ms"] for _, lines, _ in results for line in lines if "rtt_ms" in line]
    print(
        f"node client: keepalive round trip p50 {pinged['p50_ms']:.2f} ms,"
        f" p99 {pinged['p99_ms']:.2f} ms; durable append p50 {sorted(rtts)[len(rtts) // 2]:.2f} ms"
    )
    assert serve.terminate() == 0


EVENTS_SCRIPT = """
const { connect, LeaseRevoked, SessionLaneError, Unauthorized } = require(process.argv[1]);
const [address, path, token] = process.argv.slice(2);
(async () => {
  const refused = await connect(address, { token: 'wrong' }).then(
    () => null,
    (err) => ({
      code: err.code,
      typed: err instanceof Unauthorized && err instanceof SessionLaneError,
    }),
  );
  const sl = await connect(address, { token });
  const lease = await sl.lane('ev').lease(path, { maxHoldMs: 100 });
  const revoked = await new Promise((resolve) => {
    const { id, path, revoked } = lease;
    if (revoked !== null) resolve({ lease: id, path, reason: revoked });
    lease.on('revoked', resolve);
  });
  const late = await lease.append({ late: true }).then(
    () => null,
    (err) => ({ code: err.code, revoked: err instanceof LeaseRevoked }),
  );
  const signal = { aborted: lease.signal.aborted, reason: lease.signal.reason.name };
  console.log(JSON.stringify({ refused, lease: lease.id, revoked, late, signal }));
  await sl.close();
})().catch((err) => {
  console.error(err);
  process.exit(1);
});
"""


def test_the_node_client_presents_a_token_and_reports_a_max_hold_revocation(
    node: str, tmp_path: Path
) -> None:
    root = tmp_path / "sessions"
    root.mkdir()
    token_file = tmp_path / "token"
    token_file.write_text("node-token-0123456789")
    token_file.chmod(0o600)
    path = root / "events.jsonl"
    with embedded_service(
        [str(root)], log_file=tmp_path / "actors.log", token_file=str(token_file)
    ) as svc:
        index = str(NODE_DIR / "dist" / "index.js")
        done = run_in_session(
            [node, "-e", EVENTS_SCRIPT, index, svc.address, str(path), "node-token-0123456789"],
            timeout=DEMO_TIMEOUT_S,
        )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["refused"] == {"code": "unauthorized", "typed": True}
    assert result["revoked"] == {"lease": result["lease"], "path": str(path), "reason": "max_hold"}
    assert result["late"] == {"code": "revoked", "revoked": True}, "refused before sending"
    assert result["signal"] == {"aborted": True, "reason": "LeaseRevoked"}
    assert not path.exists() or path.read_text() == ""


def test_the_node_client_works_over_a_unix_socket(
    node: str, demos: list[Demo], tmp_path: Path
) -> None:
    root = tmp_path / "sessions"
    root.mkdir()
    sock_dir = Path(tempfile.mkdtemp(prefix="sl-", dir="/tmp"))  # short: sun_path is 108 bytes
    try:
        listen = f"unix://{sock_dir / 'sl.sock'}"
        with embedded_service([str(root)], listen=listen, log_file=tmp_path / "a.log") as svc:
            demo = Demo(node, svc.address, root / "u.jsonl", "node-unix", 3)
            demos.append(demo)
            started = time.monotonic()
            code, lines, err = demo.result()
            assert code == 0, err
            assert lines[-1]["step"] == "released"
            assert time.monotonic() - started < DEMO_TIMEOUT_S
        assert runs_by_lane(root / "u.jsonl") == [("node-unix", [0, 1, 2])]
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


KEEPALIVE_SCRIPT = """
const { connect } = require(process.argv[1]);
const [address, root] = process.argv.slice(2);
(async () => {
  // Kept alive: idle for several of the service's dead-connection windows, still the holder.
  const kept = await connect(address, { keepaliveMs: 100 });
  const lease = await kept.lane('idle').lease(`${root}/kept.jsonl`);
  await new Promise((resolve) => setTimeout(resolve, 3000));
  const holder = (await kept.status(lease.path)).files[0].holder;
  const held = { revoked: lease.revoked, holder: holder && holder.lease === lease.id };
  // The control: the same without keepalives is dropped, and its lease revoked.
  const silent = await connect(address, { keepaliveMs: 0 });
  const dropped = await silent.lane('idle').lease(`${root}/dropped.jsonl`);
  const reason = await new Promise((resolve) => silent.once('close', resolve));
  console.log(JSON.stringify({ held, dropped: { reason, revoked: dropped.revoked } }));
  await kept.close();
})().catch((err) => {
  console.error(err);
  process.exit(1);
});
"""


def test_the_node_client_keeps_an_idle_connection_alive_and_a_silent_one_is_dropped(
    node: str, tmp_path: Path
) -> None:
    root = tmp_path / "sessions"
    root.mkdir()
    with embedded_service([str(root)], log_file=tmp_path / "a.log", keepalive_ms=300) as svc:
        index = str(NODE_DIR / "dist" / "index.js")
        done = run_in_session(
            [node, "-e", KEEPALIVE_SCRIPT, index, svc.address, str(root)], timeout=DEMO_TIMEOUT_S
        )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["held"] == {"revoked": None, "holder": True}
    assert result["dropped"]["reason"].startswith("connection closed by the service")
    assert result["dropped"]["revoked"] == "connection_lost"
