"""``sessionlane serve`` as a real subprocess, used by client processes, stopped for good.

Every serve runs in its own session (``start_new_session``); teardown sends SIGTERM, waits a
bounded time, then SIGKILLs the serve's group and the actor system's group (its ``pgid`` is in
the serve's state file) as a backstop. Client processes run ``CLIENT`` through
``sessionlane.system.client`` and report each step as a JSON line; the test orders them through the
service's own queue (``status``), never with sleeps.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ports import listen_port
from processes import run_in_session
from waiting import eventually

from sessionlane.actors import procfs
from sessionlane.system.client import connect
from sessionlane.system.config import NON_CONFIG_ENV

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(120)]

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
LINE_TIMEOUT_S = 30.0

CLIENT = """
import json, sys
from sessionlane.system.client import connect

address, path, lane, count, mode = sys.argv[1:6]
with connect(address) as sl:
    with sl.lane(lane).lease(path, purpose="prompt", wait_timeout=60) as lease:
        print(json.dumps({"step": "granted", "fence": lease.fence}), flush=True)
        for seq in range(int(count)):
            lease.append({"lane": lane, "seq": seq, "fence": lease.fence})
        print(json.dumps({"step": "appended", "records": int(count)}), flush=True)
        if mode == "hold":
            sys.stdin.readline()  # hold the lease until told to go on (or killed)
print(json.dumps({"step": "released"}), flush=True)
"""


def sessionlane_command() -> list[str]:
    script = Path(sys.executable).with_name("sessionlane")
    return (
        [str(script)] if script.exists() else [sys.executable, "-m", "sessionlane.system.ops.cli"]
    )


def clean_env(run_dir: Path) -> dict[str, str]:
    """This environment minus config overrides; state files in a directory of the test's own."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SESSIONLANE_") or k in NON_CONFIG_ENV
    }
    env.pop("SESSIONLANE_CONFIG", None)
    env["XDG_RUNTIME_DIR"] = str(run_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def live_pids(pgid: int) -> list[int]:
    """Live (non-zombie) members of process group ``pgid``."""
    return [pid for pid, st in procfs.all_stats().items() if st.pgrp == pgid and st.live]


def is_alive(pid: int) -> bool:
    st = procfs.stat(pid)
    return st is not None and st.live


def _limit_nofile(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


class Serve:
    """One ``sessionlane serve`` subprocess, in its own session.

    ``nofile``: the open-file limit (soft and hard) it runs under, as ``ulimit -n`` would set
    it; None keeps this process's."""

    def __init__(
        self, tmp: Path, *args: str, env: dict[str, str] | None = None, nofile: int | None = None
    ) -> None:
        self.run_dir = tmp / "run"
        self.run_dir.mkdir(exist_ok=True)
        self.output = tmp / f"serve-{time.monotonic_ns()}.out"
        self.env = {**clean_env(self.run_dir), **(env or {})}
        with self.output.open("wb") as out:
            # Output to a file, not a pipe: thespian's forked processes inherit it.
            self.proc = subprocess.Popen(
                [*sessionlane_command(), "serve", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
                preexec_fn=None if nofile is None else functools.partial(_limit_nofile, nofile),
            )
        self.state: dict[str, Any] = {}

    @property
    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_ready(self) -> dict[str, Any]:
        """Wait for the ``serving`` line; return the state file's contents."""
        eventually(
            lambda: "sessionlane serving" in self.text or self.proc.poll() is not None,
            "sessionlane serve to start",
            timeout=READY_TIMEOUT_S,
        )
        assert self.proc.poll() is None, f"serve exited {self.proc.returncode}:\n{self.text}"
        files = list(self.run_dir.glob("sessionlane-*/serve-*.json"))
        assert len(files) == 1, files
        self.state = json.loads(files[0].read_text())
        assert self.state["pid"] == self.proc.pid
        return self.state

    @property
    def address(self) -> str:
        address: str = self.state["addresses"][0]
        return address

    def groups(self) -> list[int]:
        return [self.proc.pid] + ([self.state["pgid"]] if self.state.get("pgid") else [])

    def leftovers(self) -> list[int]:
        """Live processes of this service: serve itself, its group, its actor group."""
        left = {pid for pgid in self.groups() for pid in live_pids(pgid)}
        if is_alive(self.proc.pid) and self.proc.poll() is None:
            left.add(self.proc.pid)
        return sorted(left)

    def terminate(self) -> int:
        """SIGTERM, then wait (bounded) for serve to exit; its return code."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(STOP_TIMEOUT_S)

    def kill(self) -> None:
        """The backstop: SIGTERM, bounded wait, SIGKILL both groups."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_TIMEOUT_S)
        for pgid in self.groups():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run another ``sessionlane`` command against this service (same state dir)."""
        return run_in_session([*sessionlane_command(), *args], env=self.env, timeout=timeout)


class Client:
    """A client process running ``CLIENT``; its JSON lines arrive on a queue."""

    def __init__(self, address: str, path: Path, lane: str, count: int, mode: str = "run"):
        self.lane = lane
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT, address, str(path), lane, str(count), mode],
            stdout=subprocess.PIPE,
            stdin=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def expect(self, step: str, timeout: float = LINE_TIMEOUT_S) -> dict[str, Any]:
        line = self.lines.get(timeout=timeout)
        assert line is not None, f"{self.lane} exited ({self.proc.wait(5)}) before {step}"
        assert line["step"] == step, line
        return line

    def finish(self) -> int:
        return self.proc.wait(LINE_TIMEOUT_S)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    """``start(*serve_args, env=...)``: a serve subprocess, always killed at teardown."""
    started: list[Serve] = []

    def make(*args: str, env: dict[str, str] | None = None) -> Serve:
        serve = Serve(tmp_path, *args, env=env)
        started.append(serve)
        return serve

    yield make
    for serve in started:
        serve.kill()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        client.kill()


def tcp_serve(start: Callable[..., Serve], root: Path, tmp_path: Path) -> Serve:
    listen = f"tcp://127.0.0.1:{listen_port()}"
    serve = start("--root", str(root), "--listen", listen, "--log-file", str(tmp_path / "a.log"))
    serve.wait_ready()
    assert serve.address == listen
    return serve


def queued_lanes(sl: Any, path: Path) -> list[str]:
    files = sl.status(str(path)).files
    return [q.lane for q in files[0].queue] if files else []


def turns(path: Path) -> list[tuple[str, int, list[int]]]:
    """The file as turns: ``(lane, fence, seqs)`` for each run of consecutive records."""
    runs: list[tuple[str, int, list[int]]] = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if runs and runs[-1][0] == record["lane"] and runs[-1][1] == record["fence"]:
            runs[-1][2].append(record["seq"])
        else:
            runs.append((record["lane"], record["fence"], [record["seq"]]))
    return runs


# What must show --------------------------------------------------------------------------------


def test_two_client_processes_contend_in_fifo_order_a_killed_holder_hands_over_and_sigterm_leaves_nothing(  # noqa: E501
    start: Callable[..., Serve],
    clients: list[Client],
    root: Path,
    tmp_path: Path,
) -> None:
    serve = tcp_serve(start, root, tmp_path)
    path = root / "shared.jsonl"
    count = 20

    with connect(serve.address) as sl:
        # The test holds the file first, so both clients queue, in a known order.
        gate = sl.lane("gate").acquire(str(path))
        assert gate is not None
        first = Client(serve.address, path, "lane-a", count)
        clients.append(first)
        eventually(lambda: queued_lanes(sl, path) == ["lane-a"], "lane-a to queue", timeout=30)
        second = Client(serve.address, path, "lane-b", count)
        clients.append(second)
        eventually(
            lambda: queued_lanes(sl, path) == ["lane-a", "lane-b"], "lane-b to queue", timeout=30
        )
        gate.release()

        fences = [first.expect("granted")["fence"], second.expect("granted")["fence"]]
        assert first.finish() == 0 and second.finish() == 0
        assert gate.fence < fences[0] < fences[1], "fences increase in grant (FIFO) order"
        assert turns(path) == [
            ("lane-a", fences[0], list(range(count))),
            ("lane-b", fences[1], list(range(count))),
        ], "both turns, whole, first come first served"

        # A holder SIGKILLed mid-turn: the waiter is granted within a few seconds.
        holder = Client(serve.address, path, "lane-c", 3, mode="hold")
        clients.append(holder)
        held = holder.expect("granted")["fence"]
        holder.expect("appended")
        waiter = Client(serve.address, path, "lane-d", 3)
        clients.append(waiter)
        eventually(lambda: queued_lanes(sl, path) == ["lane-d"], "lane-d to queue", timeout=30)
        killed_at = time.monotonic()
        os.kill(holder.proc.pid, signal.SIGKILL)
        granted = waiter.expect("granted", timeout=10)
        handover = time.monotonic() - killed_at
        print(f"SIGKILLed holder: next waiter granted after {handover * 1000:.0f} ms")
        assert handover < 3.0
        assert granted["fence"] > held
        assert waiter.finish() == 0
        assert turns(path)[2:] == [
            ("lane-c", held, [0, 1, 2]),
            ("lane-d", granted["fence"], [0, 1, 2]),
        ]

    # SIGTERM: serve stops every process it started.
    actor_pgid = serve.state["pgid"]
    assert live_pids(actor_pgid), "the actor system ran in its own group"
    assert serve.terminate() == 0
    eventually(lambda: not serve.leftovers(), "every process of the service to exit", timeout=10)
    assert not live_pids(actor_pgid)
    assert "sessionlane stopped" in serve.text


# The CLI around it ------------------------------------------------------------------------------


def test_status_json_shows_the_holder_and_stop_stops_the_service(
    start: Callable[..., Serve], root: Path, tmp_path: Path
) -> None:
    serve = tcp_serve(start, root, tmp_path)
    path = root / "s.jsonl"
    with connect(serve.address) as sl:
        lease = sl.lane("agent:main").acquire(str(path), purpose="prompt")
        assert lease is not None
        lease.append({"hello": "status"})

        result = serve.cli("status", "--json", "--listen", serve.address)
        assert result.returncode == 0, result.stderr
        (entry,) = json.loads(result.stdout)
        assert entry["path"] == str(path)
        assert entry["fence"] == lease.fence
        assert entry["holder"]["lane"] == "agent:main"
        assert entry["holder"]["lease"] == lease.id
        assert entry["queue"] == []
        assert entry["counters"]["appends"] == 1

        # Without --listen: the only service running here is found by its state file.
        result = serve.cli("status", str(path), "--json")
        assert result.returncode == 0, result.stderr
        assert [e["path"] for e in json.loads(result.stdout)] == [str(path)]

    result = serve.cli("stop", "--listen", serve.address)
    assert result.returncode == 0, result.stderr
    assert serve.proc.wait(STOP_TIMEOUT_S) == 0
    eventually(lambda: not serve.leftovers(), "every process of the service to exit", timeout=10)
    assert not list(serve.run_dir.glob("sessionlane-*/serve-*.json")), "state file removed"


def test_stop_without_listen_finds_the_one_running_service_and_cleans_after_a_killed_serve(
    start: Callable[..., Serve], root: Path, tmp_path: Path
) -> None:
    serve = tcp_serve(start, root, tmp_path)
    actor_pgid = serve.state["pgid"]
    # The lifeline would end the actor system with serve (tests/test_lifeline.py): take it
    # away first, as a kill of the whole session or an older version would.
    for pid, st in procfs.all_stats().items():
        if st.ppid == serve.proc.pid and st.live:
            os.kill(pid, signal.SIGKILL)
    os.kill(serve.proc.pid, signal.SIGKILL)  # serve cannot clean up after this
    serve.proc.wait(STOP_TIMEOUT_S)
    assert live_pids(actor_pgid), "its actor system is orphaned"

    result = serve.cli("stop")
    assert result.returncode == 0, result.stderr
    eventually(lambda: not live_pids(actor_pgid), "the orphaned actor group to go", timeout=10)


def test_serve_takes_host_port_and_status_and_stop_find_it_under_either_spelling(
    start: Callable[..., Serve], root: Path, tmp_path: Path
) -> None:
    port = listen_port()
    serve = start("--root", str(root), "--listen", f"127.0.0.1:{port}")
    state = serve.wait_ready()
    assert state["listen"] == f"tcp://127.0.0.1:{port}", "stored in its canonical spelling"
    assert serve.address == f"tcp://127.0.0.1:{port}"

    for which in (["--listen", f"127.0.0.1:{port}"], ["--listen", f"tcp://127.0.0.1:{port}"], []):
        result = serve.cli("status", "--json", *which)
        assert result.returncode == 0, (which, result.stderr)
        assert json.loads(result.stdout) == []
    result = serve.cli("status", "--connect", f"127.0.0.1:{port}")
    assert result.returncode == 0, result.stderr
    assert "no active session files" in result.stdout
    assert "status --connect is deprecated; use --listen" in result.stderr

    result = serve.cli("stop", "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 0, result.stderr
    assert serve.proc.wait(STOP_TIMEOUT_S) == 0
    eventually(lambda: not serve.leftovers(), "every process of the service to exit", timeout=10)

    # Stopped: one clear line, exit 1, no traceback.
    result = serve.cli("status", "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"sessionlane: no service answers at tcp://127.0.0.1:{port} (Connection refused)"
    ]


def test_with_two_services_running_bare_status_and_stop_list_both_and_act_on_neither(
    start: Callable[..., Serve], tmp_path: Path
) -> None:
    roots = [tmp_path / "one", tmp_path / "two"]
    listens = [f"tcp://127.0.0.1:{listen_port()}", f"127.0.0.1:{listen_port()}"]
    serves = []
    for root, listen in zip(roots, listens, strict=True):
        root.mkdir()
        serves.append(start("--root", str(root), "--listen", listen))
    first, second = serves
    for serve in serves:
        eventually(
            lambda s=serve: "sessionlane serving" in s.text, "serve", timeout=READY_TIMEOUT_S
        )
    states = list(first.run_dir.glob("sessionlane-*/serve-*.json"))
    assert len(states) == 2, states
    for serve in serves:
        serve.state = next(
            json.loads(p.read_text())
            for p in states
            if json.loads(p.read_text())["pid"] == serve.proc.pid
        )

    for command in ("status", "stop"):
        result = first.cli(command)
        assert result.returncode == 2, (command, result.stderr)
        assert "2 services could be meant; pass --listen ADDR" in result.stderr
        for root, serve in zip(roots, serves, strict=True):
            assert serve.address in result.stderr and str(root) in result.stderr
    assert first.proc.poll() is None and second.proc.poll() is None, "neither was stopped"

    result = first.cli("stop", "--listen", listens[1])
    assert result.returncode == 0, result.stderr
    assert second.proc.wait(STOP_TIMEOUT_S) == 0
    assert first.proc.poll() is None

    # Now exactly one runs: a bare stop can tell which is meant.
    result = first.cli("stop")
    assert result.returncode == 0, result.stderr
    assert first.proc.wait(STOP_TIMEOUT_S) == 0
    for serve in serves:
        eventually(
            lambda s=serve: not s.leftovers(), "every process of the service to exit", timeout=10
        )


@pytest.mark.parametrize(
    "setting, env, config, key",
    [
        ("env", {"SESSIONLANE_MAX_QUEUE": "0"}, None, "max_queue"),
        ("env", {"SESSIONLANE_KEEPALIVE_MS": "soon"}, None, "keepalive_ms"),
        ("file", {}, 'max_hold_ms = "forever"\n', "max_hold_ms"),
        ("file", {}, 'durability = "sometimes"\n', "durability"),
        ("file", {}, "no_such_key = 1\n", "no_such_key"),
        ("no root", {}, None, "roots"),
    ],
)
def test_serve_refuses_a_bad_config_value_with_exit_code_2_naming_the_key(
    start: Callable[..., Serve],
    root: Path,
    tmp_path: Path,
    setting: str,
    env: dict[str, str],
    config: str | None,
    key: str,
) -> None:
    args = ["--listen", f"tcp://127.0.0.1:{listen_port()}"]
    if setting != "no root":
        args += ["--root", str(root)]
    if config is not None:
        (tmp_path / "sessionlane.toml").write_text(config)
        args += ["--config", str(tmp_path / "sessionlane.toml")]
    serve = start(*args, env=env)
    assert serve.proc.wait(READY_TIMEOUT_S) == 2, serve.text
    assert f"config key {key}" in serve.text
    assert "Traceback" not in serve.text


def test_a_wait_timeout_shorter_than_max_hold_is_warned_about(
    start: Callable[..., Serve], root: Path, tmp_path: Path
) -> None:
    env = {"SESSIONLANE_WAIT_TIMEOUT_MS": "1000", "SESSIONLANE_MAX_HOLD_MS": "60000"}
    serve = start("--root", str(root), "--listen", f"tcp://127.0.0.1:{listen_port()}", env=env)
    serve.wait_ready()
    assert "warning: wait_timeout_ms (1000) is shorter than max_hold_ms" in serve.text
    assert serve.terminate() == 0


# Security ---------------------------------------------------------------------------------------


def test_every_listening_socket_of_the_service_is_on_loopback(
    start: Callable[..., Serve], root: Path, tmp_path: Path
) -> None:
    serve = tcp_serve(start, root, tmp_path)
    # With a connection, a Lane and a SessionFile up, every kind of actor is listening.
    with connect(serve.address) as sl, sl.lane("a").lease(str(root / "l.jsonl")) as lease:
        assert lease is not None
        lease.append({"x": 1})
        pids = {serve.proc.pid, *live_pids(serve.proc.pid), *live_pids(serve.state["pgid"])}
        sockets = procfs.listening_tcp()
        listening = {
            sockets[inode] for pid in pids for inode in procfs.socket_inodes(pid) & sockets.keys()
        }
    hosts = {host for host, _ in listening}
    ports = {port for _, port in listening}
    gateway_port = int(serve.address.rpartition(":")[2])
    assert gateway_port in ports and serve.state["admin_port"] in ports, listening
    assert len(ports) >= 5, f"admin, logger?, registry, gateway, lane, file: {listening}"
    assert hosts == {"127.0.0.1"}, f"listening beyond loopback: {sorted(listening)}"
    assert serve.terminate() == 0


def test_a_unix_socket_listener_is_created_0600_and_serves_the_python_client(
    start: Callable[..., Serve], root: Path, tmp_path: Path
) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="sl-", dir="/tmp"))  # short: sun_path is 108 bytes
    try:
        sock = sock_dir / "sl.sock"
        serve = start("--root", str(root), "--listen", f"unix://{sock}")
        serve.wait_ready()
        assert serve.address == f"unix://{sock}"
        mode = os.stat(sock).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        path = root / "u.jsonl"
        with connect(serve.address) as sl, sl.lane("unix").lease(str(path)) as lease:
            assert lease is not None
            assert lease.append({"over": "unix"}).lines == 1
        assert path.read_text() == '{"over":"unix"}\n'
        assert serve.terminate() == 0
        eventually(
            lambda: not serve.leftovers(), "every process of the service to exit", timeout=10
        )
        assert not sock.exists(), "the socket file is removed at stop"
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
