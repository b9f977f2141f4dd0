"""``sessionlane.system.ops.logs``: where a service logs, at which level, rotated."""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from thespian.actors import Actor
from waiting import eventually

from sessionlane.system.client import connect
from sessionlane.system.ops import logs
from sessionlane.system.runtime.launch import log_config, tcp_system
from sessionlane.system.runtime.service import embedded_service

WAIT_S = 30.0


def test_the_log_directory_is_under_xdg_state_home_and_private(tmp_path: Path) -> None:
    found = logs.log_dir({"XDG_STATE_HOME": str(tmp_path / "state")})
    assert found == tmp_path / "state" / "sessionlane"
    assert stat.S_IMODE(found.stat().st_mode) == 0o700


def test_without_xdg_state_home_the_log_directory_is_under_local_state_in_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = tmp_path / ".local" / "state" / "sessionlane"
    assert logs.log_dir({}) == expected
    assert logs.log_dir({"XDG_STATE_HOME": "relative/ignored"}) == expected


def test_one_address_always_gets_the_same_file_and_two_addresses_two_files(
    tmp_path: Path,
) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path)}
    a = logs.log_file_for("tcp://127.0.0.1:7420", env)
    assert a == logs.log_file_for("tcp://127.0.0.1:7420", env)
    assert a.name == "serve-tcp-127.0.0.1-7420.log"
    assert a != logs.log_file_for("tcp://127.0.0.1:7421", env)
    unix = logs.log_file_for("unix:///run/user/1000/sessionlane.sock", env)
    assert unix.name == "serve-unix-run-user-1000-sessionlane.sock.log"
    long_one = logs.log_file_for("unix:///" + "d/" * 100 + "s.sock", env)
    assert len(long_one.name) < 100


@pytest.mark.parametrize(
    ("log_file", "env", "expected"),
    [
        ("-", {}, None),
        (None, {"INVOCATION_ID": "abc"}, None),
        (None, {"JOURNAL_STREAM": "8:1234"}, None),
        ("/var/log/x.log", {"INVOCATION_ID": "abc"}, Path("/var/log/x.log")),
    ],
)
def test_a_dash_or_systemd_sends_the_log_to_stderr_unless_a_file_is_named(
    log_file: str | None, env: dict[str, str], expected: Path | None
) -> None:
    assert logs.log_target(log_file, "tcp://127.0.0.1:7420", env) == expected


def test_with_nothing_named_and_no_service_manager_the_log_is_the_address_file(
    tmp_path: Path,
) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path), "INVOCATION_ID": ""}
    target = logs.log_target(None, "tcp://127.0.0.1:7420", env)
    assert target == logs.log_file_for("tcp://127.0.0.1:7420", env)


def record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "m", None, None)


def test_the_filter_passes_our_records_from_the_level_and_thespian_s_from_warning() -> None:
    keep = logs.LevelFilter("INFO")
    assert not keep.filter(record("sessionlane.actors.session_file", logging.DEBUG))
    assert keep.filter(record("sessionlane.system.gateway.gateway", logging.INFO))
    assert not keep.filter(record("Thespian.ActorManager", logging.INFO))
    assert keep.filter(record("Thespian.ActorManager", logging.WARNING))
    assert logs.LevelFilter("DEBUG").filter(record("sessionlane.actors.registry", logging.DEBUG))
    assert not keep.filter(record("messages", logging.INFO)), "an agent's module of that name"
    with pytest.raises(ValueError, match="unknown log level"):
        logs.LevelFilter("LOUD")


def test_the_file_handler_rotates_and_opens_the_file_only_at_its_first_line(
    tmp_path: Path,
) -> None:
    config = log_config(tmp_path / "x.log", "info")
    handler = config["handlers"]["file"]
    assert handler["()"] == "sessionlane.system.ops.logs.PrivateRotatingFileHandler"
    assert handler["maxBytes"] == logs.MAX_BYTES and handler["backupCount"] == logs.BACKUPS
    assert handler["delay"] is True and handler["level"] == "INFO"
    assert config["filters"]["levels"]["level"] == "INFO"
    assert log_config("-", "INFO")["handlers"]["file"]["stream"] == "ext://sys.stderr"


class ChattyActor(Actor):  # type: ignore[misc]
    """Logs one DEBUG then one INFO line per message, then answers."""

    def receiveMessage(self, message: Any, sender: Any) -> None:
        if isinstance(message, str):
            chat = logging.getLogger("sessionlane.actors.chatty")
            chat.debug("debug-%s", message)
            chat.info("info-%s", message)
            self.send(sender, message)


def wait_for_line(log_file: Path, text: str) -> None:
    """Return once ``text`` is in ``log_file``; fail the test after ``WAIT_S``."""
    eventually(
        lambda: log_file.exists() and text in log_file.read_text(),
        f"{text!r} to reach the log",
        timeout=WAIT_S,
    )


@pytest.mark.tcp
def test_at_info_an_actor_s_debug_line_stays_out_of_the_log_file(tmp_path: Path) -> None:
    log_file = tmp_path / "actors.log"
    with tcp_system(log_file=log_file, log_level="INFO") as system:
        actor = system.asys.createActor(ChattyActor)
        assert system.asys.ask(actor, "marker", 10) == "marker"
        # One actor's records reach the logger in order: once the INFO line is there, the
        # DEBUG line logged before it would be too.
        wait_for_line(log_file, "info-marker")
        assert "debug-marker" not in log_file.read_text()


# Pruning: the log files of other addresses ------------------------------------------------

DAY = 86400.0


def test_beyond_the_newest_logs_and_past_the_age_limit_other_addresses_logs_go_with_rotations() -> (
    None
):
    d = Path("/logs")
    now = 100 * DAY
    files = {
        d / "serve-mine.log": now - 90 * DAY,  # ours: kept however old
        d / "serve-a.log": now - 1 * DAY,
        d / "serve-a.log.1": now - 2 * DAY,
        d / "serve-b.log": now - 2 * DAY,
        d / "serve-c.log": now - 3 * DAY,  # third newest other: beyond keep_logs=2
        d / "serve-c.log.2": now - 4 * DAY,
        d / "serve-old.log": now - 31 * DAY,  # past keep_days
        d / "serve-live.log": now - 60 * DAY,  # a running service's: kept
    }
    stale = logs.stale_logs(
        files, [d / "serve-mine.log", d / "serve-live.log"], now, keep_logs=2, keep_days=30
    )
    assert stale == [d / "serve-c.log", d / "serve-c.log.2", d / "serve-old.log"]


def test_a_log_is_as_young_as_its_newest_rotation() -> None:
    d = Path("/logs")
    now = 100 * DAY
    files = {d / "serve-a.log": now - 40 * DAY, d / "serve-a.log.1": now - 1 * DAY}
    assert logs.stale_logs(files, [], now, keep_days=30) == []


def test_prune_logs_removes_stale_files_only_in_the_directory_and_leaves_other_files(
    tmp_path: Path,
) -> None:
    now = time.time()
    for name, age in [
        ("serve-new.log", 0),
        ("serve-old.log", 40),
        ("serve-old.log.1", 41),
        ("thespian.log", 400),
        ("serve-notes.txt", 400),
    ]:
        path = tmp_path / name
        path.write_text("x\n")
        os.utime(path, (now - age * DAY, now - age * DAY))
    removed = logs.prune_logs([tmp_path / "serve-mine.log"], now, tmp_path)
    assert sorted(p.name for p in removed) == ["serve-old.log", "serve-old.log.1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "serve-new.log",
        "serve-notes.txt",
        "thespian.log",
    ]


def test_the_start_line_is_appended_0600_in_the_actors_format(tmp_path: Path) -> None:
    target = tmp_path / "serve-x.log"
    logs.append_line(target, "sessionlane 0.1.0 starting")
    logs.append_line(target, "again")
    lines = target.read_text().splitlines()
    assert len(lines) == 2 and lines[0].endswith(" INFO sessionlane: sessionlane 0.1.0 starting")
    assert f" p{os.getpid()} " in lines[0]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_forgetting_the_start_line_removes_only_a_file_it_created_that_holds_nothing_else(
    tmp_path: Path,
) -> None:
    fresh = tmp_path / "serve-fresh.log"
    logs.append_line(fresh, "starting")()
    assert not fresh.exists()  # a failed start leaves no file behind

    used = tmp_path / "serve-used.log"
    forget = logs.append_line(used, "starting")
    with used.open("a") as f:
        f.write("an actor's line\n")
    forget()
    assert used.exists()

    old = tmp_path / "serve-old.log"
    old.write_text("yesterday\n")
    logs.append_line(old, "starting")()
    assert old.read_text().startswith("yesterday\n")


@pytest.mark.tcp
def test_connection_churn_is_logged_at_debug(root: Path, tmp_path: Path) -> None:
    log_file = tmp_path / "actors.log"
    with embedded_service([str(root)], log_file=log_file, log_level="DEBUG") as svc:
        with connect(svc.address) as sl:
            sl.lane("churn").append(str(root / "c.jsonl"), {"a": 1})  # a lane: a close to log
        wait_for_line(log_file, " closed (")  # the close
    lines = log_file.read_text().splitlines()
    opened = [line for line in lines if "sessionlane.system.gateway.clients: connection" in line]
    closed = [line for line in lines if " closed (" in line and "lanes released" in line]
    assert opened and closed, lines
    assert all(" DEBUG " in line for line in opened + closed), opened + closed


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """The usual umask (022), under which ``open`` creates files 0644, whatever the runner's."""
    saved = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(saved)


@pytest.mark.usefixtures("usual_umask")
def test_the_log_file_and_every_rotated_one_are_the_owners_only(tmp_path: Path) -> None:
    old = tmp_path / "x.log"
    old.write_text("from before logs were private\n")
    old.chmod(0o644)
    handler = logs.PrivateRotatingFileHandler(old, maxBytes=64, backupCount=2, delay=True)
    try:
        for n in range(10):
            handler.emit(logging.makeLogRecord({"msg": f"line {n:03d} " + "x" * 40}))
    finally:
        handler.close()
    files = sorted(tmp_path.glob("x.log*"))
    assert [f.name for f in files] == ["x.log", "x.log.1", "x.log.2"]
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {logs.FILE_MODE}


@pytest.mark.tcp
@pytest.mark.usefixtures("usual_umask")
def test_a_system_s_log_and_thespian_s_log_beside_it_are_created_0600(tmp_path: Path) -> None:
    log_file = tmp_path / "actors.log"
    with tcp_system(log_file=log_file, log_level="INFO") as system:
        actor = system.asys.createActor(ChattyActor)
        assert system.asys.ask(actor, "marker", 10) == "marker"
        wait_for_line(log_file, "info-marker")
        from thespian.system.utilis import thesplog

        thesplog("a line of thespian's own", level=logging.WARNING)
    thespian_log = tmp_path / "actors.thespian.log"
    assert thespian_log.exists()
    for path in (log_file, thespian_log):
        assert stat.S_IMODE(path.stat().st_mode) == logs.FILE_MODE, path
