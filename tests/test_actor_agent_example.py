"""``examples/actor_agent.py``, the README's in-system agent, run as a user would run it.

The example is a script (``python examples/actor_agent.py``), so it runs here as a subprocess
on a real ``multiprocTCPBase`` service it starts itself; its thespian processes carry a tag
of their own, so whatever it might leave behind is found and killed at teardown. The events
its default run does not meet (``revoked``, ``abort_requested``) are driven in-process, with
its ``Agent`` in an embedded service.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from leftovers import find_leftovers, kill_leftovers

from sessionlane.system.client import connect
from sessionlane.system.runtime.service import Service, embedded_service

pytestmark = [pytest.mark.tcp, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "actor_agent.py"
TURNS = 3
RECORDS_PER_TURN = 3  # the example's default ``Start.records``
AGENTS = ("agent:alpha", "agent:beta")

Record = dict[str, Any]


@pytest.fixture(scope="module")
def example_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[int, str, list[Record]]]:
    """Run the example on ``tmp_path/sessions``: (exit status, output, transcript records)."""
    tmp_path = tmp_path_factory.mktemp("actor-agent")
    root = tmp_path / "sessions"
    root.mkdir()
    tag = f"actor-agent-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    runtime = tmp_path / "run"
    runtime.mkdir()
    env = {**os.environ, "SESSIONLANE_TEST_TAG": tag, "XDG_RUNTIME_DIR": str(runtime)}
    output = tmp_path / "example.out"
    try:
        with output.open("wb") as out:
            # Output to a file, not a pipe: thespian's forked processes inherit it.
            proc = subprocess.Popen(
                [sys.executable, str(EXAMPLE), "--root", str(root), "--turns", str(TURNS)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
            try:
                status = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        transcript = root / "session.jsonl"
        records = [json.loads(line) for line in transcript.read_text().splitlines()]
        yield status, output.read_text(errors="replace"), records
    finally:
        left = find_leftovers(tag)
        kill_leftovers(left)
        assert not left, f"the example left processes behind: {left}"


def test_the_actor_agent_example_writes_every_turn_as_one_contiguous_run_with_rising_fences(
    example_run: tuple[int, str, list[Record]],
) -> None:
    status, output, records = example_run
    assert status == 0, output

    # Every record of every turn of both agents is there, once, in order within its turn.
    expected = {
        (agent, turn, seq)
        for agent in AGENTS
        for turn in range(1, TURNS + 1)
        for seq in range(RECORDS_PER_TURN)
    }
    written = [(r["agent"], r["turn"], r["seq"]) for r in records]
    assert sorted(written) == sorted(expected), written

    # Each turn is one contiguous run of the file, written under one fence...
    runs: list[list[Record]] = []
    for record in records:
        if runs and (runs[-1][0]["agent"], runs[-1][0]["turn"]) == (
            record["agent"],
            record["turn"],
        ):
            runs[-1].append(record)
        else:
            runs.append([record])
    assert len(runs) == len(AGENTS) * TURNS, [(r[0]["agent"], r[0]["turn"]) for r in runs]
    for run in runs:
        assert [r["seq"] for r in run] == list(range(RECORDS_PER_TURN))
        assert len({r["fence"] for r in run}) == 1, run

    # ...and every turn's fence is higher than the one before it in the file.
    fences = [run[0]["fence"] for run in runs]
    assert fences == sorted(set(fences)), fences


def test_the_actor_agent_example_shows_the_two_agents_contending(
    example_run: tuple[int, str, list[Record]],
) -> None:
    status, output, _ = example_run
    assert status == 0, output
    # One agent holds the file while the other asks: the second waits in line, no error.
    assert "queued at position 1" in output, output
    assert "error" not in output.lower(), output
    for agent in AGENTS:
        assert output.count(f"{agent:12} turn") >= 2 * TURNS, output


# The example's handlers for the events its default run does not meet, driven in-process.


def load_example() -> ModuleType:
    """Import ``examples/actor_agent.py`` (not a package) under its own name.

    Imported before the service starts: thespian forks the admin, and the agent actors from
    it, out of this process, and resolves ``actor_agent.Agent`` in the copy of this process.
    """
    spec = importlib.util.spec_from_file_location("actor_agent", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["actor_agent"] = module
    spec.loader.exec_module(module)
    return module


example = load_example()


def start_agent(service: Service, path: Path, **job: Any) -> Any:
    """An ``Agent`` in the service's actor system, its lane open, its turns started."""
    assert service.running is not None
    asys = service.running.system.asys
    agent = asys.createActor(example.Agent)
    start = example.Start(registry=service.running.registry, lane="agent:a", path=str(path), **job)
    asys.tell(agent, start)
    assert notes_until(service, "lane open") == ["lane open"]
    asys.tell(agent, example.Go())
    return agent


def notes_until(service: Service, last: str, timeout: float = 30.0) -> list[str]:
    """The agent's notes up to and including ``last`` (or its ``Done``), in order."""
    assert service.running is not None
    asys = service.running.system.asys
    notes: list[str] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        msg = asys.listen(left)
        if isinstance(msg, example.Done):
            notes.append("done")
        elif isinstance(msg, example.Note):
            notes.append(msg.text)
        if notes and notes[-1] in (last, "done"):
            return notes
    raise AssertionError(f"no {last!r} within {timeout} s; notes so far: {notes}")


def test_an_agent_whose_model_call_outlasts_the_max_hold_is_told_revoked_and_writes_nothing(
    root: Path, tmp_path: Path
) -> None:
    path = root / "session.jsonl"
    with embedded_service([str(root)], log_file=tmp_path / "actors.log", max_hold_ms=300) as svc:
        start_agent(svc, path, turns=1, think_s=3.0)
        notes = notes_until(svc, "done")
    assert notes == ["turn 1: granted, fence 1", "turn 1: lease revoked (max_hold)", "done"]
    assert path.read_text() == ""


def test_an_agent_asked_to_abort_releases_at_once_and_the_recovery_is_granted_without_revoking(
    root: Path, tmp_path: Path
) -> None:
    path = root / "session.jsonl"
    with embedded_service([str(root)], log_file=tmp_path / "actors.log") as svc:
        start_agent(svc, path, turns=1, think_s=60.0)  # a model call that would never end
        assert notes_until(svc, "turn 1: granted, fence 1") == ["turn 1: granted, fence 1"]
        with connect(svc.address) as sl:
            recovery = sl.recover(str(path), reason="stuck", grace=60.0)
            assert recovery.fence == 2
            counters = sl.status(str(path)).files[0].counters
            recovery.release()
        notes = notes_until(svc, "done")
    assert notes == [
        "turn 1: abort requested, releasing early",
        "turn 1: released after 0 records",
        "done",
    ]
    assert counters["revocations"] == 0  # the agent released; the grace never ran out
    assert path.read_text() == ""
