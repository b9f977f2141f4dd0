"""``examples/sync_client.py`` and ``examples/async_client.py``, run as a user runs them.

Each example is a script run as its own process against a real service (``multiprocTCPBase``,
the gateway on a loopback port) on a temporary root; the checks read its output and the
transcript it wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sessionlane.system.runtime.service import Service, embedded_service

pytestmark = [pytest.mark.tcp, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Path]]:
    tmp = tmp_path_factory.mktemp("client-examples")
    root = tmp / "sessions"
    root.mkdir()
    with embedded_service([str(root)], log_file=tmp / "actors.log") as svc:
        yield svc, root


def run_example(name: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )
    return done.returncode, done.stdout + done.stderr


def test_the_sync_example_holds_a_turn_while_the_heartbeat_skips_then_appends_without_a_lease(
    service: tuple[Service, Path],
) -> None:
    svc, root = service
    path = root / "sync.jsonl"
    status, output = run_example("sync_client.py", "--listen", svc.address, str(path))
    assert status == 0, output
    assert "heartbeat: skipped, the file is busy" in output, output
    assert "status: " in output and "holder free" in output, output
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["role"] for r in records] == ["user", "assistant", "system"], records


def test_the_sync_example_finds_the_service_through_sessionlane_listen(
    service: tuple[Service, Path],
) -> None:
    svc, root = service
    path = root / "env.jsonl"
    status, output = run_example(
        "sync_client.py", str(path), env={"SESSIONLANE_LISTEN": svc.address}
    )
    assert status == 0, output
    assert len(path.read_text().splitlines()) == 3


def test_the_sync_example_reports_a_path_outside_the_roots_as_an_error(
    service: tuple[Service, Path], tmp_path: Path
) -> None:
    svc, _ = service
    outside = tmp_path / "elsewhere.jsonl"
    status, output = run_example("sync_client.py", "--listen", svc.address, str(outside))
    assert status == 1, output
    assert "sync_client: PathNotAllowed" in output, output
    assert not outside.exists()


def test_the_async_example_writes_every_turn_as_one_run_with_rising_fences(
    service: tuple[Service, Path],
) -> None:
    svc, root = service
    path = root / "async.jsonl"
    status, output = run_example(
        "async_client.py", "--listen", svc.address, "--agents", "3", "--turns", "2", str(path)
    )
    assert status == 0, output
    assert "file order: " in output, output
    # The example checks the file itself; check it again here, independently.
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 3 * 2 * 3
    runs = [records[i : i + 3] for i in range(0, len(records), 3)]
    for run in runs:
        assert len({(r["agent"], r["turn"], r["fence"]) for r in run}) == 1, run
        assert [r["seq"] for r in run] == [0, 1, 2]
    fences = [run[0]["fence"] for run in runs]
    assert fences == sorted(set(fences))
    assert {run[0]["agent"] for run in runs} == {"agent-1", "agent-2", "agent-3"}
