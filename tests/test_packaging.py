"""The installed distribution: ``import sessionlane``, ``python -m sessionlane``, metadata, help.

These run against the install in this environment (editable in development, a wheel in CI
alike): what a user gets from ``pip install sessionlane``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import messages.errors
import sessionlane
from system.ops.cli import build_parser

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
        for name, value in vars(messages.errors).items()
        if inspect.isclass(value) and issubclass(value, messages.errors.SessionLaneError)
    }
    assert "InvalidRecord" in errors and "TooManyFiles" in errors
    assert errors <= set(sessionlane.__all__)
    for name in errors:
        assert getattr(sessionlane, name) is getattr(messages.errors, name)
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
        "from system.ops.cli import main\n"
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
