"""The Registry's records alone: a path's restart window and the status/drain fan-outs."""

from __future__ import annotations

from sessionlane.actors.registry_records import RESTART_WINDOW_MS, FileEntry, Gather, Gathers
from sessionlane.messages.wire import FileStatus


def status(path: str) -> FileStatus:
    return FileStatus(path=path, fence=0, holder=None, queue=[], counters={})


def test_restarts_are_counted_over_the_last_window_only() -> None:
    entry = FileEntry(path="/r/a.jsonl", address="a", incarnation=1, key="1:/r/a.jsonl")
    assert entry.died(0.0) == 1
    assert entry.died(1000.0) == 2
    assert entry.died(RESTART_WINDOW_MS + 500.0) == 2  # the first one fell out of the window


def test_a_status_fan_out_completes_when_every_child_answered() -> None:
    gathers = Gathers()
    qid = gathers.start(Gather("gw", 7, {"k1", "k2"}))
    assert gathers.finish(qid) is None
    assert gathers.status(qid, "k1", status("/a")) is None
    done = gathers.status(qid, "k2", status("/b"))
    assert done is not None and [s.path for s in done.answers] == ["/a", "/b"]
    assert gathers.status(qid, "k2", status("/b")) is None  # answered once, then forgotten


def test_a_fan_out_with_no_children_is_complete_at_once() -> None:
    gathers = Gathers()
    qid = gathers.start(Gather("gw", 1, set()))
    done = gathers.finish(qid)
    assert done is not None and done.answers == []


def test_a_child_that_dies_completes_the_fan_outs_that_waited_for_it() -> None:
    gathers = Gathers()
    status_q = gathers.start(Gather("gw", 1, {"k1"}))
    drain_q = gathers.start(Gather("svc", None, {"k1", "k2"}, kind="drain"))
    [done] = gathers.gone("k1")
    assert done.kind == "status" and gathers.finish(status_q) is None
    assert [g.kind for g in gathers.drained("k2")] == ["drain"]
    assert gathers.finish(drain_q) is None


def test_a_timed_out_fan_out_answers_with_what_it_has() -> None:
    gathers = Gathers()
    qid = gathers.start(Gather("gw", 1, {"k1", "k2"}))
    gathers.status(qid, "k1", status("/a"))
    done = gathers.finish(qid, force=True)
    assert done is not None and done.waiting == {"k2"} and len(done.answers) == 1


def test_drained_ignores_status_fan_outs_and_unknown_children() -> None:
    gathers = Gathers()
    qid = gathers.start(Gather("gw", 1, {"k1"}))
    assert gathers.drained("k1") == [] and gathers.drained(None) == []
    assert gathers.status(qid, "k1", status("/a")) is not None
