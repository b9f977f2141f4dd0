"""The actor system lives and dies with ``serve``; services that collide are told so.

Real ``sessionlane serve`` subprocesses (each in its own session, with a private
``XDG_RUNTIME_DIR`` shared by the serves of one test, so they see each other's state files),
real ``kill -9``, real clients. Every serve is killed at teardown with its groups as the
backstop (``test_serve.Serve.kill``); waits are bounded polls on what ``/proc`` shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ports import listen_port
from processes import is_file_process
from test_serve import Serve, live_pids
from waiting import eventually

from sessionlane.actors import procfs
from sessionlane.messages.errors import LeaseRevoked, SessionLaneError, Unavailable
from sessionlane.system.client import connect
from sessionlane.system.runtime import launch

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(150)]

GONE_WITHIN_S = 10.0


class Serves:
    """``start(root, ...)``: serve subprocesses sharing one state directory."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.started: list[Serve] = []

    def start(self, *roots: Path, listen: str | None = None, extra: tuple[str, ...] = ()) -> Serve:
        listen = listen or f"tcp://127.0.0.1:{listen_port()}"
        args = [a for r in roots for a in ("--root", str(r))]
        log = self.tmp / f"actors-{len(self.started)}.log"
        serve = Serve(self.tmp, *args, "--listen", listen, "--log-file", str(log), *extra)
        self.started.append(serve)
        return serve

    def ready(self, serve: Serve) -> Serve:
        eventually(
            lambda: "sessionlane serving" in serve.text or serve.proc.poll() is not None,
            "serve to start",
            timeout=30,
        )
        assert serve.proc.poll() is None, f"serve exited {serve.proc.returncode}:\n{serve.text}"
        for path in serve.run_dir.glob("sessionlane-*/serve-*.json"):
            state = json.loads(path.read_text())
            if state["pid"] == serve.proc.pid:
                serve.state = state
                return serve
        raise AssertionError("no state file names the serve")

    def refused(self, serve: Serve) -> str:
        """Wait for ``serve`` to exit; assert it exited 2; its output."""
        assert serve.proc.wait(30) == 2, serve.text
        return serve.text


@pytest.fixture
def serves(tmp_path: Path) -> Iterator[Serves]:
    made = Serves(tmp_path)
    try:
        yield made
    finally:
        for serve in made.started:
            serve.kill()


def watchdogs(parent: int) -> list[int]:
    """The lifeline watchdogs started by ``parent``."""
    found = []
    for pid, stat in procfs.all_stats().items():
        if stat.ppid != parent or not stat.live:
            continue
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as fh:
            if b"_watchdog.py" in fh.read():
                found.append(pid)
    return found


def alive(pid: int) -> bool:
    stat = procfs.stat(pid)
    return stat is not None and stat.live


def test_kill_9_of_serve_ends_its_actor_system_clients_see_leases_lost_and_serve_restarts_at_once(
    serves: Serves, root: Path
) -> None:
    path = root / "s.jsonl"
    first = serves.ready(serves.start(root))
    pgid = first.state["pgid"]
    members = live_pids(pgid)
    assert len(members) >= 4, "admin, logger, registry, gateway"
    [watchdog] = watchdogs(first.proc.pid)
    with connect(first.address, reconnect_for=0.0) as sl:
        lease = sl.lane("holder").acquire(str(path))
        assert lease is not None
        lease.append({"before": "kill"})
        # Counted by title, not by the group's size: the zygote's child forked ahead for the
        # next file comes and goes (tests/processes.py).
        file_actors = [pid for pid in live_pids(pgid) if is_file_process(pid)]
        assert len(file_actors) == 1, "the file's actor"

        killed_at = time.monotonic()
        os.kill(first.proc.pid, signal.SIGKILL)

        eventually(
            lambda: not live_pids(pgid), "every actor process to exit", timeout=GONE_WITHIN_S
        )
        gone_after = time.monotonic() - killed_at
        eventually(
            lambda: lease.revoked is not None, "the holder to see it lost", timeout=GONE_WITHIN_S
        )
        with pytest.raises((LeaseRevoked, Unavailable)):
            lease.append({"after": "kill"})
    eventually(lambda: not alive(watchdog), "the watchdog to exit", timeout=GONE_WITHIN_S)
    print(
        f"\nkill -9 serve: last of {len(members) + 1} actor processes gone after "
        f"{gone_after * 1000:.0f} ms"
    )
    assert "killed its process group" in Path(first.state["log_file"]).read_text()

    second = serves.ready(serves.start(root, listen=first.state["listen"]))
    assert second.address == first.address
    with connect(second.address) as sl, sl.lane("next").lease(str(path)) as again:
        assert again is not None and again.fence > lease.fence
        again.append({"after": "restart"})
    assert second.terminate() == 0


def test_a_process_embedding_an_actor_system_takes_it_along_when_killed(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from sessionlane.system.runtime.launch import start_tcp_system
        system = start_tcp_system(log_file=sys.argv[1])
        print(system.pgid, flush=True)
        sys.stdin.readline()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "a.log")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    pgid = 0
    try:
        assert proc.stdout is not None
        pgid = int(proc.stdout.readline())
        assert live_pids(pgid)
        [watchdog] = watchdogs(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        eventually(
            lambda: not live_pids(pgid), "the embedded system to exit", timeout=GONE_WITHIN_S
        )
        eventually(lambda: not alive(watchdog), "its watchdog to exit", timeout=GONE_WITHIN_S)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if pgid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)


def test_a_clean_stop_disarms_the_watchdog_and_it_exits_with_the_service(
    serves: Serves, root: Path
) -> None:
    serve = serves.ready(serves.start(root))
    [watchdog] = watchdogs(serve.proc.pid)
    assert serve.terminate() == 0
    assert not alive(watchdog)
    assert "killed its process group" not in Path(serve.state["log_file"]).read_text()


def test_leftovers_holding_the_port_make_serve_say_how_to_clean_up(
    serves: Serves, root: Path
) -> None:
    first = serves.ready(serves.start(root))
    pgid = first.state["pgid"]
    for watchdog in watchdogs(first.proc.pid):  # a lifeline lost: the old failure mode
        os.kill(watchdog, signal.SIGKILL)
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    assert live_pids(pgid), "without its lifeline the actor system is orphaned"

    second = serves.start(root, listen=first.state["listen"])
    text = serves.refused(second)
    assert f"sessionlane stop --listen {first.state['listen']}" in text, text
    assert f"pid {first.proc.pid}" in text, text

    result = first.cli("stop", "--listen", first.state["listen"])
    assert result.returncode == 0, result.stderr
    eventually(lambda: not live_pids(pgid), "the leftovers to go", timeout=GONE_WITHIN_S)
    third = serves.ready(serves.start(root, listen=first.state["listen"]))
    assert third.terminate() == 0


# Overlapping roots ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["equal", "nested", "containing"])
def test_serve_on_an_overlapping_root_of_a_live_service_exits_2_naming_it(
    serves: Serves, root: Path, tmp_path: Path, where: str
) -> None:
    inner = root / "team"
    inner.mkdir()
    live_root, new_root = {
        "equal": (root, root),
        "nested": (root, inner),
        "containing": (inner, root),
    }[where]
    live = serves.ready(serves.start(live_root))

    text = serves.refused(serves.start(new_root))

    assert f"pid {live.proc.pid} at {live.address}" in text, text
    assert f"`sessionlane stop --listen {live.state['listen']}`" in text, text
    assert "--allow-overlap" in text
    assert not list(new_root.glob("*.owner")), "nothing was started"


def test_with_allow_overlap_both_run_the_second_is_refused_the_file_naming_the_first_and_doctor_reports_it(  # noqa: E501
    serves: Serves, root: Path
) -> None:
    path = root / "s.jsonl"
    first = serves.ready(serves.start(root))
    second = serves.ready(serves.start(root / ".", extra=("--allow-overlap",)))
    with connect(first.address) as sl, sl.lane("a").lease(str(path)) as lease:
        assert lease is not None
        with connect(second.address) as other:
            try:
                other.lane("b").acquire(str(path), wait_timeout=5.0)
                raise AssertionError("the second service granted a file the first serves")
            except SessionLaneError as exc:
                assert isinstance(exc, Unavailable), exc
                assert f"pid {first.proc.pid}, {first.address}" in exc.detail, exc.detail

    doctor = first.cli("doctor", "--json")
    report: dict[str, Any] = json.loads(doctor.stdout)
    overlaps = [f for f in report["findings"] if "overlapping roots" in f["detail"]]
    assert doctor.returncode == 1 and len(overlaps) == 1, doctor.stdout
    assert sorted(overlaps[0]["data"]["pids"]) == sorted([first.proc.pid, second.proc.pid])


def test_a_stale_state_file_of_a_dead_or_recycled_service_does_not_block_serve(
    serves: Serves, root: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run" / f"sessionlane-{os.getuid()}"
    run.mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale: list[dict[str, Any]] = [
        {"pid": int(dead.stdout), "pid_start": "1"},  # the process is gone
        {"pid": os.getpid(), "pid_start": "1"},  # a live pid, but not the one that wrote it
    ]
    for i, state in enumerate(stale):
        state |= {"listen": f"tcp://127.0.0.1:{9 + i}", "addresses": [], "roots": [str(root)]}
        (run / f"serve-stale{i}.json").write_text(json.dumps(state))

    serve = serves.ready(serves.start(root))
    assert serve.terminate() == 0


def test_after_the_supervisor_restarts_the_actor_system_the_new_one_dies_with_serve_too(
    serves: Serves, root: Path
) -> None:
    serve = serves.ready(serves.start(root))
    old_pgid, port = serve.state["pgid"], serve.state["admin_port"]
    admin = launch._admin_pid(port)
    assert admin is not None
    os.killpg(old_pgid, signal.SIGKILL)  # the whole actor system dies under the supervisor

    def restarted() -> bool:
        serves.ready(serve)  # re-read the state file: serve rewrites it after a restart
        return bool(serve.state["pgid"] != old_pgid and live_pids(serve.state["pgid"]))

    eventually(restarted, "the supervisor to restart the actor system", timeout=30)
    new_pgid = serve.state["pgid"]
    [watchdog] = watchdogs(serve.proc.pid)  # the old system's watchdog is gone
    with connect(serve.address) as sl, sl.lane("a").lease(str(root / "s.jsonl")) as lease:
        assert lease is not None

    os.kill(serve.proc.pid, signal.SIGKILL)

    eventually(
        lambda: not live_pids(new_pgid), "the new actor system to exit", timeout=GONE_WITHIN_S
    )
    eventually(lambda: not alive(watchdog), "its watchdog to exit", timeout=GONE_WITHIN_S)


def test_a_serve_started_right_after_kill_9_on_the_same_root_and_port_comes_up(
    serves: Serves, root: Path
) -> None:
    first = serves.ready(serves.start(root))
    with connect(first.address) as sl, sl.lane("a").lease(str(root / "s.jsonl")) as lease:
        assert lease is not None
        fence = lease.fence
    os.kill(first.proc.pid, signal.SIGKILL)

    second = serves.ready(serves.start(root, listen=first.state["listen"]))  # no wait first

    with connect(second.address) as sl, sl.lane("b").lease(str(root / "s.jsonl")) as lease:
        assert lease is not None and lease.fence > fence
    assert second.terminate() == 0
