"""A lease record that cannot be written never keeps an answer from leaving.

The lease record (``actors/lease_record_file.py``) is written before the answers it backs
(``FileCore.next``). When that write fails (a file system remounted read-only after an I/O
error, a full btrfs), the failure is logged once per episode and counted, and the answers
leave all the same: the record on disk lags (``docs/restarts.md``). Before, the failed write
raised out of the shell's worklist loop, which dropped what was left of it: the errors a
failed fdatasync had queued for the held acks never left, and the client waited for ever.

A SessionFile driven by hand over a real channel socket (``Driven``, as in
``tests/test_file_hot_path.py``), on a real file. The record write fails for real: the
record's descriptor is swapped for a read-only one on the same sidecar, so its ``pwrite``
fails (``EBADF``) as a read-only remount's would; the fdatasync fails as in
``tests/test_sync_gap.py`` (the transcript's ``sync`` raises ``EIO``). At activation, a
record written back free that the disk refuses no longer keeps the file from starting.
"""

# ruff: noqa: F811  (the ``driven`` fixture of test_file_hot_path is imported, then named as arguments)

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from test_file_channels import Peer
from test_file_hot_path import Driven, driven  # noqa: F401 (the fixture)

from sessionlane.actors.lease_record_file import LeaseRecordFile, lease_record_path
from sessionlane.actors.reclaim import parse_record
from sessionlane.messages.wire import Acquire, Append, Appended, Error, Granted

REPLY_TIMEOUT_S = 5.0
"""The answer is written in the turn that read the call: this bounds only a failing run."""


@contextmanager
def record_refused(records: LeaseRecordFile) -> Iterator[None]:
    """Every write of the lease record fails while inside (a read-only descriptor on it)."""
    good = records.fd
    records.fd = os.open(records.path, os.O_RDONLY)
    try:
        yield
    finally:
        os.close(records.fd)
        records.fd = good


def granted(d: Driven) -> tuple[Peer, Granted]:
    peer = d.channel()
    peer.sock.settimeout(REPLY_TIMEOUT_S)
    peer.call("a", Acquire(id=1, lane="a", path=d.path, purpose="prompt"))
    d.pump()
    grant = peer.reply().message
    assert isinstance(grant, Granted), grant
    return peer, grant


def on_disk(d: Driven) -> list[str]:
    """The append ids of the lease record as it is on the disk."""
    with open(d.serving.records.path, "rb") as f:
        return [a.aid for a in parse_record(f.read()).appends]


def test_a_failed_sync_then_a_failed_record_write_still_answers_the_error(
    driven: Driven, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer, g = granted(driven)
    s = driven.serving

    def failing_sync(kind: str) -> None:
        raise OSError(errno.EIO, "Input/output error (injected)")

    monkeypatch.setattr(s.transcript, "sync", failing_sync)
    with record_refused(s.records):
        append = Append(id=2, lease=g.lease, fence=g.fence, records=[{"n": 1}], aid="aid-00001")
        peer.call("a", append)
        driven.pump()
        answer = peer.reply().message
    assert isinstance(answer, Error) and answer.id == 2, answer
    assert answer.code == "io_error", answer
    assert driven.actor.status().counters["lease_record_failures"] >= 1


def test_an_append_whose_record_write_fails_is_answered_and_the_record_catches_up(
    driven: Driven, caplog: pytest.LogCaptureFixture
) -> None:
    peer, g = granted(driven)
    s = driven.serving
    before = s.records.writes
    caplog.set_level(logging.WARNING, logger="sessionlane.actors.lease_record_file")
    with record_refused(s.records):
        for rid, aid in ((2, "aid-00001"), (3, "aid-00002")):
            append = Append(id=rid, lease=g.lease, fence=g.fence, records=[{"n": rid}], aid=aid)
            peer.call("a", append)
            driven.pump()
            answer = peer.reply().message
            assert isinstance(answer, Appended) and answer.id == rid, answer
    counters = driven.actor.status().counters
    assert counters["lease_record_failures"] == 2
    assert counters["lease_record_writes"] == before
    assert on_disk(driven) == []  # lags: a resend of these would be written again
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors  # one line for the episode, not one per write
    assert "lease record write" in errors[0].getMessage()

    append = Append(id=4, lease=g.lease, fence=g.fence, records=[{"n": 4}], aid="aid-00003")
    peer.call("a", append)
    driven.pump()
    assert isinstance(peer.reply().message, Appended)
    assert on_disk(driven) == ["aid-00001", "aid-00002", "aid-00003"]  # the next write catches up
    assert any("succeed again" in r.getMessage() for r in caplog.records)
    with open(driven.path) as f:
        assert len(f.readlines()) == 3


def test_a_record_the_disk_refuses_at_activation_leaves_the_file_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record of a holder whose grace is over is written back free at activation; the
    disk refusing that write is counted and the file serves (before, it could not start)."""
    first = Driven(tmp_path / "t.jsonl")
    try:
        granted(first)
    finally:
        first.close()  # a clean stop keeps the record naming its holder
    with open(lease_record_path(first.path), "rb") as f:
        assert parse_record(f.read()).held is not None
    opened = LeaseRecordFile.__init__

    def read_only(self: LeaseRecordFile, *args: Any) -> None:
        opened(self, *args)
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDONLY)

    monkeypatch.setattr(LeaseRecordFile, "__init__", read_only)
    second = Driven(tmp_path / "t.jsonl")  # no grace: the holder found is dropped
    try:
        counters = second.actor.status().counters
        assert "broken" not in counters, "the file could not start"
        assert counters["lease_record_failures"] == 1
        _, grant = granted(second)
        assert grant.fence > 0
    finally:
        second.close()
