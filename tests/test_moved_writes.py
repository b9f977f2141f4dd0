"""No acknowledged record outside the root (issue 19, finding 6): a real rename loop and service.

A client appends under one lease while the test renames the transcript's directory out of the
root, again and again, and makes a new one in its place. Every other move is made as soon as the
service has created the transcript in the new directory: inside the window the issue found
between the service's look at the path (and its create and directory fsync) and its write.
Right after each rename the test notes the size of the moved-out file: a record at or past that
offset in a moved-out file was written after its directory had left the root. Before this fix
some of those were acknowledged (492 of 3,377 moves in the issue's probe); now an append is
acknowledged only if, once durable, its file is still the one at the path, and the holder gets
``file_moved`` otherwise.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from sessionlane.messages.errors import SessionLaneError
from sessionlane.system.client import connect
from sessionlane.system.runtime.service import embedded_service

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(240)]

MOVES = 200
PROGRESS_S = 20.0
CREATED_S = 5.0


def lines_of(path: Path) -> list[tuple[int, int]]:
    """(offset, n) of every record in ``path``."""
    found, offset = [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        found.append((offset, json.loads(line)["n"]))
        offset += len(line)
    return found


def test_no_record_acknowledged_while_its_directory_is_renamed_out_of_the_root_lands_outside(
    root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    team = root / "team"
    team.mkdir()
    path = team / "z.jsonl"
    acked: dict[int, int] = {}  # n -> offset acknowledged
    refused: dict[int, str] = {}  # n -> error code
    progress = threading.Semaphore(0)
    done = threading.Event()
    failures: list[BaseException] = []

    with (
        embedded_service([str(root)], log_file=tmp_path / "service.log") as service,
        connect(service.address) as sl,
    ):
        lease = sl.lane("writer").acquire(str(path))
        assert lease is not None

        def write() -> None:
            n = 0
            try:
                while not done.is_set():
                    n += 1
                    try:
                        acked[n] = lease.append({"n": n}).offset
                    except SessionLaneError as exc:
                        refused[n] = exc.code
                    else:
                        progress.release()  # one acknowledged append between two rounds
            except BaseException as exc:  # reported by the main thread
                failures.append(exc)
                progress.release()

        writer = threading.Thread(target=write, name="appender")
        writer.start()
        moved_at: dict[Path, int] = {}  # moved-out file -> its size right after the rename

        def move_out(i: int) -> None:
            gone = outside / f"g{i}"
            team.rename(gone)
            moved = gone / "z.jsonl"
            moved_at[moved] = moved.stat().st_size if moved.exists() else 0
            team.mkdir()

        try:
            for i in range(0, MOVES, 2):
                assert progress.acquire(timeout=PROGRESS_S), "no append acknowledged"
                assert not failures, failures
                move_out(i)
                # The service recreates the transcript in the new directory, then writes:
                # move it out again the moment the file appears (bounded; polled, no sleep).
                deadline = time.monotonic() + CREATED_S
                while not path.exists() and time.monotonic() < deadline:
                    pass
                move_out(i + 1)
            assert progress.acquire(timeout=PROGRESS_S)
        finally:
            done.set()
            writer.join(60)
        assert not failures, failures
        lease.release()

    where: dict[int, tuple[Path, int]] = {}
    for file in [*moved_at, path]:
        if file.exists():
            for offset, n in lines_of(file):
                assert n not in where, f"record {n} written twice"
                where[n] = (file, offset)

    late = []
    for n, offset in acked.items():
        assert n in where, f"acknowledged record {n} is nowhere"
        file, found = where[n]
        assert found == offset, f"record {n} acknowledged at {offset}, found at {found}"
        if file != path and offset >= moved_at[file]:
            late.append(n)
    assert not late, f"{len(late)} records acknowledged after their directory left the root"
    current = {n for _, n in lines_of(path)} if path.exists() else set()
    assert not current & set(refused), "a refused record is in the file at the path"
    codes = sorted(set(refused.values()))
    print(
        f"\n{MOVES} moves, {len(acked)} appends acknowledged, {len(refused)} refused {codes},"
        f" {sum(1 for c in refused.values() if c == 'file_moved')} file_moved"
    )
    assert set(refused.values()) <= {"file_moved", "path_not_allowed"}, refused
