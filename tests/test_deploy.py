"""``deploy/``: the systemd unit and the container recipe name commands and keys that exist."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from ports import listen_port
from test_serve import READY_TIMEOUT_S, STOP_TIMEOUT_S, Serve, sessionlane_command

from sessionlane.system._version import __version__
from sessionlane.system.client import connect
from sessionlane.system.config import load_settings
from sessionlane.system.ops.cli import build_parser
from sessionlane.system.ops.notify import notify
from sessionlane.system.ops.startup import start_line

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "sessionlane.service"
CONTAINERFILE = DEPLOY / "Containerfile"


def unit_entries(path: Path) -> dict[str, list[tuple[str, str]]]:
    """``section -> [(key, value)]`` of a systemd unit (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {raw!r}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def service_keys() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for key, value in unit_entries(UNIT)["Service"]:
        found.setdefault(key, []).append(value)
    return found


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_unit_runs_serve_with_options_the_cli_accepts_and_its_config_is_valid(
    tmp_path: Path,
) -> None:
    argv = shlex.split(service_keys()["ExecStart"][0])
    assert Path(argv[0]).name == "sessionlane"
    args = build_parser().parse_args(argv[1:])  # an unknown option would exit here
    assert args.command == "serve"
    config = option(argv, "--config")
    assert config == "/etc/sessionlane/sessionlane.toml"
    # The shipped file is what the unit's install notes copy there. Roots are replaced: the
    # deployed ones do not exist on a test machine.
    settings, _ = load_settings(
        DEPLOY / "sessionlane.toml", env={}, overrides={"roots": [str(tmp_path)]}
    )
    assert settings.metrics_listen == "127.0.0.1:9420"


def test_the_unit_kills_the_whole_group_is_hardened_and_may_write_its_roots() -> None:
    keys = service_keys()
    assert keys["KillMode"] == ["control-group"]
    assert keys["NoNewPrivileges"] == ["yes"]
    assert keys["PrivateTmp"] == ["yes"]
    assert keys["ProtectSystem"] == ["strict"]
    assert int(keys["LimitNOFILE"][0]) >= 4096
    # Writable under ProtectSystem=strict: the directories systemd creates, and ReadWritePaths.
    created = [f"/var/lib/{d}" for d in " ".join(keys["StateDirectory"]).split()]
    writable = created + " ".join(keys.get("ReadWritePaths", [])).split()
    roots = deployed_roots()
    assert all(any(root.startswith(w) for w in writable) for root in roots), (roots, writable)
    # ...and every root is created by systemd itself: nothing to make by hand first.
    assert all(root in created for root in roots), (roots, created)
    env = dict(e.split("=", 1) for e in keys["Environment"])
    assert env["XDG_STATE_HOME"] == "/var/lib" and env["XDG_RUNTIME_DIR"] == "/run/sessionlane"
    assert keys["RuntimeDirectory"] == ["sessionlane"]


def deployed_roots() -> list[str]:
    deployed = (DEPLOY / "sessionlane.toml").read_text()
    roots: list[str] = json.loads(deployed.split("roots = ", 1)[1].splitlines()[0])
    return roots


def test_the_unit_waits_for_readiness_and_its_header_installs_from_this_repository() -> None:
    keys = service_keys()
    assert keys["Type"] == ["notify"] and keys["NotifyAccess"] == ["main"]
    header = [line[1:].strip() for line in UNIT.read_text().splitlines() if line.startswith("#")]
    commands = [
        line
        for line in header
        if line.split(" ", 1)[0] in {"useradd", "python3", "install", "systemctl"}
    ]
    assert len(commands) == 5, commands
    text = " ".join(commands)
    assert "pip install sessionlane" not in text  # not published
    assert "/opt/sessionlane/bin/pip install ." in text
    for word in text.split():  # every file of this repository it copies exists
        if word.startswith("deploy/"):
            assert (DEPLOY.parent / word).exists(), word
    assert "/srv/" not in UNIT.read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at this environment's.
    script = Path(sys.executable).with_name("sessionlane")
    if not script.exists():
        pytest.skip("no sessionlane script beside this interpreter")
    unit = tmp_path / "sessionlane.service"
    unit.write_text(UNIT.read_text().replace("/opt/sessionlane/bin/sessionlane", str(script)))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "sessionlane.service" not in done.stderr, done.stderr


def containerfile_json(instruction: str) -> list[str]:
    for line in CONTAINERFILE.read_text().splitlines():
        if line.startswith(instruction + " "):
            value: list[str] = json.loads(line[len(instruction) + 1 :])
            return value
    raise AssertionError(f"no {instruction} in {CONTAINERFILE}")


def test_the_container_runs_serve_logging_to_stderr_with_a_config_it_ships(
    tmp_path: Path,
) -> None:
    entry, cmd = containerfile_json("ENTRYPOINT"), containerfile_json("CMD")
    assert entry[-1] == "sessionlane"
    args = build_parser().parse_args(cmd)
    assert args.command == "serve" and args.log_file == "-"
    copied = [
        line.split()[1:]
        for line in CONTAINERFILE.read_text().splitlines()
        if line.startswith("COPY ")
    ]
    assert ["deploy/container.toml", args.config] in copied
    token = tmp_path / "token"
    token.write_text("t0k3n-0123456789\n")
    token.chmod(0o600)
    settings, _ = load_settings(
        DEPLOY / "container.toml",
        env={},
        overrides={"roots": [str(tmp_path)], "token_file": str(token)},
    )
    assert settings.listen.startswith("tcp://0.0.0.0:") and settings.token_file


def test_the_build_context_leaves_out_the_virtualenv_and_git() -> None:
    ignored = (DEPLOY.parent / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# Type=notify: the readiness handshake, against a datagram socket of the test's own ----------


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, str]]:
    """A bound ``AF_UNIX`` datagram socket and its ``$NOTIFY_SOCKET`` spelling."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    short = Path(tempfile.mkdtemp(prefix="sl-notify-", dir="/tmp"))
    try:
        if request.param == "path":
            sock.bind(str(short / "notify"))
            yield sock, str(short / "notify")
        else:
            name = f"sessionlane-test-{uuid.uuid4().hex}"
            sock.bind(b"\0" + name.encode())
            yield sock, "@" + name
    finally:
        sock.close()
        shutil.rmtree(short, ignore_errors=True)


def received(sock: socket.socket, timeout: float) -> dict[str, str]:
    """The next notification's assignments."""
    sock.settimeout(timeout)
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


@pytest.mark.tcp
def test_serve_notifies_ready_once_its_gateway_listens_and_stopping_when_it_stops(
    notify_socket: tuple[socket.socket, str], root: Path, tmp_path: Path
) -> None:
    sock, address = notify_socket
    run = Path(tempfile.mkdtemp(prefix="sl-sock-", dir="/tmp"))
    listen = f"unix://{run / 'gw.sock'}"
    serve = Serve(
        tmp_path,
        "--root",
        str(root),
        "--listen",
        listen,
        "--log-file",
        str(tmp_path / "a.log"),
        env={"NOTIFY_SOCKET": address},
    )
    try:
        ready = received(sock, READY_TIMEOUT_S)
        assert ready["READY"] == "1" and ready["STATUS"].startswith("serving unix://"), ready
        with connect(listen) as sl:  # READY means the gateway answers now, not soon
            assert sl.status().files == []
        # One start line, on stdout and in the log file: version, listen, roots, config.
        started = f"sessionlane {__version__} starting (pid {serve.proc.pid}): listen {listen}"
        assert f"{started}, roots {root}; no config file" in serve.text, serve.text
        assert started in (tmp_path / "a.log").read_text()
        assert serve.proc.poll() is None
        serve.proc.send_signal(signal.SIGTERM)
        stopping = received(sock, STOP_TIMEOUT_S)
        assert stopping["STOPPING"] == "1", stopping
        assert serve.proc.wait(STOP_TIMEOUT_S) == 0, serve.text
    finally:
        serve.kill()
        shutil.rmtree(run, ignore_errors=True)


def test_the_start_line_names_the_config_file_and_how_it_was_named_and_the_variables(
    tmp_path: Path,
) -> None:
    settings, _ = load_settings(None, env={}, overrides={"roots": [str(tmp_path)]})
    env = {"SESSIONLANE_CONFIG": "/etc/s.toml", "SESSIONLANE_LOG_LEVEL": "DEBUG"}
    line = start_line(settings, None, env)
    assert line.startswith(f"sessionlane {__version__} starting (pid ")
    assert line.endswith(
        f"listen tcp://127.0.0.1:7420, roots {tmp_path}; config /etc/s.toml"
        " ($SESSIONLANE_CONFIG), environment SESSIONLANE_LOG_LEVEL"
    )
    assert "config /x.toml (--config)" in start_line(settings, "/x.toml", {})


def test_notify_is_quiet_without_a_notify_socket_and_refuses_what_it_cannot_speak(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    assert notify("READY=1", env={}) is False
    assert notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False
    assert "not a Unix socket path" in caplog.text
    gone = str(tmp_path / "nobody-listens")
    assert notify("READY=1", env={"NOTIFY_SOCKET": gone}) is False  # logged, not raised
    assert "cannot notify the service manager" in caplog.text


@pytest.mark.tcp
def test_the_units_steps_run_as_systemd_would_run_them_ready_found_by_status_and_stopped(
    tmp_path: Path,
) -> None:
    """What systemd does for this unit, done by hand under a temporary prefix: create the
    StateDirectory= and RuntimeDirectory= directories (their modes), set Environment=, run
    ExecStart= with $NOTIFY_SOCKET and wait for READY=1, then KillSignal= and STOPPING=1 within
    TimeoutStopSec=. The install steps' config is the shipped one, with paths under the prefix
    and ports free on this machine. (User= is not switched to: that account does not exist
    here; tests/test_deploy_container.py runs a service as another uid.)"""
    keys = service_keys()
    prefix = Path(tempfile.mkdtemp(prefix="sl-unit-", dir="/tmp"))  # short: socket paths

    def under(path: str) -> str:
        return str(prefix) + path

    try:
        state_mode = int(keys["StateDirectoryMode"][0], 8)
        for name in " ".join(keys["StateDirectory"]).split():
            Path(under(f"/var/lib/{name}")).mkdir(mode=state_mode, parents=True)
        for name in keys["RuntimeDirectory"]:
            runtime = Path(under(f"/run/{name}"))
            runtime.parent.mkdir(exist_ok=True)
            runtime.mkdir(mode=int(keys["RuntimeDirectoryMode"][0], 8))
        port, metrics = listen_port(), listen_port()
        config = (DEPLOY / "sessionlane.toml").read_text()
        config = config.replace('"/var/lib/', f'"{under("/var/lib/")}')
        config = config.replace("tcp://127.0.0.1:7420", f"tcp://127.0.0.1:{port}")
        config = config.replace('"127.0.0.1:9420"', f'"127.0.0.1:{metrics}"')
        etc = Path(under("/etc/sessionlane/sessionlane.toml"))
        etc.parent.mkdir(parents=True)
        etc.write_text(config)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONLANE_")}
        env.update({k: under(v) for k, v in (e.split("=", 1) for e in keys["Environment"])})
        if "SESSIONLANE_TEST_TAG" in os.environ:
            env["SESSIONLANE_TEST_TAG"] = os.environ["SESSIONLANE_TEST_TAG"]
        notify_path = prefix / "notify"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(notify_path))
            env["NOTIFY_SOCKET"] = str(notify_path)
            argv = shlex.split(keys["ExecStart"][0])
            argv = [
                *sessionlane_command(),
                *[under(a) if a.startswith("/etc/") else a for a in argv[1:]],
            ]
            output = prefix / "journal"
            with output.open("wb") as out:
                proc = subprocess.Popen(
                    argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                )
            try:
                ready = received(sock, READY_TIMEOUT_S)
                assert ready.get("READY") == "1", (ready, output.read_text())
                # `systemctl start` has returned: status (no --listen) finds the service
                # through the state file in RuntimeDirectory=.
                status = subprocess.run(
                    [*sessionlane_command(), "status", "--json"],
                    capture_output=True,
                    text=True,
                    env={k: v for k, v in env.items() if k != "NOTIFY_SOCKET"},
                    timeout=60,
                )
                assert status.returncode == 0 and json.loads(status.stdout) == [], status.stderr
                states = list(Path(under("/run/sessionlane")).glob("sessionlane-*/serve-*.json"))
                assert len(states) == 1, states
                proc.send_signal(getattr(signal, keys["KillSignal"][0]))
                assert received(sock, STOP_TIMEOUT_S).get("STOPPING") == "1"
                assert proc.wait(float(keys["TimeoutStopSec"][0])) == 0, output.read_text()
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert "sessionlane serving" in output.read_text()
    finally:
        shutil.rmtree(prefix, ignore_errors=True)
