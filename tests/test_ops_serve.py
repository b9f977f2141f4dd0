"""Operating ``sessionlane serve``: where it logs, no zombie child, its metrics endpoint.

Real ``serve`` subprocesses (the ``Serve`` helper of ``test_serve``: own session, SIGTERM
then a group SIGKILL at teardown), each with private state and runtime directories.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from ports import listen_port
from prometheus_client.parser import text_string_to_metric_families
from test_serve import Serve, sessionlane_command, start
from waiting import eventually

from sessionlane.actors import procfs
from sessionlane.system.runtime import launch

__all__ = ["start"]  # the fixture, imported for pytest to find

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(180)]

WAIT_S = 30.0


def not_under_systemd(state: Path) -> dict[str, str]:
    """Environment for a serve that logs to its default file under ``state``."""
    return {"XDG_STATE_HOME": str(state), "INVOCATION_ID": "", "JOURNAL_STREAM": ""}


def logging_line(serve: Serve) -> str:
    found = re.search(r"sessionlane: logging to (.+)", serve.text)
    assert found, serve.text
    return found.group(1).strip()


def serve_logs(state: Path) -> list[str]:
    return sorted(p.name for p in (state / "sessionlane").glob("serve-*.log*"))


def children_states(pid: int) -> list[str]:
    """``pid state`` of every child of ``pid`` (a ``Z`` is a zombie nobody reaped)."""
    found = []
    for entry in os.listdir("/proc"):
        stat_ = procfs.stat(int(entry)) if entry.isdigit() else None
        if stat_ is not None and stat_.ppid == pid:
            found.append(f"{entry} {stat_.state}")
    return found


def test_serve_logs_to_one_file_per_address_in_the_private_state_directory_across_starts(
    start: Callable[..., Serve], root: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    port = listen_port()
    expected = state / "sessionlane" / f"serve-tcp-127.0.0.1-{port}.log"
    for start_no in (1, 2):
        serve = start("--root", str(root), "--listen", f"tcp://127.0.0.1:{port}",
                      env=not_under_systemd(state))  # fmt: skip
        serve.wait_ready()
        assert logging_line(serve) == str(expected)
        eventually(
            lambda: expected.exists() and "gateway listening" in expected.read_text(),
            "the gateway's line in the log file",
            timeout=WAIT_S,
        )
        assert serve.terminate() == 0
        assert expected.read_text().count("gateway listening") == start_no
    assert serve_logs(state) == [expected.name]
    assert stat.S_IMODE((state / "sessionlane").stat().st_mode) == 0o700


def test_a_start_that_fails_leaves_no_log_file_behind(root: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, **not_under_systemd(state), "XDG_RUNTIME_DIR": str(tmp_path)}
        done = subprocess.run(
            [*sessionlane_command(), "serve", "--root", str(root),
             "--listen", f"tcp://127.0.0.1:{port}"],
            capture_output=True, text=True, env=env, timeout=120, start_new_session=True,
        )  # fmt: skip
    assert done.returncode == 2, done
    assert "cannot start" in done.stderr
    assert serve_logs(state) == []


def test_under_systemd_serve_logs_to_stderr_and_writes_no_file(
    start: Callable[..., Serve], root: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    env = {**not_under_systemd(state), "INVOCATION_ID": "0123456789abcdef"}
    serve = start("--root", str(root), "--listen", f"tcp://127.0.0.1:{listen_port()}", env=env)
    serve.wait_ready()
    assert logging_line(serve) == "stderr"
    eventually(
        lambda: "INFO sessionlane.system.gateway.gateway: gateway listening" in serve.text,
        "a log line",
        timeout=WAIT_S,
    )
    assert serve_logs(state) == []


def test_a_running_serve_keeps_no_zombie_child_even_after_its_actor_system_restarts(
    start: Callable[..., Serve], root: Path, tmp_path: Path
) -> None:
    serve = start("--root", str(root), "--listen", f"tcp://127.0.0.1:{listen_port()}",
                  "--log-file", str(tmp_path / "a.log"))  # fmt: skip
    first = serve.wait_ready()
    assert not [c for c in children_states(serve.proc.pid) if c.endswith(" Z")]
    admin = launch._admin_pid(first["admin_port"])
    assert admin is not None
    os.kill(admin, signal.SIGKILL)
    state_file = next(serve.run_dir.glob("sessionlane-*/serve-*.json"))
    eventually(
        lambda: f'"pgid": {first["pgid"]},' not in state_file.read_text(),
        "the supervisor to restart the actor system",
        timeout=WAIT_S,
    )
    serve.state["pgid"] = first["pgid"]  # the teardown's backstop covers both groups
    assert not [c for c in children_states(serve.proc.pid) if c.endswith(" Z")]
    assert serve.terminate() == 0


def test_serve_with_metrics_prints_the_url_and_answers_a_scrape(
    start: Callable[..., Serve], root: Path, tmp_path: Path
) -> None:
    serve = start("--root", str(root), "--listen", f"tcp://127.0.0.1:{listen_port()}",
                  "--log-file", str(tmp_path / "a.log"), "--metrics", "127.0.0.1:0")  # fmt: skip
    serve.wait_ready()
    found = re.search(r"sessionlane: metrics at (http://127\.0\.0\.1:\d+/metrics)", serve.text)
    assert found, serve.text
    with urllib.request.urlopen(found.group(1), timeout=WAIT_S) as reply:
        text = reply.read().decode()
    samples = {
        s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
    }
    assert samples["sessionlane_up"] == 1
    assert samples["sessionlane_live_files"] == 0
    assert serve.terminate() == 0
    # The endpoint closed its gateway connection before the service went: no warning about it.
    assert "connection closed by the service" not in serve.text, serve.text
