"""``stop`` and ``status`` as an operator meets them: idempotent, cleaning up, and explaining
a service that belongs to another user instead of calling it "not running".

Real ``serve`` subprocesses (``tests/test_serve.py``'s ``Serve``); the other user is a forked
child that became uid 65534 (root only), running the command line in-process.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ports import listen_port
from test_cli import dead_state
from test_serve import STOP_TIMEOUT_S, Serve, sessionlane_command
from waiting import eventually

from sessionlane.system.ops import cli

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(120)]

STRANGER = 65534


@pytest.fixture
def serve(tmp_path: Path, root: Path) -> Iterator[Serve]:
    listen = f"tcp://127.0.0.1:{listen_port()}"
    started = Serve(
        tmp_path, "--root", str(root), "--listen", listen, "--log-file", str(tmp_path / "a.log")
    )
    try:
        started.wait_ready()
        yield started
    finally:
        started.kill()


def test_stop_stops_the_one_live_service_beside_stale_state_files_and_cleans_them(
    serve: Serve,
) -> None:
    stale = [
        dead_state(serve.run_dir, f"tcp://127.0.0.1:{listen_port()}"),
        dead_state(serve.run_dir, "unix:///tmp/sl-gone.sock"),
    ]
    result = serve.cli("stop")
    assert result.returncode == 0, result.stderr
    assert f"stopped service pid {serve.proc.pid}" in result.stdout
    assert result.stdout.count("was not running; cleaned up after it") == 2
    assert serve.proc.wait(STOP_TIMEOUT_S) == 0
    assert not any(p.exists() for p in stale)
    assert not list(serve.run_dir.glob("sessionlane-*/serve-*.json"))
    eventually(lambda: not serve.leftovers(), "every process of the service to exit")

    again = serve.cli("stop")  # idempotent
    assert again.returncode == 0, again.stderr
    assert "no service of this user is running; nothing to stop" in again.stdout


def as_stranger(argv: list[str], env: dict[str, str], seconds: float = 60.0) -> tuple[int, str]:
    """``sessionlane ARGV`` run in a forked child that became uid 65534: (exit status, output)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing of pytest's from here on, only os._exit
        code = 99
        try:
            os.close(read_end)
            os.dup2(write_end, 1)
            os.dup2(write_end, 2)
            # pytest's capture replaced sys.stdout/err: print to the pipe instead.
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            os.setgroups([])
            os.setgid(STRANGER)
            os.setuid(STRANGER)
            os.environ.update(env)
            code = cli.main(argv)
        except BaseException as exc:
            os.write(write_end, f"child error: {exc!r}\n".encode())
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    chunks = []
    try:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([read_end], [], [], left)
            if ready:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), b"".join(chunks).decode()
    finally:
        os.close(read_end)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")
def test_another_users_service_is_explained_by_stop_and_status_not_called_not_running(
    serve: Serve, tmp_path: Path
) -> None:
    theirs = Path(tempfile.mkdtemp(prefix="sl-stranger-", dir="/tmp"))  # theirs to reach
    theirs.chmod(0o777)
    env = {"XDG_RUNTIME_DIR": str(theirs), "SESSIONLANE_LISTEN": serve.address}
    # The stranger cannot see root's processes: it names the user, and how to ask, if that
    # is the service meant.
    expected = (
        f"sessionlane: {serve.address} is held by a process of user root (this user may not"
        " see which), not by this user: if it is the sessionlane service you meant, run as"
        " root: `sudo -u root sessionlane"
    )
    for argv in (["stop"], ["stop", "--listen", serve.address], ["status"]):
        status, output = as_stranger(argv, env)
        assert status == 1, (argv, output)
        assert expected in output, (argv, output)
        assert "not running" not in output, output
        assert f"sessionlane {argv[0]} --listen {serve.address}`" in output, output
    # status was refused by the client's own check of the service: that refusal comes first.
    status, output = as_stranger(["status", "--listen", serve.address], env)
    assert status == 1 and output.index("sessionlane: ") < output.index(expected), output
    assert serve.proc.poll() is None, "still running: the stranger stopped nothing"
    assert json.loads(serve.cli("status", "--json").stdout) == []
    shutil.rmtree(theirs, ignore_errors=True)


def test_doctor_calls_the_address_of_this_users_running_service_served_not_a_problem(
    serve: Serve,
) -> None:
    doctor = subprocess.run(
        [*sessionlane_command(), "doctor", "--json", "--root", str(serve.state["roots"][0])],
        capture_output=True,
        text=True,
        timeout=60,
        env={**serve.env, "SESSIONLANE_LISTEN": serve.address},
    )
    findings = [f for f in json.loads(doctor.stdout)["findings"] if f["check"] == "port"]
    assert [(f["problem"], f["detail"]) for f in findings] == [
        (
            False,
            f"{serve.address} (listen) is served by this user's sessionlane pid {serve.proc.pid}",
        )
    ], doctor.stdout
