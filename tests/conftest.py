"""Shared fixtures: real actor systems, real services, and a leftover-process check.

Every fixture that starts something stops it in its teardown, ending with a process-group
kill (``TcpSystem.stop``): a leaked thespian admin keeps CI's output pipe open forever.
At the end of the session, any process still carrying this run's ``SESSIONLANE_TEST_TAG``
fails the run (and is killed).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from driver import ActorDriver, file_settings
from leftovers import find_leftovers, kill_leftovers

from sessionlane.system.runtime.launch import TcpSystem, simple_system, start_tcp_system

_THESPLOG = Path(tempfile.mkdtemp(prefix="sessionlane-thesplog-"))
os.environ.setdefault("THESPLOG_FILE", str(_THESPLOG / "thespian.log"))
# Services started without a log file log under $XDG_STATE_HOME: never the developer's own.
os.environ["XDG_STATE_HOME"] = str(_THESPLOG / "state")


WHOLE_SUITE_WORKERS = 2
"""xdist workers for a run of the whole suite (``pytest`` with no paths: ``.ci/run``, the
README's command). Most of the suite's time is spent waiting on real processes, sockets and
timers, so two workers on a 2-core machine take about half the time of one
(``docs/test-suite.md`` has the measurements). Files stay whole on one worker (``loadfile``):
module-scoped services start once."""


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Run the whole suite on ``WHOLE_SUITE_WORKERS`` xdist workers; a run given paths (one
    file, one test), ``-n``, ``-p no:xdist`` or ``--pdb`` is left as asked."""
    whole_suite = config.args_source == pytest.Config.ArgsSource.TESTPATHS
    if (
        not whole_suite
        or hasattr(config, "workerinput")  # a worker runs what it is sent, on its own
        or not config.pluginmanager.hasplugin("xdist")
        or config.getoption("numprocesses", None) is not None
        or config.getoption("usepdb", False)
        or config.getoption("collectonly", False)
    ):
        return
    config.option.numprocesses = WHOLE_SUITE_WORKERS
    config.option.dist = "loadfile"
    config.option.tx = ["popen"] * WHOLE_SUITE_WORKERS


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A configured root directory for transcripts."""
    path = tmp_path / "sessions"
    path.mkdir()
    return path


@pytest.fixture
def simple_asys() -> Iterator[Any]:
    asys = simple_system()
    try:
        yield asys
    finally:
        asys.shutdown()


@pytest.fixture
def tcp_system(tmp_path: Path) -> Iterator[TcpSystem]:
    system = start_tcp_system(log_file=tmp_path / "actors.log")
    try:
        yield system
    finally:
        system.stop()


@pytest.fixture(params=["simple", "tcp"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """The same scenario on ``simpleSystemBase`` and on ``multiprocTCPBase`` (real processes).

    Yields ``(name, asys)``; for "tcp" the log file is ``tmp_path / "actors.log"``.
    """
    if request.param == "simple":
        asys = simple_system()
        try:
            yield "simple", asys
        finally:
            asys.shutdown()
        return
    system = start_tcp_system(log_file=tmp_path / "actors.log")
    try:
        yield "tcp", system.asys
    finally:
        system.stop()


@pytest.fixture
def driver_factory(root: Path) -> Any:
    """``make(asys, **file_settings) -> ActorDriver`` started on ``root``."""

    def make(asys: Any, **settings: Any) -> ActorDriver:
        return ActorDriver(asys).start([str(root)], file_settings(**settings))

    return make


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    tag = os.environ.get("SESSIONLANE_TEST_TAG")
    if not tag or hasattr(session.config, "workerinput"):
        # An xdist worker: the others, which carry the same tag, may still be running their
        # tests; the controller checks once every worker has finished.
        return
    left = find_leftovers(tag)
    if left:
        kill_leftovers(left)
        lines = "\n".join(f"  {pid} {cmd}" for pid, cmd in left)
        print(f"\nprocesses left behind by the test run (killed):\n{lines}")
        session.exitstatus = 1
