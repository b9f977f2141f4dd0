"""The zygote's warm-up: a file actor's life rehearsed once, leaving nothing behind.

``sessionlane.system.runtime.warmup`` runs a real SessionFile (no actor system) on a throwaway
file, over a real socket and a carried channel, in the zygote before it freezes. Here it runs
in the test's process: it must answer whether the whole script ran, and leave no descriptor,
no directory, no changed title and no log switch behind, whether it succeeds or fails; and a
service whose zygote's warm-up fails still serves its files (forked cold). What it saves is
measured by ``sessionlane bench --suite scale`` (``docs/cost-model.md``), not here.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import setproctitle

from sessionlane.actors.session_file import SessionFile
from sessionlane.system.client import connect
from sessionlane.system.runtime import warmup
from sessionlane.system.runtime.service import embedded_service

TITLE = "sessionlane: warm-up under test"  # a sessionlane title: FileInit would retitle it


class Leftovers:
    """This process's open descriptors and which of the warm-up directories it made are still
    there (``made``: another process's warm-up, any service started on this machine meanwhile,
    makes and removes directories of its own under the same prefix).

    Equal to an earlier reading when nothing was added since."""

    def __init__(self, made: list[str]) -> None:
        self.fds = set(os.listdir("/proc/self/fd"))
        self.dirs = {name for name in made if os.path.exists(name)}

    def __eq__(self, before: object) -> bool:
        if not isinstance(before, Leftovers):
            return NotImplemented
        return self.fds == before.fds and self.dirs <= before.dirs

    def __repr__(self) -> str:
        return f"Leftovers(fds={sorted(self.fds)}, dirs={sorted(self.dirs)})"


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The directories ``tempfile.TemporaryDirectory`` makes in this process during the test
    (the warm-up makes its scratch directory with it)."""
    names: list[str] = []
    real = tempfile.TemporaryDirectory

    class Recorded(real):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            names.append(self.name)

    monkeypatch.setattr(tempfile, "TemporaryDirectory", Recorded)
    return names


@pytest.fixture
def titled() -> Iterator[None]:
    before = setproctitle.getproctitle()
    setproctitle.setproctitle(TITLE)
    try:
        yield
    finally:
        setproctitle.setproctitle(before)


def test_the_rehearsal_runs_a_lease_cycle_and_leaves_nothing_behind(
    titled: None, made: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    before = Leftovers(made)
    assert warmup.warm_up() is True  # every answer came as scripted: granted, queued, ...
    assert made, "the warm-up made its scratch directory"
    assert Leftovers(made) == before
    assert setproctitle.getproctitle() == TITLE
    assert logging.root.manager.disable == logging.NOTSET
    assert caplog.records == []  # the rehearsal's file is nobody's business


def test_a_failed_rehearsal_is_not_fatal_and_leaves_nothing_behind(
    titled: None,
    made: list[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG, logger=warmup.__name__)

    def broken(self: object) -> None:
        raise OSError("no carried channel today")

    monkeypatch.setattr(warmup._Rehearsal, "carried", broken)  # after the socket's cycle
    before = Leftovers(made)
    assert warmup.warm_up() is False
    assert made, "the warm-up made its scratch directory"
    assert Leftovers(made) == before  # the file actor exited, its socket and directory are gone
    assert setproctitle.getproctitle() == TITLE
    assert logging.root.manager.disable == logging.NOTSET
    [record] = caplog.records
    assert record.levelno == logging.DEBUG and "no carried channel today" in record.getMessage()


def test_a_service_whose_zygote_cannot_warm_up_still_serves_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: object) -> None:
        raise OSError("cannot rehearse")

    # Set before the service starts: its processes are forks of this one.
    monkeypatch.setattr(warmup._Rehearsal, "run", broken)
    path = str(tmp_path / "t.jsonl")
    with (
        embedded_service([str(tmp_path)], idle_ms=60_000) as service,
        connect(service.address) as sl,
    ):
        lease = sl.lane("a").acquire(path, purpose="prompt")
        lease.append({"type": "x"})
        lease.release()
    assert Path(path).read_bytes().count(b"\n") == 1


def test_with_channels_off_the_rehearsal_runs_over_its_carried_channel_only(
    titled: None, made: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    served: list[str] = []
    real = warmup._Rehearsal.carried

    def carried(self: warmup._Rehearsal) -> None:
        served.append("carried")
        real(self)

    monkeypatch.setattr(SessionFile, "channels", False)  # every offer is a carried channel
    monkeypatch.setattr(warmup._Rehearsal, "carried", carried)
    before = Leftovers(made)
    assert warmup.warm_up() is True
    assert served == ["carried"] * warmup.REHEARSALS
    assert made, "the warm-up made its scratch directory"
    assert Leftovers(made) == before


FOLLOWER = """
import json, logging
from sessionlane.actors import _shell
from sessionlane.actors import session_file  # noqa: F401  (its loggers exist)

ours = logging.getLogger("sessionlane.actors.session_file")
_shell.follow_every_root()  # the zygote, before it freezes
before = {"parent": ours.parent is _shell._EVERY_ROOT}

# What thespian does in each actor process it starts: a root of its own, a new manager.
seen = []
class Keep(logging.Handler):
    def emit(self, record):
        seen.append((record.name, record.levelname, record.getMessage()))
logging.root = logging.RootLogger(logging.INFO)
logging.root.addHandler(Keep())
logging.Logger.root = logging.root
logging.Logger.manager = logging.Manager(logging.root)

_shell._rehome_loggers()  # what every ShellActor does as it starts
ours.debug("below the new root's level")
ours.info("reaches the new root")
print(json.dumps({"before": before, "parent": ours.parent is _shell._EVERY_ROOT,
                  "seen": seen}))
"""


def test_loggers_hung_off_the_current_root_reach_each_new_root_without_being_rewritten() -> None:
    done = subprocess.run(
        [sys.executable, "-c", FOLLOWER], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["before"] == {"parent": True}
    assert report["parent"] is True  # not rewritten: its pages stay shared with the zygote
    assert report["seen"] == [["sessionlane.actors.session_file", "INFO", "reaches the new root"]]
