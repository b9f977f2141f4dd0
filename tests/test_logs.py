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

from sessionlane.system.ops import logs
from sessionlane.system.runtime.launch import log_config, tcp_system

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


@pytest.mark.tcp
def test_at_info_an_actor_s_debug_line_stays_out_of_the_log_file(tmp_path: Path) -> None:
    log_file = tmp_path / "actors.log"
    with tcp_system(log_file=log_file, log_level="INFO") as system:
        actor = system.asys.createActor(ChattyActor)
        assert system.asys.ask(actor, "marker", 10) == "marker"
        # One actor's records reach the logger in order: once the INFO line is there, the
        # DEBUG line logged before it would be too.
        deadline = time.monotonic() + WAIT_S
        while "info-marker" not in (log_file.read_text() if log_file.exists() else ""):
            assert time.monotonic() < deadline, "the INFO line never reached the log"
            time.sleep(0.02)
        assert "debug-marker" not in log_file.read_text()


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
        deadline = time.monotonic() + WAIT_S
        while "info-marker" not in (log_file.read_text() if log_file.exists() else ""):
            assert time.monotonic() < deadline, "the INFO line never reached the log"
            time.sleep(0.02)
        from thespian.system.utilis import thesplog

        thesplog("a line of thespian's own", level=logging.WARNING)
    thespian_log = tmp_path / "actors.thespian.log"
    assert thespian_log.exists()
    for path in (log_file, thespian_log):
        assert stat.S_IMODE(path.stat().st_mode) == logs.FILE_MODE, path
