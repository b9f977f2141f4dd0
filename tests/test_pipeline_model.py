"""A Hypothesis stateful model of the write path's pipeline rule (``Append.after``), pure.

One holder sends pipelines of appends, each naming the one before it (``after``); between
them it sends plain appends, loses and takes back its lease, and the disk fails writes and
syncs. The write path is the real one, its lease checks answered by the real lease table;
nothing performs its effects but this model, which keeps the log of what was written. What
must hold:

- a pipelined append is written only right after its predecessor in the log, under the same
  lease, with no failed write or sync between them;
- so each pipeline's written appends are a prefix of it: once one is not written, no later
  one is, even those already delivered;
- the rule refuses (``pipeline_broken``) only appends whose predecessor is not the last append
  written under their lease: one that meets no failure and no other append is written.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sessionlane.actors.lease_table import Grant, LeasePolicy, LeaseTable, Released
from sessionlane.actors.session_file_disk import WriteOutcome
from sessionlane.actors.session_file_writes import (
    CheckLease,
    Reply,
    WriteEffect,
    WriteOut,
    WritePath,
    call_key,
)
from sessionlane.messages.internal import LaneCall, LaneRef
from sessionlane.messages.wire import Append, Appended, Error

_CI = os.environ.get("HYPOTHESIS_PROFILE") == "ci"
PATH = "/sessions/p.jsonl"
LANE = "holder"
BREAK = ("break", None)
"""A failed write or sync in the log: no pipeline may go on across it."""


class PipelineModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1_000.0
        self.table = LeaseTable(PATH, LeasePolicy(), fence_floor=0)
        self.writes = WritePath(
            PATH,
            legacy=False,
            tail_unchecked=False,
            durability="fsync",
            max_record_bytes=100,
            unsynced=lambda: False,
        )
        self.lease: tuple[str, int] | None = None
        self.ids = 0
        self.aids = 0
        self.log: list[tuple[str, str | None]] = []  # (lease, aid) written, and BREAKs
        self.pipelines: list[list[str]] = []  # the aids of each pipeline, in order
        self.sent: dict[str, Append] = {}  # aid -> the append delivered
        self.outcome: dict[str, str] = {}  # aid -> "written" | error code
        self.acked: list[Any] = []  # call keys answered Appended
        self.failures: list[str] = []
        self.acquire()

    # The holder ----------------------------------------------------------------------------

    @rule()
    def acquire(self) -> None:
        if self.lease is not None:
            return
        self.ids += 1
        for fx in self.table.acquire((LANE, self.ids), LANE, "prompt", self.now):
            if isinstance(fx, Grant):
                self.lease = (fx.lease, fx.fence)

    @rule()
    def release(self) -> None:
        """The lease ends (its pipelines go on with its stale fence until they learn it)."""
        if self.lease is None:
            return
        self.ids += 1
        for fx in self.table.release((LANE, self.ids), LANE, self.lease[0], self.now):
            if isinstance(fx, Released):
                self.lease = None

    @rule()
    def start_pipeline(self) -> None:
        self.pipelines.append([])

    @rule(
        too_big=st.sampled_from([False, False, False, True]),
        plain=st.sampled_from([False, False, True]),
        drain=st.booleans(),
    )
    def append(self, too_big: bool, plain: bool, drain: bool) -> None:
        """The next append of the latest pipeline (``plain``: one outside any pipeline);
        ``drain``: performed at once, as the actor does unless the legacy lock is busy."""
        if not self.pipelines:
            self.pipelines.append([])
        lease, fence = self.lease or ("gone-1", 1)
        pipeline = self.pipelines[-1]
        self.aids += 1
        aid = f"aid-{self.aids:04d}"
        after = None if plain or not pipeline else pipeline[-1]
        if not plain:
            pipeline.append(aid)
        record: dict[str, Any] = {"pad": "x" * 200} if too_big else {"n": self.aids}
        request = Append(lease=lease, fence=fence, records=[record], aid=aid, after=after)
        self.ids += 1
        self.sent[aid] = request
        call = LaneCall(
            lane=LaneRef(uid=LANE, name=LANE, address=f"lane:{LANE}"),
            path=PATH,
            canonical=True,
            request=request.model_copy(update={"id": self.ids}),
        )
        self.perform(self.writes.append_under_lease(call, call.request))
        if drain:
            self.drain([])

    # The disk ------------------------------------------------------------------------------

    @rule(failures=st.lists(st.sampled_from(["ok", "ok", "ok", "disk_full", "moved"]), max_size=4))
    def drain(self, failures: list[str]) -> None:
        if not self.writes.may_drain():
            return
        self.failures = list(failures)
        assert self.writes.begin_drain() is None
        while (effects := self.writes.next_write()) is not None:
            self.perform(effects)
        self.perform(self.writes.end_drain())

    @rule()
    def sync_failed(self) -> None:
        """A sync failed: every ack it covered became an error and is forgotten."""
        if not self.acked:
            return
        for key in self.acked:
            self.writes.forget(key)
        self.acked.clear()
        self.log.append(BREAK)

    # Performing ----------------------------------------------------------------------------

    def perform(self, effects: list[WriteEffect]) -> None:
        for fx in effects:
            match fx:
                case WriteOut(op=op, rest=rest):
                    # one write of ``op`` and the rest of its pipeline behind it: all or none
                    kind = self.failures.pop(0) if self.failures else "ok"
                    if kind == "disk_full":
                        outcome = WriteOutcome(error=OSError(errno.ENOSPC, "No space left"))
                        self.log.append(BREAK)
                    elif kind == "moved":
                        outcome = WriteOutcome(offset=len(self.log), moved=True)
                        self.log.append(BREAK)
                    else:
                        outcome = WriteOutcome(offset=len(self.log))
                        for each in fx.ops:
                            assert each.aid is not None
                            if each.after is not None:
                                assert self.last_written() == (each.lease, each.after), (
                                    f"{each.aid} written after {self.log[-1:]}, "
                                    f"not after {each.after}"
                                )
                            self.log.append((each.lease, each.aid))
                    self.perform(self.writes.written(op, outcome, rest))
                case CheckLease(call=call, lease=lease, fence=fence, purpose=purpose):
                    verdict = self.table.check_write(call.lane.uid, lease, fence, purpose=purpose)
                    self.perform(self.writes.checked(fx, verdict))
                case Reply(message=Appended()):
                    self.outcome[str(fx.call.request.aid)] = "written"
                    self.acked.append(call_key(fx.call))
                case Reply(message=Error(code=code)):
                    request = fx.call.request
                    assert isinstance(request, Append) and request.aid is not None
                    if code == "pipeline_broken":
                        assert request.after is not None
                        assert self.last_written() != (request.lease, request.after)
                    self.outcome[request.aid] = code
                case _:
                    pass

    def last_written(self) -> tuple[str, str | None] | None:
        return self.log[-1] if self.log and self.log[-1] != BREAK else None

    # What must hold ------------------------------------------------------------------------

    @invariant()
    def each_pipeline_is_written_as_a_prefix(self) -> None:
        written = {aid for _, aid in self.log if aid is not None}
        for pipeline in self.pipelines:
            answered = [aid for aid in pipeline if aid in self.outcome]
            flags = [aid in written for aid in answered]
            assert flags == sorted(flags, reverse=True), f"a gap in {pipeline}: {flags}"


PipelineModel.TestCase.settings = settings(
    max_examples=400 if _CI else 150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_the_pipeline_rule = PipelineModel.TestCase
