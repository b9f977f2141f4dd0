"""``deploy/``: the systemd unit and the container recipe name commands and keys that exist."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sessionlane.system.config import load_settings
from sessionlane.system.ops.cli import build_parser

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
    writable = " ".join(keys["ReadWritePaths"]).split()
    deployed = (DEPLOY / "sessionlane.toml").read_text()
    roots = json.loads(deployed.split("roots = ", 1)[1].splitlines()[0])
    assert all(any(root.startswith(w) for w in writable) for root in roots), (roots, writable)
    env = dict(e.split("=", 1) for e in keys["Environment"])
    assert env["XDG_STATE_HOME"] == "/var/lib" and "StateDirectory" in keys


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
