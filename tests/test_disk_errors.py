"""Disk errors and moved files at the write seam, without an actor (issue 19, findings 6 and 8).

The errors are injected where the OS reports them: the transcript's ``os.write`` (a disk that
fills in the middle of an append), ``fdatasync``, and a rename of the directory between the
write and the check that acknowledges it. ``test_disk_service.py`` does the same on a real
full file system through a real service.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sessionlane.actors import transcript as transcript_module
from sessionlane.actors.confined import ConfinedDir
from sessionlane.actors.disk_errors import DiskEpisodes, disk_error_code, named_disk_error
from sessionlane.actors.group_commit import CommitPolicy
from sessionlane.actors.histogram import FileMetrics
from sessionlane.actors.lease_table import Grant, LeasePolicy, LeaseTable
from sessionlane.actors.session_file_commit import GroupCommit, TranscriptSync
from sessionlane.actors.session_file_disk import FileDisk
from sessionlane.actors.session_file_writes import (
    CheckLease,
    Notify,
    Reply,
    WriteEffect,
    WriteOut,
    WritePath,
)
from sessionlane.actors.transcript import Transcript
from sessionlane.messages.errors import (
    DiskError,
    DiskFull,
    FileMoved,
    IOFailure,
    ReadOnly,
    error_for,
)
from sessionlane.messages.internal import LaneCall, LaneRef
from sessionlane.messages.wire import Append, Appended, Durability, Error, Rewrite


class Rig:
    """A write path over a real transcript under ``root`` (walked from it), lease table, sync."""

    def __init__(self, root: Path, path: Path) -> None:
        self.path = str(path)
        self.transcript = Transcript(self.path, root=str(root))
        self.transcript.open()
        self.table = LeaseTable(self.path, LeasePolicy())
        self.sync = TranscriptSync(self.path, CommitPolicy(), FileMetrics())
        self.disk = FileDisk(self.path, self.transcript, self.sync, None, lambda: 0.0)
        self.writes = WritePath(
            self.path,
            legacy=False,
            tail_unchecked=False,
            durability="fsync",
            max_record_bytes=1000,
            unsynced=lambda: self.sync.unsynced,
        )
        grant = self.table.acquire(("a", "acquire"), "a", "prompt", 0.0)[-1]
        assert isinstance(grant, Grant)
        self.grant = grant
        self.ids = 0

    def append(self, n: int, durability: Durability = "fsync") -> list[WriteEffect]:
        self.ids += 1
        request = Append(
            id=self.ids,
            lease=self.grant.lease,
            fence=self.grant.fence,
            records=[{"n": n}],
            durability=durability,
        )
        call = LaneCall(
            lane=LaneRef(uid="a", name="a", address="lane:a"),
            path=self.path,
            canonical=True,
            request=request,
        )
        assert self.check(self.writes.append_under_lease(call, request)) == []
        assert self.writes.begin_drain() is None
        [out] = self.check(self.writes.next_write() or [])
        assert isinstance(out, WriteOut)  # performed by the actor's disk, as here
        outcome = self.disk.write("append", out.op.data, durability == "fsync", False)
        return self.writes.written(out.op, outcome) + self.writes.end_drain()

    def check(self, effects: list[WriteEffect]) -> list[WriteEffect]:
        """The write path's one lease check, answered with the table's verdict (as the core
        answers it); what that led to."""
        [check] = effects
        assert isinstance(check, CheckLease)
        lane = check.call.lane.uid
        verdict = self.table.check_write(lane, check.lease, check.fence, purpose=check.purpose)
        return self.writes.checked(check, verdict)


@pytest.fixture
def rig(root: Path) -> Iterator[Rig]:
    (root / "team").mkdir()
    made = Rig(root, root / "team" / "t.jsonl")
    try:
        yield made
    finally:
        made.transcript.close()


def reply(effects: list[WriteEffect]) -> Any:
    (only,) = [fx.message for fx in effects if isinstance(fx, Reply)]
    return only


class FillingDisk:
    """The transcript's ``os`` with a disk that fills in the middle of a write.

    The first ``write`` of an append puts half its bytes in the file, the rest raises the
    errno given; ``ftruncate`` fails too while ``cut_fails`` is set.
    """

    def __init__(self, errno_: int, *, cut_fails: bool = False) -> None:
        self.errno = errno_
        self.cut_fails = cut_fails
        self.failing = True

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: Any) -> int:
        if not self.failing:
            return os.write(fd, data)
        return os.write(fd, bytes(data[: max(1, len(data) // 2)]))

    def ftruncate(self, fd: int, length: int) -> None:
        if self.cut_fails:
            raise OSError(errno.EIO, "Input/output error")
        os.ftruncate(fd, length)


def fill(monkeypatch: pytest.MonkeyPatch, disk: FillingDisk) -> None:
    def rest(fd: int, data: Any) -> None:
        if disk.failing and len(data):
            raise OSError(disk.errno, os.strerror(disk.errno))
        os.write(fd, data)

    monkeypatch.setattr(transcript_module, "os", disk)
    monkeypatch.setattr(transcript_module, "write_all", rest)


# The names -----------------------------------------------------------------------------------


def test_each_disk_errno_has_its_name_and_the_clients_their_classes() -> None:
    named = {
        errno.ENOSPC: ("disk_full", DiskFull),
        errno.EDQUOT: ("disk_full", DiskFull),
        errno.EROFS: ("read_only", ReadOnly),
        errno.EIO: ("io_error", IOFailure),
    }
    for number, (code, cls) in named.items():
        exc = OSError(number, os.strerror(number))
        assert named_disk_error(exc) == disk_error_code(exc) == code
        error = error_for(code, "d", "/p")
        assert type(error) is cls and isinstance(error, DiskError)
    assert disk_error_code(OSError(errno.EFBIG, "File too large")) == "io_error"
    assert named_disk_error(OSError(errno.EFBIG, "File too large")) is None
    assert disk_error_code(OSError(errno.EMFILE, "Too many open files")) is None
    assert disk_error_code(ValueError("a bug")) is None
    assert type(error_for("file_moved")) is FileMoved


def test_an_episode_is_logged_when_it_starts_and_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    episodes = DiskEpisodes("/p.jsonl", logging.getLogger("test.disk"))
    with caplog.at_level(logging.INFO, logger="test.disk"):
        for _ in range(50):
            episodes.failed("disk_full", "append", OSError(errno.ENOSPC, "full"))
        episodes.failed("read_only", "append", OSError(errno.EROFS, "ro"))
        episodes.succeeded()
        episodes.succeeded()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert messages[0].startswith("disk_full: append of /p.jsonl failed")
    assert messages[1].startswith("read_only: append of /p.jsonl failed")
    assert messages[2] == "/p.jsonl: writes succeed again after 51 failed (read_only)"
    assert episodes.episodes == 2 and episodes.code is None


# A failed append -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "code"),
    [(errno.ENOSPC, "disk_full"), (errno.EROFS, "read_only"), (errno.EIO, "io_error")],
)
def test_a_failed_append_answers_its_disk_error_logs_once_and_is_no_external_change(
    rig: Rig,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    number: int,
    code: str,
) -> None:
    assert isinstance(reply(rig.append(1)), Appended)
    rig.disk.sync_now()
    before = Path(rig.path).read_bytes()
    disk = FillingDisk(number)
    fill(monkeypatch, disk)
    with caplog.at_level(logging.DEBUG):
        for n in range(2, 6):
            effects = rig.append(n)
            failed = reply(effects)
            assert isinstance(failed, Error) and failed.code == code, failed
            assert not any(isinstance(fx, Notify) for fx in effects), "no external_change"
            assert Path(rig.path).read_bytes() == before  # the partial bytes were cut
        logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(logged) == 1 and logged[0].getMessage().startswith(f"{code}: append of")
        assert not any(r.exc_info for r in caplog.records), "no traceback"

        disk.failing = False
        effects = rig.append(6)
        assert isinstance(reply(effects), Appended)
        assert not any(isinstance(fx, Notify) for fx in effects)
        rig.disk.sync_now()
    assert rig.sync.take_error() is None
    assert Path(rig.path).read_bytes() == before + b'{"n":6}\n'
    assert rig.writes.counters["external_changes"] == 0
    assert (
        caplog.records[-1]
        .getMessage()
        .endswith("writes succeed again after 4 failed " + f"({code})")
    )


def test_partial_bytes_that_could_not_be_cut_are_cut_by_the_next_write_as_ours(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(reply(rig.append(1)), Appended)
    disk = FillingDisk(errno.ENOSPC, cut_fails=True)
    fill(monkeypatch, disk)
    failed = reply(rig.append(2))
    assert isinstance(failed, Error) and failed.code == "disk_full"
    assert Path(rig.path).read_bytes().startswith(b'{"n":1}\n{"n"')  # ours, still there

    disk.failing = disk.cut_fails = False
    effects = rig.append(3)
    assert isinstance(reply(effects), Appended)
    assert not any(isinstance(fx, Notify) for fx in effects)
    assert Path(rig.path).read_bytes() == b'{"n":1}\n{"n":3}\n'


def test_a_failed_fdatasync_turns_held_acks_into_its_disk_error(rig: Rig) -> None:
    def broken(durability: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    rig.transcript.sync = broken  # type: ignore[method-assign]
    assert isinstance(reply(rig.append(1)), Appended)  # held until a sync covers it
    failure = GroupCommitProbe(rig).commit_one()
    assert failure.code == "disk_full" and "fdatasync failed" in failure.detail


class GroupCommitProbe:
    """Hold one ack in a ``GroupCommit`` over the rig's sync and commit it."""

    def __init__(self, rig: Rig) -> None:
        self.commit = GroupCommit(rig.path, rig.sync, watch=False)
        self.rig = rig

    def commit_one(self) -> Error:
        from sessionlane.actors.group_commit import Outgoing
        from sessionlane.messages.internal import FileReply

        ack = Appended(id=1, offset=0, lines=1, fence=self.rig.grant.fence)
        message = FileReply(path=self.rig.path, message=ack, lane="a")
        out = Outgoing(lane="a", address="lane:a", message=message, needs_sync=True, key=("a", 1))
        assert self.commit.hold(out) is False
        self.rig.disk.sync_now()  # the actor syncs, then commits
        done = self.commit.commit()
        assert done.failed_keys == [("a", 1)]
        (delivered,) = done.deliveries
        error = delivered.message.message
        assert isinstance(error, Error)
        return error


# A file moved between the write and its acknowledgement --------------------------------------


def move_after_write(rig: Rig, root: Path, outside: Path) -> None:
    """The transcript's ``append`` seam: the real write, then the directory moved out."""
    real = rig.transcript.append

    def append_then_move(data: bytes) -> int:
        offset = real(data)
        (root / "team").rename(outside / "team")
        return offset

    rig.transcript.append = append_then_move  # type: ignore[method-assign]


def test_an_fsync_append_whose_directory_moved_out_before_its_sync_is_not_acknowledged(
    rig: Rig, root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    move_after_write(rig, root, outside)
    assert isinstance(reply(rig.append(1)), Appended)  # held: not acknowledged yet
    failure = GroupCommitProbe(rig).commit_one()
    assert failure.code == "file_moved" and "went to the moved file" in failure.detail
    assert (outside / "team" / "t.jsonl").read_bytes() == b'{"n":1}\n'
    assert rig.sync.moved == 1


def test_a_flush_append_whose_directory_moved_out_is_answered_file_moved(
    rig: Rig, root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    move_after_write(rig, root, outside)
    failed = reply(rig.append(1, durability="flush"))
    assert isinstance(failed, Error) and failed.code == "file_moved"
    assert rig.writes.counters["appends"] == 0 and rig.writes.done == {}


def test_the_walk_from_the_root_tells_whether_a_file_is_still_at_its_path(
    root: Path, tmp_path: Path
) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "t.jsonl").write_bytes(b"")
    st = os.stat(root / "a" / "b" / "t.jsonl")
    with ConfinedDir.walk(str(root), str(root / "a" / "b")) as directory:

        def here() -> bool:
            return directory.leads_to("t.jsonl", st.st_dev, st.st_ino)

        assert here()
        (root / "a").rename(root / "a.old")
        assert not here()  # a directory above it moved
        (root / "a").symlink_to(root / "a.old")
        assert not here()  # the same file, but through a symlink: not at the path
        (root / "a").unlink()
        (root / "a.old").rename(root / "a")
        assert here()
        (root / "a" / "b" / "t.jsonl").rename(root / "a" / "b" / "u.jsonl")
        assert not here()


def test_a_rewrite_whose_directory_moved_out_is_answered_file_moved(
    rig: Rig, root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    rig.table.release(("a", "rel"), "a", rig.grant.lease, 0.0)
    grant = rig.table.acquire(("a", "compact"), "a", "compaction", 0.0)[-1]
    assert isinstance(grant, Grant)
    real = rig.transcript.rewrite

    def rewrite_then_move(data: bytes) -> None:
        real(data)
        (root / "team").rename(outside / "team")

    rig.transcript.rewrite = rewrite_then_move  # type: ignore[method-assign]
    request = Rewrite(id=1, lease=grant.lease, fence=grant.fence, records=[{"n": 9}])
    call = LaneCall(
        lane=LaneRef(uid="a", name="a", address="lane:a"),
        path=rig.path,
        canonical=True,
        request=request,
    )
    assert rig.check(rig.writes.rewrite(call, request)) == []
    assert rig.writes.begin_drain() is None
    [out] = rig.check(rig.writes.next_write() or [])
    assert isinstance(out, WriteOut)
    outcome = rig.disk.write("rewrite", out.op.data, True, False)
    failed = reply(rig.writes.written(out.op, outcome))
    assert isinstance(failed, Error) and failed.code == "file_moved"
    assert rig.writes.counters["rewrites"] == 0
    assert (outside / "team" / "t.jsonl").read_bytes() == b'{"n":9}\n'
