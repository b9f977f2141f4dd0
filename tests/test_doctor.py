"""``sessionlane doctor`` finds what needs attention and says so in its exit status."""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from ports import listen_port

from sessionlane.actors.openclaw_lock import encode_lock_payload, pid_alive
from sessionlane.system.ops import cli, doctor
from sessionlane.system.runtime.launch import PingActor, start_tcp_system


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private state directory, and no process scan: other runs on this machine are theirs."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    # Not the default port: another run's service on this machine may hold it.
    monkeypatch.setenv("SESSIONLANE_LISTEN", f"tcp://127.0.0.1:{listen_port()}")
    monkeypatch.setattr(doctor, "leftover_processes", lambda: [])
    return tmp_path / "run"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = cli.main(["doctor", *argv])
    return status, capsys.readouterr().out


def test_a_clean_root_is_healthy(
    root: Path, isolated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (root / "fine.jsonl").write_bytes(b'{"a":1}\n')
    status, out = run(capsys, "--root", str(root))
    assert status == 0 and out.rstrip().endswith("healthy"), out
    status, out = run(capsys, "--root", str(root), "--json")
    report = json.loads(out)
    assert status == 0 and report["ok"] is True
    assert report["config"]["settings"]["roots"] == [str(root)]


def test_doctor_reports_torn_quarantined_locked_and_stale_state_and_exits_1(
    root: Path, isolated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (root / "fine.jsonl").write_bytes(b'{"a":1}\n')
    nested = root / "agents" / "main"
    nested.mkdir(parents=True)
    (nested / "torn.jsonl").write_bytes(b'{"a":1}\n{"b":')
    (root / "old.jsonl.torn").write_bytes(b'{"x":\n{"y":1,"z\n')
    dead = dead_pid()
    lock = root / "fine.jsonl.lock"
    lock.write_text(encode_lock_payload(dead, int(time.time() * 1000)))
    live_lock = root / "busy.jsonl.lock"
    live_lock.write_text(encode_lock_payload(os.getpid(), int(time.time() * 1000)))
    (root / ".fine.jsonl.0123456789ab.tmp").write_bytes(b"half a compaction")
    (root / ".fine.jsonl.fence").write_bytes(b"not json")
    state = isolated / f"sessionlane-{os.getuid()}" / "serve-0123456789ab.json"
    state.parent.mkdir(mode=0o700)
    state.write_text(json.dumps({"pid": dead, "pgid": dead, "listen": "tcp://127.0.0.1:7420"}))

    status, out = run(capsys, "--root", str(root), "--json")
    assert status == 1
    report = json.loads(out)
    assert report["ok"] is False
    by_check: dict[str, list[dict[str, Any]]] = {}
    for finding in report["findings"]:
        by_check.setdefault(finding["check"], []).append(finding)
    (torn,) = by_check["torn"]
    assert torn["path"] == str(nested / "torn.jsonl") and torn["data"]["torn_bytes"] == 5
    (quarantine,) = by_check["quarantine"]
    assert quarantine["data"] == {"bytes": 16, "tears": 2}
    locks = {f["path"]: f for f in by_check["lock"]}
    assert locks[str(lock)]["problem"] and locks[str(lock)]["data"]["stale_reasons"] == ["dead-pid"]
    assert locks[str(live_lock)]["problem"] is False
    assert [f["path"] for f in by_check["temp"]] == [str(root / ".fine.jsonl.0123456789ab.tmp")]
    assert [f["path"] for f in by_check["fence"]] == [str(root / ".fine.jsonl.fence")]
    (stale,) = by_check["state"]
    assert stale["problem"] and stale["path"] == str(state)

    status, out = run(capsys, "--root", str(root))
    assert status == 1
    assert "torn last line, 5 bytes" in out and "dead-pid" in out and "stale" in out
    assert out.rstrip().endswith("6 problems found"), out


def test_an_invalid_config_is_a_problem(
    tmp_path: Path, isolated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("max_hold_ms = -1\n")
    status, out = run(capsys, "--config", str(config), "--json")
    report = json.loads(out)
    assert status == 1 and "max_hold_ms" in report["config"]["error"]


@pytest.mark.tcp
def test_doctor_finds_the_actor_processes_of_a_system_whose_admin_died(tmp_path: Path) -> None:
    system = start_tcp_system(log_file=tmp_path / "actors.log")
    try:
        actors = [system.asys.createActor(PingActor) for _ in range(2)]
        pids = {system.asys.ask(a, "pid?", 10)[2] for a in actors}
        assert all(g["pgid"] != system.pgid for g in doctor.leftover_processes()), "admin alive"
        os.kill(system.admin_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        found: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not found:
            found = [g for g in doctor.leftover_processes() if g["pgid"] == system.pgid]
            time.sleep(0.05)
        (group,) = found
        assert pids <= set(group["pids"]) and system.admin_pid not in group["pids"]
        assert group["ports"], group  # each member still listens on its own port
    finally:
        os.killpg(system.pgid, signal.SIGKILL)
        system.stop()


def test_doctor_names_the_process_holding_the_port_serve_wants_and_exits_1(
    root: Path, isolated: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        monkeypatch.setenv("SESSIONLANE_LISTEN", f"127.0.0.1:{port}")
        status, out = run(capsys, "--root", str(root), "--json")
        status_text, text = run(capsys, "--root", str(root))
    assert status == 1 and status_text == 1, out
    (finding,) = [f for f in json.loads(out)["findings"] if f["check"] == "port"]
    me = pwd.getpwuid(os.getuid()).pw_name
    (holder,) = finding["data"]["holders"]
    assert finding["problem"] and holder["pid"] == os.getpid() and holder["user"] == me
    assert f"PROBLEM: tcp://127.0.0.1:{port} (listen), which serve wants, is held by pid" in text
    assert f"pid {os.getpid()} (user {me}" in text
