"""Which service ``status`` and ``stop`` mean, and how they say so, without a running service.

``sessionlane.system.ops.running.choose`` is the pure decision, tested on made-up state files; the
commands run as real processes against a private state directory (``XDG_RUNTIME_DIR``). The same
commands against real ``serve`` processes are in ``tests/test_serve.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ports import listen_port

from sessionlane.system.ops.running import (
    Found,
    choose,
    found_services,
    is_serve_process,
    plan_stop,
)


def found(listen: str, *, live: bool = True, addresses: list[str] | None = None) -> Found:
    state: dict[str, Any] = {
        "pid": 4242,
        "listen": listen,
        "addresses": addresses if addresses is not None else [listen],
        "roots": ["/data/sessions"],
    }
    return Found(Path(f"/run/serve-{abs(hash(listen))}.json"), state, live)


def sessionlane(
    *args: str, run_dir: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONLANE_")}
    env.update(extra)
    env["XDG_RUNTIME_DIR"] = str(run_dir)
    if "SESSIONLANE_TEST_TAG" in os.environ:
        env["SESSIONLANE_TEST_TAG"] = os.environ["SESSIONLANE_TEST_TAG"]
    return subprocess.run(
        [sys.executable, "-m", "sessionlane", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def dead_state(run_dir: Path, listen: str) -> Path:
    """A state file whose serve is gone (pid 0 never names a process)."""
    directory = run_dir / f"sessionlane-{os.getuid()}"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"serve-{abs(hash(listen))}.json"
    path.write_text(json.dumps({"pid": 0, "listen": listen, "addresses": [listen], "roots": []}))
    return path


# The decision ---------------------------------------------------------------------------------


def test_the_one_running_service_is_chosen_when_no_address_is_named() -> None:
    only = found("tcp://127.0.0.1:7421")
    choice = choose([only], None, live_only=True)
    assert choice.kind == "one" and choice.found is only


def test_two_running_services_and_no_address_is_several_never_a_guess() -> None:
    a, b = found("tcp://127.0.0.1:7421"), found("unix:///run/sl.sock")
    choice = choose([a, b], None, live_only=True)
    assert choice.kind == "several" and choice.candidates == (a, b)


def test_a_named_address_matches_whichever_spelling_the_service_was_started_with() -> None:
    a, b = found("tcp://127.0.0.1:7421"), found("tcp://127.0.0.1:7422")
    for spelling in ("127.0.0.1:7422", "tcp://127.0.0.1:7422", " tcp://127.0.0.1:7422"):
        assert choose([a, b], spelling, live_only=False).found is b


def test_a_named_address_matches_the_port_a_service_bound_when_it_asked_for_port_0() -> None:
    zero = found("tcp://127.0.0.1:0", addresses=["tcp://127.0.0.1:40001"])
    assert choose([zero], "127.0.0.1:40001", live_only=True).found is zero
    assert choose([zero], "127.0.0.1:40002", live_only=True).kind == "none"


def test_a_dead_service_counts_for_stop_but_not_for_status() -> None:
    dead = found("tcp://127.0.0.1:7421", live=False)
    assert choose([dead], None, live_only=True).kind == "none"
    assert choose([dead], None, live_only=False).found is dead
    live = found("tcp://127.0.0.1:7422")
    assert choose([dead, live], None, live_only=False).kind == "several"


def test_a_live_and_a_dead_state_file_for_one_address_mean_the_live_one() -> None:
    dead, live = found("tcp://127.0.0.1:7421", live=False), found("127.0.0.1:7421")
    assert choose([dead, live], "tcp://127.0.0.1:7421", live_only=False).found is live


def test_a_pid_that_is_not_a_serve_process_is_not_running() -> None:
    assert not is_serve_process(os.getpid())  # alive, but pytest, not `serve`
    assert not is_serve_process(0)


def test_unreadable_state_files_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "serve-bad.json").write_text("{not json")
    (tmp_path / "serve-list.json").write_text("[1, 2]")
    (tmp_path / "serve-ok.json").write_text(json.dumps({"pid": 0, "listen": "tcp://h:1"}))
    assert [f.listen for f in found_services(tmp_path)] == ["tcp://h:1"]


def test_stop_plans_the_one_live_service_and_every_dead_one_it_names() -> None:
    a = found("tcp://127.0.0.1:1")
    a_dead = found("tcp://127.0.0.1:1", live=False)
    b_dead = found("tcp://127.0.0.1:2", live=False)
    plan = plan_stop([a, a_dead, b_dead], None)
    assert plan.live.kind == "one" and plan.live.found is a
    assert plan.stale == (a_dead, b_dead)
    named = plan_stop([a, a_dead, b_dead], "127.0.0.1:2")
    assert named.live.kind == "none" and named.stale == (b_dead,)


def test_stop_plans_nothing_to_clean_when_it_must_refuse_several_live_services() -> None:
    plan = plan_stop([found("tcp://h:1"), found("tcp://h:2"), found("tcp://h:3", live=False)], None)
    assert plan.live.kind == "several" and len(plan.live.candidates) == 2
    assert plan.stale == ()


# The commands -------------------------------------------------------------------------------


def test_status_of_an_address_where_nothing_listens_prints_one_line_and_exits_1(
    tmp_path: Path,
) -> None:
    port = listen_port()
    for args in (["--listen", f"127.0.0.1:{port}"], ["--connect", f"tcp://127.0.0.1:{port}"]):
        result = sessionlane("status", *args, run_dir=tmp_path)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        complaint = [line for line in result.stderr.splitlines() if "deprecated" not in line]
        assert complaint == [
            f"sessionlane: no service answers at tcp://127.0.0.1:{port} (Connection refused)"
        ]


def test_status_connect_is_a_deprecated_alias_of_listen(tmp_path: Path) -> None:
    result = sessionlane("status", "--connect", f"127.0.0.1:{listen_port()}", run_dir=tmp_path)
    assert "status --connect is deprecated; use --listen" in result.stderr


def test_a_malformed_address_exits_2_naming_the_accepted_forms(tmp_path: Path) -> None:
    for command in ("status", "stop"):
        result = sessionlane(command, "--listen", "localhost", run_dir=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "HOST:PORT, tcp://HOST:PORT or unix:///abs/path" in result.stderr


def test_status_with_nothing_running_says_so_and_exits_1_and_stop_says_so_and_exits_0(
    tmp_path: Path,
) -> None:
    result = sessionlane("status", run_dir=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "no service of this user is running" in result.stderr
    listen = f"tcp://127.0.0.1:{listen_port()}"  # not the default port: another run's may be
    for args in ([], ["--listen", listen]):  # stop is idempotent
        result = sessionlane("stop", *args, run_dir=tmp_path, env={"SESSIONLANE_LISTEN": listen})
        assert result.returncode == 0, result.stderr
        assert "is running; nothing to stop" in result.stdout


def test_stop_with_two_dead_services_cleans_up_after_both(tmp_path: Path) -> None:
    first = dead_state(tmp_path, "tcp://127.0.0.1:7421")
    second = dead_state(tmp_path, "unix:///tmp/sl-test.sock")
    third = dead_state(tmp_path, "tcp://127.0.0.1:7422")
    result = sessionlane("stop", "--listen", "127.0.0.1:7421", run_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not first.exists() and second.exists() and third.exists()

    # Dead services are not a choice to make: a bare stop cleans up after every one.
    result = sessionlane("stop", run_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("was not running; cleaned up after it") == 2
    assert not second.exists() and not third.exists()
