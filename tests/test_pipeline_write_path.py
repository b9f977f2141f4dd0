"""The pipeline rule on a real transcript: a disk that fills, a sync that fails, a lease lost.

The appends of one pipeline are all accepted before the write path drains them (as when they
arrive in one read of the gateway's channel), then performed in order the way the actor does;
the failure is placed by the injected disk (a write that fails once, then works again) or by the
lease table, never by timing. What is left in the file is read back.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_disk_errors import FillingDisk

from sessionlane.actors import transcript as transcript_module
from sessionlane.actors.group_commit import CommitPolicy
from sessionlane.actors.histogram import FileMetrics
from sessionlane.actors.lease_table import Grant, LeasePolicy, LeaseTable
from sessionlane.actors.session_file_commit import TranscriptSync
from sessionlane.actors.session_file_disk import FileDisk
from sessionlane.actors.session_file_writes import (
    CheckLease,
    Reply,
    WriteEffect,
    WriteOut,
    WritePath,
)
from sessionlane.actors.transcript import Transcript
from sessionlane.messages.internal import LaneCall, LaneRef
from sessionlane.messages.wire import Append, Appended


class Pipeline:
    """One holder's write path over a real transcript, and the appends of its pipelines."""

    def __init__(self, root: Path) -> None:
        (root / "team").mkdir()
        self.path = str(root / "team" / "p.jsonl")
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
        self.grant = self.acquire("a")
        self.ids = 0
        self.replies: dict[int, Any] = {}  # request id -> its reply
        self.writes_out = 0  # WriteOuts performed (each one write of the transcript)

    def acquire(self, lane: str) -> Grant:
        grant = self.table.acquire((lane, "acquire"), lane, "prompt", 0.0)[-1]
        assert isinstance(grant, Grant)
        return grant

    def send(
        self,
        numbers: range,
        *,
        after: str | None = None,
        release_at: int | None = None,
        group: int = 1,
    ) -> list[int]:
        """Accept a pipeline of one append per number (``after``: the one before its first;
        ``release_at``: the number whose append carries the release of the lease; ``group``:
        records per append, asking for their offsets when more than one)."""
        sent = []
        for n in numbers:
            self.ids += 1
            aid = f"aid-{n:05d}"
            request = Append(
                id=self.ids,
                lease=self.grant.lease,
                fence=self.grant.fence,
                records=[{"n": n}] if group == 1 else [{"n": n, "k": k} for k in range(group)],
                aid=aid,
                after=after,
                release=True if n == release_at else None,
                offsets=True if group > 1 else None,
            )
            call = LaneCall(
                lane=LaneRef(uid="a", name="a", address="lane:a"),
                path=self.path,
                canonical=True,
                request=request,
            )
            self.perform(self.writes.append_under_lease(call, request))
            sent.append(self.ids)
            after = aid
        return sent

    def drain(self) -> None:
        assert self.writes.begin_drain() is None
        while (effects := self.writes.next_write()) is not None:
            self.perform(effects)
        self.perform(self.writes.end_drain())

    def perform(self, effects: list[WriteEffect]) -> None:
        for fx in effects:
            if isinstance(fx, WriteOut):
                self.writes_out += 1
                fsync = fx.op.durability == "fsync"
                outcome = self.disk.write("append", fx.data, fsync, fx.repair_tail)
                self.perform(self.writes.written(fx.op, outcome, fx.rest))
            elif isinstance(fx, CheckLease):  # answered with the table's verdict, as the core does
                lane, purpose = fx.call.lane.uid, fx.purpose
                verdict = self.table.check_write(lane, fx.lease, fx.fence, purpose=purpose)
                self.perform(self.writes.checked(fx, verdict))
            else:
                self.collect([fx])

    def collect(self, effects: list[WriteEffect]) -> None:
        for fx in effects:
            if isinstance(fx, Reply):
                self.replies[fx.call.request.id] = fx.message

    def codes(self, ids: list[int]) -> list[str]:
        return [
            "appended" if isinstance(r, Appended) else r.code
            for r in (self.replies[i] for i in ids)
        ]

    def numbers(self) -> list[int]:
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line)["n"] for line in f]


def fail_once(monkeypatch: pytest.MonkeyPatch, number: int) -> None:
    """The transcript's next write puts half its bytes in the file and fails (``number``);
    the writes after it succeed."""
    disk = FillingDisk(number)

    def rest(fd: int, data: Any) -> None:
        if disk.failing and len(data):
            disk.failing = False
            raise OSError(number, os.strerror(number))
        os.write(fd, data)

    monkeypatch.setattr(transcript_module, "os", disk)
    monkeypatch.setattr(transcript_module, "write_all", rest)


@pytest.fixture
def pipeline(root: Path) -> Iterator[Pipeline]:
    made = Pipeline(root)
    try:
        yield made
    finally:
        made.transcript.close()


def test_a_disk_that_fills_at_append_k_leaves_exactly_the_ones_before_it(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = pipeline.send(range(4))
    pipeline.drain()
    fail_once(monkeypatch, errno.ENOSPC)  # append 4 only: the disk has room again after it
    rest = pipeline.send(range(4, 10), after="aid-00003")
    pipeline.drain()  # 4 fails on the disk; 5 to 9 were accepted before it and are refused
    assert (
        pipeline.codes(first + rest) == ["appended"] * 4 + ["disk_full"] + ["pipeline_broken"] * 5
    )
    assert pipeline.numbers() == [0, 1, 2, 3]
    late = pipeline.send(range(10, 11), after="aid-00009")  # the pipeline stays stopped
    pipeline.drain()
    assert pipeline.codes(late) == ["pipeline_broken"]
    fresh = pipeline.send(range(11, 13))  # a new pipeline starts afresh
    pipeline.drain()
    assert pipeline.codes(fresh) == ["appended", "appended"]
    assert pipeline.numbers() == [0, 1, 2, 3, 11, 12]


def test_after_a_failed_sync_no_pipelined_append_goes_on(pipeline: Pipeline) -> None:
    acked = pipeline.send(range(3))
    pipeline.drain()
    assert pipeline.codes(acked) == ["appended"] * 3
    pipeline.writes.forget(("a", acked[-1]))  # what the actor does for acks a sync failed
    refused = pipeline.send(range(3, 5), after="aid-00002")
    pipeline.drain()
    assert pipeline.codes(refused) == ["pipeline_broken"] * 2
    assert pipeline.numbers() == [0, 1, 2]


def test_a_lease_lost_in_mid_pipeline_leaves_exactly_the_appends_written_before(
    pipeline: Pipeline,
) -> None:
    written = pipeline.send(range(3))
    pipeline.drain()
    queued = pipeline.send(range(3, 6), after="aid-00002")
    pipeline.table.release(("a", "release"), "a", pipeline.grant.lease, 0.0)
    pipeline.acquire("b")  # the file moved on before the queued appends were performed
    pipeline.drain()
    assert pipeline.codes(written + queued) == ["appended"] * 3 + ["stale_fence"] * 3
    assert pipeline.numbers() == [0, 1, 2]


def test_a_pipeline_is_written_in_order_each_append_right_after_the_one_before(
    pipeline: Pipeline,
) -> None:
    sent = pipeline.send(range(50))
    pipeline.drain()
    assert pipeline.codes(sent) == ["appended"] * 50
    offsets = [pipeline.replies[i].offset for i in sent]
    assert offsets == [sum(len(f'{{"n":{k}}}\n') for k in range(n)) for n in range(50)]
    assert pipeline.numbers() == list(range(50))


def test_a_pipeline_queued_at_once_goes_out_in_one_write_each_append_at_its_own_offset(
    pipeline: Pipeline,
) -> None:
    first = pipeline.send(range(1))
    pipeline.drain()
    rest = pipeline.send(range(1, 40), after="aid-00000")
    plain = pipeline.send(range(40, 42))  # a new pipeline: its first append starts a write
    pipeline.drain()
    assert pipeline.writes_out == 3
    assert pipeline.writes.counters["chained_appends"] == 38 + 1
    assert pipeline.codes(first + rest + plain) == ["appended"] * 42
    with open(pipeline.path, "rb") as f:
        data = f.read()
    for number, rid in enumerate(first + rest + plain):
        reply = pipeline.replies[rid]
        line = data[reply.offset : data.index(b"\n", reply.offset)]
        assert json.loads(line) == {"n": number}


def test_the_append_that_releases_ends_its_pipelines_write_and_waits_for_the_sync(
    pipeline: Pipeline,
) -> None:
    first = pipeline.send(range(1))
    pipeline.drain()
    sent = pipeline.send(range(1, 10), after="aid-00000", release_at=5)
    pipeline.drain()
    # 1..5 in one write, ending with the one that releases; 6..9 in another (nothing chains
    # after it: the core refuses them once it releases the last level, docs/fused-release.md)
    assert pipeline.writes_out == 3
    assert pipeline.codes(first + sent) == ["appended"] * 10
    released = [pipeline.replies[i].released for i in sent]
    assert released == [None, None, None, None, True, None, None, None, None]
    held = list(pipeline.writes.releasing.held.values())
    assert [r.aid for r in held] == ["aid-00005"], "released once its sync succeeds"
    assert pipeline.numbers() == list(range(10))


def test_groups_of_records_go_out_in_one_write_each_line_at_the_offset_its_answer_says(
    pipeline: Pipeline,
) -> None:
    first = pipeline.send(range(1), group=3)
    pipeline.drain()
    rest = pipeline.send(range(1, 20), after="aid-00000", group=3)
    pipeline.drain()
    assert pipeline.writes_out == 2 and pipeline.codes(first + rest) == ["appended"] * 20
    data = Path(pipeline.path).read_bytes()
    for number, rid in enumerate(first + rest):
        reply = pipeline.replies[rid]
        assert (reply.lines, len(reply.offsets), reply.offsets[0]) == (3, 3, reply.offset)
        for k, offset in enumerate(reply.offsets):
            line = data[offset : data.index(b"\n", offset)]
            assert json.loads(line) == {"n": number, "k": k}
    assert pipeline.writes.counters["records"] == 60


def test_a_disk_that_fills_at_group_k_leaves_exactly_the_groups_before_it(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = pipeline.send(range(4), group=4)
    pipeline.drain()
    fail_once(monkeypatch, errno.ENOSPC)  # the next write only: half of it, then ENOSPC
    rest = pipeline.send(range(4, 10), after="aid-00003", group=4)
    pipeline.drain()  # 4..9 in one write, which fails: 4 answered disk_full, 5..9 refused
    assert (
        pipeline.codes(first + rest) == ["appended"] * 4 + ["disk_full"] + ["pipeline_broken"] * 5
    )
    assert pipeline.numbers() == [n for n in range(4) for _ in range(4)]  # the half cut off
    offsets = [o for rid in first for o in pipeline.replies[rid].offsets]
    assert offsets == [i * len('{"n":0,"k":0}\n') for i in range(16)]
