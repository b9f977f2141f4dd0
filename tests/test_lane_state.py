"""LaneState without thespian: a recording host, files answered by hand."""

from __future__ import annotations

from typing import Any

from sessionlane.actors.lane_state import ChannelLost, LaneState
from sessionlane.messages.internal import FileReply, FileRestarted, LaneCall, LaneRef
from sessionlane.messages.wire import (
    Abandon,
    Abandoned,
    Acquire,
    Append,
    Error,
    Granted,
    Released,
    Reply,
    Revoked,
)

A = "/srv/a.jsonl"
B = "/srv/b.jsonl"


class Host:
    def __init__(self) -> None:
        self.calls: list[LaneCall] = []
        self.agent: list[Reply] = []
        self.done = False

    def call(self, call: LaneCall) -> None:
        self.calls.append(call)

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
        granted = Granted(id=rid, lease=f"lease-{path}", fence=1, path=path, purpose="prompt")
        lane.file_reply(FileReply(path=path, message=granted, held=granted.lease, lane="chat#1"))
    host.calls.clear()
    host.agent.clear()
    return lane, host


def answer(lane: LaneState, call: LaneCall, leases: list[str]) -> None:
    reply = Abandoned(id=call.request.id, leases=leases)
    lane.file_reply(FileReply(path=call.path, message=reply, held=None, lane="chat#1"))


def abandons(host: Host) -> dict[str, Any]:
    return {c.path: c for c in host.calls if isinstance(c.request, Abandon)}


def test_an_abandon_of_every_path_is_answered_once_with_all_the_leases() -> None:
    lane, host = holding_two_files()
    lane.request(Abandon(id=7, lane="chat"))
    sent = abandons(host)
    assert sorted(sent) == [A, B]
    answer(lane, sent[A], [f"lease-{A}"])
    assert host.agent == [], "one file has not answered yet"
    answer(lane, sent[B], [f"lease-{B}"])
    assert host.agent == [Abandoned(id=7, leases=sorted([f"lease-{A}", f"lease-{B}"]))]


def test_a_file_that_died_before_answering_an_abandon_counts_as_answered_whichever_it_was() -> None:
    for dead, alive in ((A, B), (B, A)):
        lane, host = holding_two_files()
        lane.request(Abandon(id=7, lane="chat"))
        sent = abandons(host)
        lane.file_restarted(FileRestarted(path=dead, incarnation=1))
        answer(lane, sent[alive], [f"lease-{alive}"])
        done = [m for m in host.agent if isinstance(m, Abandoned)]
        assert done == [Abandoned(id=7, leases=[f"lease-{alive}"])], (dead, host.agent)


def test_a_closing_lane_finishes_even_if_a_file_dies_while_it_abandons() -> None:
    lane, host = holding_two_files()
    assert lane.agent_gone("connection closed")
    sent = abandons(host)
    lane.file_restarted(FileRestarted(path=A, incarnation=1))
    assert not host.done
    answer(lane, sent[B], [f"lease-{B}"])
    assert host.done, "closed without waiting for the close timeout"


def test_a_lost_channel_revokes_its_files_leases_requeues_acquires_and_answers_writes_unknown() -> (
    None
):
    lane, host = holding_two_files()
    lane.request(Acquire(id=3, lane="chat", path=A, purpose="prompt"))
    lane.request(Append(id=4, lease=f"lease-{A}", fence=1, records=[{"n": 1}]))
    host.calls.clear()
    lane.channel_lost(ChannelLost(path=A, aliases=[A], incarnation=1, reason="channel closed"))
    assert Revoked(lease=f"lease-{A}", path=A, reason="actor_restart") in host.agent
    assert [c.request.id for c in host.calls] == [3], "the waiting acquire is sent again"
    (error,) = [m for m in host.agent if isinstance(m, Error)]
    assert (error.id, error.code) == (4, "unknown_outcome"), "the append may be in the file"
    assert "channel" in error.detail and "read it" in error.detail
    assert lane.knows(f"lease-{B}") and f"lease-{A}" not in lane.leases, "B is untouched"


def test_a_lane_knows_the_leases_it_holds_and_those_it_held_lately() -> None:
    lane, _ = holding_two_files()
    assert lane.knows(f"lease-{A}") and not lane.knows("lease-other")
    released = FileReply(path=A, message=Released(id=9, lease=f"lease-{A}"), lane="chat#1")
    lane.file_reply(released)
    assert f"lease-{A}" not in lane.leases and lane.knows(f"lease-{A}"), "a tombstone"


def test_an_owner_abandoning_the_lanes_leases_reaches_the_agent_as_revoked_member_lost() -> None:
    lane, host = holding_two_files()
    dropped = Abandoned(id=None, leases=[f"lease-{A}"])
    lane.file_reply(FileReply(path=A, message=dropped, held=None, lane="chat#1"))
    assert host.agent == [Revoked(lease=f"lease-{A}", path=A, reason="member_lost")]
    assert lane.leases == {f"lease-{B}": B}
    lane.file_restarted(FileRestarted(path=A))
    assert len(host.agent) == 1, "told once, not again when the route is then lost"
