"""Actor processes start from a frozen heap and carry no module the service does not need.

Real processes: a starter that has loaded what ``sessionlane serve`` loads starts a thespian
system; an actor created by the admin forks a second actor (as the Registry forks each
SessionFile), and both report, through actor messages, whether they froze what they inherited
(``sessionlane.system.runtime.frozen_fork``) and which modules they hold. Memory figures are in
``sessionlane bench --suite scale`` (``docs/cost-model.md``), not here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from sessionlane.system.runtime import frozen_fork, launch, zygote

# What a file actor never uses: the client (and the asyncio, ssl and tenacity it brings), the
# command line's table printer, the metrics exporter (off unless asked), the benchmark and race
# harnesses, the test tools of this process.
FORBIDDEN = (
    "sessionlane.system.client",
    "asyncio",
    "ssl",
    "tenacity",
    "rich",
    "prometheus_client",
    "sessionlane.system.bench",
    "sessionlane.system.race",
)
FORBIDDEN_TEST_TOOLS = ("pytest", "hypothesis", "_pytest")

STARTER = """
import json, os, signal, sys
from sessionlane.system.ops import cli  # noqa: F401  (what `sessionlane serve` has loaded)
from sessionlane.system.runtime.service import Service  # noqa: F401
from sessionlane.system.runtime import zygote
from sessionlane.system.runtime.frozen_fork import ForkReport
from sessionlane.system.runtime.launch import tcp_system

# ForkReport stands in for SessionFile: forked from its parent's zygote.
zygote.FORKED_FROM_ZYGOTE = zygote.FORKED_FROM_ZYGOTE | {ForkReport.__module__ + ".ForkReport"}

with tcp_system(log_file=sys.argv[1]) as system:
    parent = system.asys.createActor(ForkReport)
    second = system.asys.ask(parent, "spawn", 10)
    first = system.asys.ask(parent, "report", 10)
    exits = []
    for _ in range(3):  # each killed child is seen to exit (and the next one is forked)
        child = system.asys.ask(parent, "spawn", 10)
        os.kill(child["pid"], signal.SIGKILL)
        exits.append(system.asys.listen(10))
print(json.dumps({"parent": first, "child": second, "exits": exits}))
"""


def test_actors_forked_by_actors_start_frozen_without_unused_modules(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", STARTER, str(tmp_path / "actors.log")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    reports = json.loads(done.stdout.strip().splitlines()[-1])
    parent, child = reports["parent"], reports["child"]
    assert isinstance(parent, dict) and isinstance(child, dict), reports
    assert parent["pid"] != child["pid"]
    # The child was forked by the parent's zygote (through an intermediate that exited), and
    # re-parented to the parent actor, which reaps it and sees it die.
    assert parent["zygote"] is not None
    assert child["ppid"] == parent["pid"]
    assert child["forked_by"] not in (None, parent["pid"], parent["zygote"], child["pid"])
    assert reports["exits"] == ["child exited"] * 3  # the parent reaps them, thespian tells it
    for report in (parent, child):
        # The frozen-fork path ran in the process: it froze the heap it inherited.
        assert report["frozen"] is not None and report["frozen"] > 10_000, report["frozen"]
        modules = set(report["modules"])
        assert "sessionlane.system.runtime.service" in modules  # the report is the real list
        assert not modules & {*FORBIDDEN, *FORBIDDEN_TEST_TOOLS}, sorted(
            modules & {*FORBIDDEN, *FORBIDDEN_TEST_TOOLS}
        )


PARKING = """
import json, os, signal, sys, time
from sessionlane.actors import procfs
from sessionlane.system.runtime import zygote
from sessionlane.system.runtime.frozen_fork import ForkReport
from sessionlane.system.runtime.launch import tcp_system

zygote.FORKED_FROM_ZYGOTE = zygote.FORKED_FROM_ZYGOTE | {ForkReport.__module__ + ".ForkReport"}

def parked(parent):
    # The parent's children titled as parked (a killed one stays a zombie: not counted).
    return [
        pid for pid, st in procfs.all_stats().items()
        if st.ppid == parent and st.live and zygote.PARKED_TITLE in procfs.command_line(pid)
    ]

def wait_parked(parent):
    deadline = time.monotonic() + 10
    while not (found := parked(parent)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return found

with tcp_system(log_file=sys.argv[1]) as system:
    parent = system.asys.createActor(ForkReport)
    first = system.asys.ask(parent, "spawn", 10)
    parent_pid = first["ppid"]
    ahead = wait_parked(parent_pid)
    second = system.asys.ask(parent, "spawn", 10)  # takes the parked child
    again = wait_parked(parent_pid)  # and the next one is parked
    os.kill(again[0], signal.SIGKILL)  # killed while it waits
    while procfs.stat(again[0]).live:
        time.sleep(0.01)
    third = system.asys.ask(parent, "spawn", 10)  # forked the ordinary way
print(json.dumps({"first": first, "ahead": ahead, "second": second, "again": again,
                  "third": third}))
"""


def test_a_child_is_forked_ahead_and_one_killed_while_parked_is_forked_again(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PARKING, str(tmp_path / "actors.log")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout.strip().splitlines()[-1])
    # One child waits, already the parent's (re-parented through its intermediate).
    assert len(r["ahead"]) == 1 and len(r["again"]) == 1, r
    # The next spawn became that parked process, and a new one was parked after it.
    assert r["second"]["pid"] == r["ahead"][0]
    assert r["second"]["ppid"] == r["first"]["ppid"]
    assert r["again"][0] not in (r["ahead"][0], r["first"]["pid"])
    # The parked child was gone: the request was served by an ordinary fork, as a child of
    # the same parent, frozen like the others.
    assert r["third"]["pid"] != r["again"][0]
    assert r["third"]["ppid"] == r["first"]["ppid"]
    assert r["third"]["frozen"] is not None


def test_the_frozen_fork_path_is_not_taken_in_the_starting_process() -> None:
    frozen_fork.install()
    assert frozen_fork.installed()
    assert frozen_fork.frozen_at_start() is None  # only forked actors run the wrapper


@pytest.mark.parametrize("patch", [frozen_fork, zygote])
def test_the_fork_patches_fail_closed_on_another_thespian(
    monkeypatch: pytest.MonkeyPatch, patch: Any
) -> None:
    # Each install() asks loopback.require_supported_thespian first (admin_fork's is tested in
    # test_transport_auth.py): without that call in it, the install below succeeds.
    real = metadata.version
    monkeypatch.setattr(
        metadata, "version", lambda name: "4.0.2" if name == "thespian" else real(name)
    )
    monkeypatch.setattr(patch, "_installed", False)
    with pytest.raises(RuntimeError, match=r"thespian 4\.0\.2 is installed"):
        patch.install()
    assert not patch.installed()


def test_the_frozen_fork_patch_fails_closed_if_thespian_moved_start_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from thespian.system import multiprocCommon

    monkeypatch.setattr(frozen_fork, "_installed", False)
    monkeypatch.delattr(multiprocCommon, "startChild")
    with pytest.raises(RuntimeError, match=r"startChild moved"):
        frozen_fork.install()
    assert not frozen_fork.installed()


def test_the_zygote_patch_fails_closed_if_thespian_changed_how_it_starts_actors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from thespian.system import multiprocCommon

    monkeypatch.setattr(zygote, "_installed", False)
    monkeypatch.setattr(multiprocCommon, "startChild", lambda *args: None)
    with pytest.raises(RuntimeError, match=r"no longer starts actors as this module expects"):
        zygote.install()
    assert not zygote.installed()


def test_a_system_is_not_started_without_the_frozen_fork_patch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from thespian.system import multiprocCommon

    monkeypatch.setattr(frozen_fork, "_installed", False)
    monkeypatch.setattr(
        multiprocCommon.MultiProcReplicator, "_startChildActor", lambda *args, **kwargs: None
    )
    with pytest.raises(RuntimeError, match=r"no longer forks its actors with target=startChild"):
        launch.start_tcp_system(log_file=tmp_path / "never.log")
