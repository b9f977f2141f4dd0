"""The transcript file I/O of the SessionFile actor, on real files."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sessionlane.actors import transcript as transcript_module
from sessionlane.actors.transcript import OpenReport, Transcript, encode_records
from sessionlane.messages.errors import InvalidRecord

REPO = Path(__file__).resolve().parents[1]


def lines_of(path: Path) -> list[dict[str, object]]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "session.jsonl"


@pytest.fixture
def transcript(path: Path) -> Iterator[Transcript]:
    t = Transcript(str(path))
    t.open()
    yield t
    t.close()


def open_once(path: Path) -> OpenReport:
    """Open a transcript as a restarted actor would, and close it again."""
    t = Transcript(str(path))
    try:
        return t.open()
    finally:
        t.close()


# -- encode_records ------------------------------------------------------------------------


def test_records_encode_as_compact_utf8_lines_each_newline_terminated() -> None:
    data = encode_records([{"a": 1}, {"text": "héllo\nworld", "n": None}], 1000)
    assert data == '{"a":1}\n{"text":"héllo\\nworld","n":null}\n'.encode()


def circular() -> dict[str, object]:
    record: dict[str, object] = {}
    record["self"] = record
    return record


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ([1, 2], "not a JSON object"),
        ("text", "not a JSON object"),
        (None, "not a JSON object"),
        ({"set": {1, 2}}, "not serialisable"),
        ({"bytes": b"x"}, "not serialisable"),
        ({"obj": object()}, "not serialisable"),
        ({"nan": math.nan}, "not serialisable"),
        ({"inf": math.inf}, "not serialisable"),
        ({(1, 2): "tuple key"}, "not serialisable"),
        ({"lone": "\ud800"}, "not serialisable"),
        (circular(), "not serialisable"),
        ({"big": "x" * 100}, "over max_record_bytes"),
    ],
)
def test_any_invalid_record_refuses_the_whole_batch_naming_its_index(
    bad: object, reason: str
) -> None:
    with pytest.raises(InvalidRecord) as caught:
        encode_records([{"ok": 1}, {"ok": 2}, bad], 64)
    assert caught.value.code == "invalid_record"
    assert "record 2" in caught.value.detail
    assert reason in caught.value.detail


def test_an_empty_batch_is_refused() -> None:
    with pytest.raises(InvalidRecord, match="empty"):
        encode_records([], 100)


def test_max_record_bytes_counts_utf8_bytes_and_the_newline() -> None:
    record = {"t": "é"}  # {"t":"é"} is 10 bytes in UTF-8, 11 with the newline
    assert encode_records([record], 11) == '{"t":"é"}\n'.encode()
    with pytest.raises(InvalidRecord, match="11 bytes"):
        encode_records([record], 10)


def test_a_refused_batch_writes_nothing(transcript: Transcript, path: Path) -> None:
    transcript.append(encode_records([{"before": 1}], 100))
    before = path.read_bytes()
    with pytest.raises(InvalidRecord):
        transcript.append(encode_records([{"a": 1}, {"b": math.nan}], 100))
    assert path.read_bytes() == before
    assert transcript.check_external() is None


# -- open -----------------------------------------------------------------------------------


def test_opening_a_missing_file_creates_it_empty_with_mode_0600(path: Path) -> None:
    with Transcript(str(path)) as t:
        assert t.size == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert open_once(path).created is False


def test_open_reports_creation_and_size(path: Path) -> None:
    assert open_once(path) == OpenReport(created=True, torn_bytes=0, quarantine=None, size=0)
    path.write_bytes(b'{"a":1}\n')
    assert open_once(path) == OpenReport(created=False, torn_bytes=0, quarantine=None, size=8)


def test_a_torn_last_line_is_quarantined_and_the_file_cut_to_its_last_full_line(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path.write_bytes(b'{"a":1}\n{"b":2}\n{"c":')
    t = Transcript(str(path))
    with caplog.at_level(logging.WARNING, logger="sessionlane.actors.transcript"):
        report = t.open()
    t.close()
    quarantine = Path(str(path) + ".torn")
    assert report.torn_bytes == 5
    assert report.quarantine == str(quarantine)
    assert report.size == 16
    assert quarantine.read_bytes() == b'{"c":\n'
    assert lines_of(path) == [{"a": 1}, {"b": 2}]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(path) in warnings[0].getMessage()
    assert "5 bytes at offset 16" in warnings[0].getMessage()


def test_each_tear_becomes_one_line_of_the_quarantine_file(path: Path) -> None:
    path.write_bytes(b'{"x"')
    open_once(path)
    assert path.read_bytes() == b""
    path.write_bytes(b'{"a":1}\n{"y":')
    open_once(path)
    assert Path(str(path) + ".torn").read_bytes() == b'{"x"\n{"y":\n'


def test_a_torn_tail_longer_than_the_read_chunk_is_quarantined_whole(path: Path) -> None:
    tail = b"z" * (transcript_module._CHUNK + 12345)
    path.write_bytes(b'{"a":1}\n' + tail)
    report = open_once(path)
    assert report.torn_bytes == len(tail)
    assert Path(str(path) + ".torn").read_bytes() == tail + b"\n"
    assert lines_of(path) == [{"a": 1}]


def test_open_removes_only_its_own_leftover_rewrite_temp_files(path: Path) -> None:
    directory = path.parent
    leftover = directory / f".{path.name}.0123456789ab.tmp"
    others = [
        directory / ".other.jsonl.0123456789ab.tmp",
        directory / f".{path.name}.fence",
        directory / f".{path.name}.not-hex-at-all.tmp",
    ]
    for p in [leftover, *others]:
        p.write_bytes(b"x")
    open_once(path)
    assert not leftover.exists()
    assert all(p.exists() for p in others)


# -- append and sync ------------------------------------------------------------------------


def test_append_returns_the_offset_where_each_batch_starts(
    transcript: Transcript, path: Path
) -> None:
    first = encode_records([{"n": 1}, {"n": 2}], 100)
    second = encode_records([{"n": 3}], 100)
    assert transcript.append(first) == 0
    assert transcript.append(second) == len(first)
    assert transcript.size == len(first) + len(second)
    assert transcript.line_count() == 3
    assert lines_of(path) == [{"n": 1}, {"n": 2}, {"n": 3}]


def test_appends_are_our_own_and_not_reported_as_external_changes(
    transcript: Transcript,
) -> None:
    for n in range(5):
        transcript.append(encode_records([{"n": n}], 100))
        assert transcript.check_external() is None


def test_append_continues_after_short_writes(
    transcript: Transcript, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data)[:3]))
    data = encode_records([{"n": n} for n in range(10)], 100)
    assert transcript.append(data) == 0
    monkeypatch.undo()
    assert path.read_bytes() == data
    assert transcript.check_external() is None


def test_append_refuses_data_without_a_final_newline(transcript: Transcript) -> None:
    with pytest.raises(ValueError, match="newline"):
        transcript.append(b'{"a":1}')


def test_sync_count_counts_fdatasyncs_and_flush_does_none(
    transcript: Transcript, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_fdatasync = os.fdatasync

    def counting_fdatasync(fd: int) -> None:
        calls.append(fd)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", counting_fdatasync)
    transcript.append(encode_records([{"n": 1}], 100))
    transcript.sync("fsync")
    transcript.append(encode_records([{"n": 2}], 100))
    transcript.sync("flush")
    transcript.sync("fsync")
    assert transcript.sync_count == 2
    assert len(calls) == 2


def test_flushed_data_is_visible_to_other_readers_at_once(
    transcript: Transcript, path: Path
) -> None:
    transcript.append(encode_records([{"n": 1}], 100))
    transcript.sync("flush")
    assert lines_of(path) == [{"n": 1}]


# -- external changes -----------------------------------------------------------------------


def test_an_external_append_is_reported_and_adopted(
    transcript: Transcript, path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    transcript.append(encode_records([{"ours": 1}], 100))
    with path.open("ab") as f:
        f.write(b'{"theirs":1}\n')
    with caplog.at_level(logging.INFO, logger="sessionlane.actors.transcript"):
        assert transcript.check_external() == "append"
    assert transcript.check_external() is None
    assert transcript.size == path.stat().st_size
    assert transcript.append(encode_records([{"ours": 2}], 100)) == path.stat().st_size - 11
    assert lines_of(path) == [{"ours": 1}, {"theirs": 1}, {"ours": 2}]
    assert [r.getMessage() for r in caplog.records if "external change" in r.getMessage()]


def test_an_external_append_just_before_ours_gets_the_exact_offset_and_is_still_reported(
    transcript: Transcript, path: Path
) -> None:
    transcript.append(encode_records([{"ours": 1}], 100))
    with path.open("ab") as f:  # lands after our last check, before our next write
        f.write(b'{"theirs":1}\n')
    theirs_end = path.stat().st_size
    assert transcript.append(encode_records([{"ours": 2}], 100)) == theirs_end
    assert transcript.check_external() == "append"
    assert transcript.size == path.stat().st_size
    assert lines_of(path) == [{"ours": 1}, {"theirs": 1}, {"ours": 2}]


def test_an_external_append_that_ends_torn_is_quarantined_before_our_write(
    transcript: Transcript, path: Path
) -> None:
    transcript.append(encode_records([{"ours": 1}], 100))
    with path.open("ab") as f:
        f.write(b'{"theirs":1}\n{"theirs":')
    assert transcript.check_external() == "append"
    transcript.append(encode_records([{"ours": 2}], 100))
    assert lines_of(path) == [{"ours": 1}, {"theirs": 1}, {"ours": 2}]
    assert Path(str(path) + ".torn").read_bytes() == b'{"theirs":\n'
    assert transcript.check_external() is None


def test_an_external_truncation_is_reported_and_adopted(transcript: Transcript, path: Path) -> None:
    transcript.append(encode_records([{"n": 1}, {"n": 2}], 100))
    os.truncate(path, 8)
    assert transcript.check_external() == "truncate"
    assert transcript.size == 8
    assert transcript.append(encode_records([{"n": 3}], 100)) == 8
    assert lines_of(path) == [{"n": 1}, {"n": 3}]


def test_a_truncation_mid_line_is_reported_and_the_partial_line_quarantined(
    transcript: Transcript, path: Path
) -> None:
    transcript.append(encode_records([{"n": 1}, {"n": 2}], 100))
    os.truncate(path, 12)
    assert transcript.check_external() == "truncate"
    assert lines_of(path) == [{"n": 1}]
    assert Path(str(path) + ".torn").read_bytes() == b'{"n"\n'


def test_a_file_replaced_by_rename_is_reported_and_the_new_file_adopted(
    transcript: Transcript, path: Path
) -> None:
    transcript.append(encode_records([{"old": 1}], 100))
    replacement = path.with_name("replacement")
    replacement.write_bytes(b'{"new":1}\n')
    os.replace(replacement, path)
    assert transcript.check_external() == "replace"
    assert transcript.identity.ino == path.stat().st_ino
    assert transcript.check_external() is None
    transcript.append(encode_records([{"new": 2}], 100))
    assert lines_of(path) == [{"new": 1}, {"new": 2}]


def test_a_same_size_rewrite_in_place_is_reported_as_replace(
    transcript: Transcript, path: Path
) -> None:
    transcript.append(encode_records([{"n": 1}], 100))
    known = transcript.identity
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, b'{"n":2}\n', 0)
    os.close(fd)
    # Make the rewrite visible whatever the kernel's timestamp granularity.
    later = known.mtime_ns + 1_000_000_000
    os.utime(path, ns=(later, later))
    assert transcript.check_external() == "replace"
    assert transcript.identity.mtime_ns == later
    assert transcript.check_external() is None


def test_a_deleted_file_is_recreated_empty_and_reported_as_replace(
    transcript: Transcript, path: Path
) -> None:
    transcript.append(encode_records([{"n": 1}], 100))
    path.unlink()
    assert transcript.check_external() == "replace"
    assert path.exists() and path.stat().st_size == 0
    assert transcript.size == 0
    assert transcript.append(encode_records([{"n": 2}], 100)) == 0
    assert lines_of(path) == [{"n": 2}]


def test_a_file_deleted_and_recreated_by_someone_else_is_adopted(
    transcript: Transcript, path: Path
) -> None:
    transcript.append(encode_records([{"n": 1}], 100))
    path.unlink()
    path.write_bytes(b'{"other":1}\n')
    assert transcript.check_external() == "replace"
    transcript.append(encode_records([{"n": 2}], 100))
    assert lines_of(path) == [{"other": 1}, {"n": 2}]


# -- rewrite --------------------------------------------------------------------------------


def test_rewrite_replaces_the_content_and_switches_to_the_new_file(
    transcript: Transcript, path: Path
) -> None:
    transcript.append(encode_records([{"n": n} for n in range(5)], 100))
    old_ino = transcript.identity.ino
    transcript.rewrite(encode_records([{"summary": True}], 100))
    assert transcript.identity.ino == path.stat().st_ino != old_ino
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert transcript.check_external() is None
    assert transcript.line_count() == 1
    transcript.append(encode_records([{"n": 5}], 100))
    assert lines_of(path) == [{"summary": True}, {"n": 5}]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


@pytest.mark.parametrize("failing", ["write", "fsync", "rename"])
def test_a_failed_rewrite_leaves_the_old_file_intact_and_no_temp_file(
    transcript: Transcript, path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    transcript.append(encode_records([{"n": 1}, {"n": 2}], 100))
    before = path.read_bytes()

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError, match="No space"):
        transcript.rewrite(encode_records([{"new": 1}], 100))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert transcript.check_external() is None
    transcript.append(encode_records([{"n": 3}], 100))
    assert lines_of(path) == [{"n": 1}, {"n": 2}, {"n": 3}]


# -- crash during rewrite -------------------------------------------------------------------

_RECORDS = 2000  # about 90 KB per generation: several short writes per rewrite

_CHILD = r"""
import json, os, sys
from sessionlane.actors.transcript import Transcript

path, mode, generation = sys.argv[1], sys.argv[2], int(sys.argv[3])
real_write, real_fsync, real_rename = os.write, os.fsync, os.rename

def content(gen):
    return "".join(
        json.dumps({"gen": gen, "i": i, "pad": "p" * 20}) + "\n" for i in range(RECORDS)
    ).encode()

def checkpoint(name):
    sys.stdout.write(name + "\n")
    sys.stdout.flush()
    sys.stdin.readline()  # the parent answers, or kills us here

def write(fd, data):
    checkpoint("write")
    return real_write(fd, bytes(data)[:32768])

def fsync(fd):
    checkpoint("fsync")
    real_fsync(fd)

def rename(src, dst, **dir_fds):
    checkpoint("rename")
    real_rename(src, dst, **dir_fds)
    checkpoint("renamed")

t = Transcript(path)
t.open()
if mode == "step":
    os.write, os.fsync, os.rename = write, fsync, rename
    t.rewrite(content(generation))
    os.write, os.fsync, os.rename = real_write, real_fsync, real_rename
    print("done", flush=True)
else:
    while True:
        generation += 1
        t.rewrite(content(generation))
        print("done", generation, flush=True)
""".replace("RECORDS", str(_RECORDS))


def generation_of(path: Path) -> int:
    """The single generation the whole file holds; fails on a mix or a partial file."""
    records = lines_of(path)
    assert len(records) == _RECORDS
    generations = {r["gen"] for r in records}
    assert len(generations) == 1, generations
    assert [r["i"] for r in records] == list(range(_RECORDS))
    (generation,) = generations
    assert isinstance(generation, int)
    return generation


def start_child(path: Path, mode: str, generation: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), mode, str(generation)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def kill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.stdin is not None and child.stdout is not None
    child.stdin.close()
    child.stdout.close()


def seed(path: Path, generation: int) -> None:
    path.write_bytes(
        "".join(
            json.dumps({"gen": generation, "i": i, "pad": "p" * 20}) + "\n" for i in range(_RECORDS)
        ).encode()
    )


@pytest.mark.slow
def test_a_rewrite_killed_at_any_step_leaves_the_old_or_the_new_file_whole(
    path: Path,
) -> None:
    seed(path, 0)
    # A dry run that answers every checkpoint lists the steps of one rewrite.
    child = start_child(path, "step", 1)
    assert child.stdin is not None and child.stdout is not None
    steps: list[str] = []
    while (line := child.stdout.readline().strip()) != "done":
        steps.append(line)
        child.stdin.write("go\n")
        child.stdin.flush()
    kill(child)
    assert generation_of(path) == 1
    assert steps.count("write") >= 3 and "rename" in steps and "renamed" in steps

    generation = 1
    for kill_at in range(len(steps)):
        child = start_child(path, "step", generation + 1)
        assert child.stdin is not None and child.stdout is not None
        for _ in range(kill_at):
            child.stdout.readline()
            child.stdin.write("go\n")
            child.stdin.flush()
        step = child.stdout.readline().strip()
        assert step == steps[kill_at]
        kill(child)  # blocked at this checkpoint, before the step (after it for "renamed")
        renamed = "renamed" in steps[: kill_at + 1]
        expected = generation + 1 if renamed else generation
        assert generation_of(path) == expected, f"killed at step {kill_at} ({step})"
        generation = expected
        report = open_once(path)
        assert report.torn_bytes == 0
        assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


@pytest.mark.slow
@pytest.mark.parametrize("rewrites_before_kill", [1, 2, 3, 5, 8])
def test_a_rewrite_loop_killed_anywhere_leaves_one_whole_generation(
    path: Path, rewrites_before_kill: int
) -> None:
    seed(path, 0)
    child = start_child(path, "loop", 0)
    assert child.stdout is not None
    for _ in range(rewrites_before_kill):
        assert child.stdout.readline().startswith("done")
    kill(child)  # the child is somewhere in its next rewrite, or between two
    assert generation_of(path) >= rewrites_before_kill
    assert open_once(path).torn_bytes == 0
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
