"""LaneState without thespian: a recording host, files answered by hand."""

from __future__ import annotations

from typing import Any

from sessionlane.actors.lane_state import ChannelLost, LaneState
from sessionlane.actors.paths import lease_route
from sessionlane.messages.internal import FileReply, FileRestarted, LaneCall, LaneRef
from sessionlane.messages.wire import (
    Abandon,
    Abandoned,
    Acquire,
    Append,
    Error,
    Granted,
    Release,
    Reply,
    Revoked,
)

A = "/srv/a.jsonl"
B = "/srv/b.jsonl"


def lease(path: str, fence: int = 1) -> str:
    """A lease id as the file of ``path`` makes it: its route, then the fence."""
    return f"{lease_route(path)}-{fence}"


class Host:
    def __init__(self) -> None:
        self.calls: list[LaneCall] = []
        self.agent: list[Reply] = []
        self.done = False

    def call(self, call: LaneCall) -> None:
        self.calls.append(call)

    def route_of(self, lease: str) -> str | None:
        return next((p for p in (A, B) if lease.startswith(lease_route(p) + "-")), None)

    def to_agent(self, lane: LaneState, message: Reply) -> None:
        self.agent.append(message)

    def closed(self, lane: LaneState) -> None:
        self.done = True


def holding_two_files() -> tuple[LaneState, Host]:
    """A lane holding a lease on each of A and B (granted by hand)."""
    host = Host()
    lane = LaneState(LaneRef(uid="chat#1", name="chat", address=None), host)
    for rid, path in ((1, A), (2, B)):
        lane.request(Acquire(id=rid, lane="chat", path=path, purpose="prompt"))
        granted = Granted(id=rid, lease=lease(path), fence=1, path=path, purpose="prompt")
        lane.file_reply(FileReply(path=path, message=granted, lane="chat#1"))
    host.calls.clear()
    host.agent.clear()
    return lane, host


def answer(lane: LaneState, call: LaneCall, leases: list[str]) -> None:
    reply = Abandoned(id=call.request.id, leases=leases)
    lane.file_reply(FileReply(path=call.path, message=reply, lane="chat#1"))


def abandons(host: Host) -> dict[str, Any]:
    return {c.path: c for c in host.calls if isinstance(c.request, Abandon)}


def test_an_abandon_of_every_path_is_answered_once_with_all_the_leases() -> None:
    lane, host = holding_two_files()
    lane.request(Abandon(id=7, lane="chat"))
    sent = abandons(host)
    assert sorted(sent) == [A, B]
    answer(lane, sent[A], [lease(A)])
    assert host.agent == [], "one file has not answered yet"
    answer(lane, sent[B], [lease(B)])
    assert host.agent == [Abandoned(id=7, leases=sorted([lease(A), lease(B)]))]


def test_a_file_that_died_before_answering_an_abandon_counts_as_answered_whichever_it_was() -> None:
    for dead, alive in ((A, B), (B, A)):
        lane, host = holding_two_files()
        lane.request(Abandon(id=7, lane="chat"))
        sent = abandons(host)
        lane.file_restarted(FileRestarted(path=dead, incarnation=1))
        answer(lane, sent[alive], [lease(alive)])
        done = [m for m in host.agent if isinstance(m, Abandoned)]
        assert done == [Abandoned(id=7, leases=[lease(alive)])], (dead, host.agent)


def test_a_closing_lane_finishes_even_if_a_file_dies_while_it_abandons() -> None:
    lane, host = holding_two_files()
    assert lane.agent_gone("connection closed")
    sent = abandons(host)
    lane.file_restarted(FileRestarted(path=A, incarnation=1))
    assert not host.done
    answer(lane, sent[B], [lease(B)])
    assert host.done, "closed without waiting for the close timeout"


def test_a_lost_channel_revokes_its_files_lease_requeues_acquires_and_answers_writes_unknown() -> (
    None
):
    lane, host = holding_two_files()
    lane.request(Acquire(id=3, lane="chat", path=A, purpose="prompt"))
    lane.request(Append(id=4, lease=lease(A), fence=1, records=[{"n": 1}]))
    assert host.calls[-1].path == A, "the append is routed by its lease id"
    host.calls.clear()
    lost = ChannelLost(
        path=A, aliases=[A], incarnation=1, reason="channel closed", holder=("chat#1", lease(A))
    )
    lane.channel_lost(lost)
    revoked = [m for m in host.agent if isinstance(m, Revoked)]
    assert revoked == [Revoked(lease=lease(A), path=A, reason="actor_restart")], "B untouched"
    assert [c.request.id for c in host.calls] == [3], "the waiting acquire is sent again"
    (error,) = [m for m in host.agent if isinstance(m, Error)]
    assert (error.id, error.code) == (4, "unknown_outcome"), "the append may be in the file"
    assert "channel" in error.detail and "read it" in error.detail


def test_a_lost_lease_of_another_lane_is_not_reported_to_this_one() -> None:
    lane, host = holding_two_files()
    lost = ChannelLost(
        path=A, aliases=[A], incarnation=1, reason="gone", holder=("other#2", lease(A, 9))
    )
    lane.channel_lost(lost)
    assert host.agent == []


def test_a_lease_without_a_route_is_refused_by_the_lane_and_sent_nowhere() -> None:
    lane, host = holding_two_files()
    lane.request(Release(id=5, lease="0123456789abcdef-3"))
    lane.request(Append(id=6, lease="not-a-lease", fence=1, records=[{"n": 1}]))
    assert host.calls == []
    codes = [(m.id, m.code) for m in host.agent if isinstance(m, Error)]
    assert codes == [(5, "not_holder"), (6, "stale_fence")]


def test_an_owner_abandoning_the_lanes_leases_reaches_the_agent_as_revoked_member_lost() -> None:
    lane, host = holding_two_files()
    dropped = Abandoned(id=None, leases=[lease(A)])
    lane.file_reply(FileReply(path=A, message=dropped, lane="chat#1"))
    assert host.agent == [Revoked(lease=lease(A), path=A, reason="member_lost")]
