"""The installed distribution: ``import sessionlane``, ``python -m sessionlane``, metadata, help.

These run against the install in this environment (editable in development, a wheel in CI
alike): what a user gets from ``pip install sessionlane``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import sessionlane
import sessionlane.messages.errors
from sessionlane.system.ops.cli import build_parser
from sessionlane.system.runtime.service import embedded_service

REPO = Path(__file__).resolve().parent.parent


def run_module(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_import_sessionlane_exposes_connect_both_clients_every_error_and_the_version() -> None:
    errors = {
        name
        for name, value in vars(sessionlane.messages.errors).items()
        if inspect.isclass(value)
        and issubclass(value, sessionlane.messages.errors.SessionLaneError)
    }
    assert "InvalidRecord" in errors and "TooManyFiles" in errors
    assert errors <= set(sessionlane.__all__)
    for name in errors:
        assert getattr(sessionlane, name) is getattr(sessionlane.messages.errors, name)
    assert callable(sessionlane.connect) and callable(sessionlane.connect_async)
    assert issubclass(sessionlane.InvalidRecord, sessionlane.SessionLaneError)
    assert all(hasattr(sessionlane, name) for name in sessionlane.__all__)


def test_the_version_is_the_distributions_own() -> None:
    assert sessionlane.__version__ == importlib.metadata.version("sessionlane")


def test_python_m_sessionlane_prints_the_version_from_any_directory(tmp_path: Path) -> None:
    result = run_module("-m", "sessionlane", "--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"sessionlane {sessionlane.__version__}"


def test_python_m_sessionlane_runs_the_command_line(tmp_path: Path) -> None:
    result = run_module("-m", "sessionlane", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("serve", "status", "stop", "doctor", "race", "bench"):
        assert command in result.stdout


def test_plotting_is_an_extra_and_the_tests_extra_brings_it() -> None:
    requires = importlib.metadata.requires("sessionlane") or []
    matplotlib = [r for r in requires if r.startswith("matplotlib")]
    assert matplotlib and all('extra == "plot"' in r for r in matplotlib), requires
    assert any(r.startswith("sessionlane[plot]") and 'extra == "test"' in r for r in requires)


def test_the_license_file_is_mit() -> None:
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 the sessionlane authors" in text


def test_race_plot_without_matplotlib_exits_2_saying_how_to_install_it(tmp_path: Path) -> None:
    # matplotlib is installed here (the test extra): hide it the way a plain install lacks it.
    script = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from sessionlane.system.ops.cli import main\n"
        "sys.exit(main(['race', '--duration', '1', '--plot', sys.argv[1]]))\n"
    )
    plot = tmp_path / "waits.png"
    result = run_module("-c", script, str(plot), cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert "pip install 'sessionlane[plot]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not plot.exists()


def _parsers(
    parser: argparse.ArgumentParser, name: str
) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += _parsers(sub, f"{name} {sub_name}")
    return found


def test_every_option_of_every_command_has_help_text() -> None:
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, parser in _parsers(build_parser(), "sessionlane")
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
        and not (action.help and action.help.strip())
    ]
    assert missing == []


@pytest.mark.parametrize("command", ["status", "stop"])
def test_status_and_stop_name_the_service_with_listen(command: str) -> None:
    (sub,) = [p for name, p in _parsers(build_parser(), "sessionlane") if name.endswith(command)]
    options = {s for action in sub._actions for s in action.option_strings}
    assert "--listen" in options


PACKAGE_FOLDERS = ("actors", "messages", "system")


def test_every_package_folder_is_in_the_distributions_package_list() -> None:
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    folders = {
        "sessionlane." + ".".join(init.parent.relative_to(REPO).parts)
        for folder in PACKAGE_FOLDERS
        for init in (REPO / folder).rglob("__init__.py")
    }
    assert folders | {"sessionlane"} == listed


# An agent project of the kind issue reports came from: its own top-level modules named like
# our layers, first on sys.path (the script's directory), imported before sessionlane.
AGENT_PROJECT = {
    "messages.py": "KIND = 'the agent project messages module'\n",
    "system/__init__.py": "KIND = 'the agent project system package'\n",
    "actors/__init__.py": "KIND = 'the agent project actors package'\n",
    "agent.py": """\
import json, sys
import actors, messages, system
import sessionlane
from sessionlane import LeaseTimeout, Unavailable, connect

assert messages.KIND.startswith("the agent project"), messages.__file__
assert system.KIND.startswith("the agent project") and actors.KIND.startswith("the agent")
assert issubclass(LeaseTimeout, TimeoutError) and issubclass(Unavailable, ConnectionError)
with connect(sys.argv[1]) as sl:
    with sl.lane("agent:main").lease(sys.argv[2]) as lease:
        result = lease.append({"type": "message", "text": "hi"})
    print(json.dumps({
        "fence": result.fence,
        "lines": result.lines,
        "client": type(sl).__module__,
        "repr": repr(sl),
        "error_module": LeaseTimeout.__module__,
        "file": sessionlane.__file__,
    }))
""",
}


@pytest.mark.slow
def test_the_wheel_installed_in_a_fresh_venv_serves_a_project_with_its_own_messages_module(
    tmp_path: Path,
) -> None:
    wheels = tmp_path / "wheels"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q"]
    built = subprocess.run(
        [*pip_wheel, "--wheel-dir", str(wheels), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("sessionlane-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    assert tops == {"sessionlane", wheel.name.removesuffix("-py3-none-any.whl") + ".dist-info"}

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr
    site = next((venv / "lib").glob("python3*/site-packages"))
    ours = {p.name for p in site.iterdir()} & {"actors", "messages", "system", "sessionlane"}
    assert ours == {"sessionlane"}, "nothing but sessionlane lands in site-packages"

    project = tmp_path / "project"
    for name, text in AGENT_PROJECT.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    root = tmp_path / "root"
    root.mkdir()
    with embedded_service([str(root)], log_file=tmp_path / "service.log") as service:
        address = service.address
        ran = subprocess.run(
            [str(venv / "bin" / "python"), "agent.py", address, str(root / "a.jsonl")],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=120,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert (result["fence"], result["lines"]) == (1, 1)
    assert result["client"].startswith("sessionlane.") and result["error_module"].startswith(
        "sessionlane."
    )
    assert result["repr"] == f"<sessionlane.SessionLane {address} connected>"
    assert Path(result["file"]).is_relative_to(site), "the installed copy, not the checkout"
    assert json.loads((root / "a.jsonl").read_text()) == {"type": "message", "text": "hi"}
