"""A lease on a lost member's file is asked back by its holder's lane (issue #22), unit level.

The lane (``LaneState`` with a recording host, files answered by hand) and the Registry's
federation (a fake host and clock, from ``test_convention``). The same with real members and a
real ``kill -9``: ``tests/test_convention_faults.py``.
"""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from test_convention import HERE, THERE, Clock, FakeHost, acknowledge
from test_lane_state import A, Host, lease

from sessionlane.actors.federation import Federation
from sessionlane.actors.holder_reclaim import HolderReclaims
from sessionlane.actors.lane_state import LaneState
from sessionlane.messages.convention import Members
from sessionlane.messages.internal import FileReply, FileRestarted, LaneCall, LaneRef, OpenChannel
from sessionlane.messages.wire import (
    Acquire,
    Append,
    Appended,
    Error,
    Granted,
    ReclaimTicket,
    Release,
    Revoked,
)

SECRET = "s" * 32
UID = "chat#1"


def holding_a_lease() -> tuple[LaneState, Host]:
    host = Host()
    lane = LaneState(LaneRef(uid=UID, name="chat", address=None), host)
    lane.request(Acquire(id=1, lane="chat", path=A, purpose="write", priority="background"))
    granted = Granted(id=1, lease=lease(A), fence=3, path=A, purpose="write", secret=SECRET)
    lane.file_reply(FileReply(path=A, message=granted, lane=UID))
    host.calls.clear()
    host.agent.clear()
    return lane, host


def append(rid: int, aid: str | None) -> Append:
    return Append(id=rid, lease=lease(A), fence=3, records=[{"n": rid}], aid=aid)


def member_lost(lane: LaneState, *, owner_lost: bool = True) -> None:
    lost = FileRestarted(path=A, owner_lost=owner_lost)
    lane.file_restarted(lost, (UID, lease(A)))


def answer(lane: LaneState, call: LaneCall, message: object) -> None:
    lane.file_reply(FileReply(path=A, message=message, lane=UID))  # type: ignore[arg-type]


def test_a_lease_whose_member_was_lost_is_asked_back_and_its_holder_never_told() -> None:
    lane, host = holding_a_lease()
    lane.request(append(2, "aid-0002"))  # in flight when the member is lost
    host.calls.clear()

    member_lost(lane)

    assert host.agent == [], "no revoked, no error: the lease is being reclaimed"
    (reclaim,) = host.calls
    assert isinstance(reclaim.request, Acquire)
    assert (reclaim.lane.uid, reclaim.path, reclaim.canonical) == (UID, A, True)
    assert reclaim.request.reclaim == ReclaimTicket(lease=lease(A), fence=3, secret=SECRET)
    assert (reclaim.request.lane, reclaim.request.purpose) == ("chat", "write")
    assert reclaim.request.priority == "background"

    lane.request(append(3, "aid-0003"))  # made while the lease is being reclaimed: held back
    assert len(host.calls) == 1

    back = Granted(
        id=reclaim.request.id, lease=lease(A), fence=3, path=A, purpose="write", secret=SECRET
    )
    answer(lane, reclaim, back)
    assert host.agent == [], "the reclaim's answer is the lane's own"
    resent = [c.request for c in host.calls[1:]]
    expected = [(2, "aid-0002"), (3, "aid-0003")]
    assert [(r.id, getattr(r, "aid", None)) for r in resent] == expected, (
        "the append in flight first, with its aid, then the one made meanwhile"
    )


def test_a_refused_reclaim_revokes_the_lease_and_its_write_in_flight_has_an_unknown_outcome() -> (
    None
):
    lane, host = holding_a_lease()
    lane.request(append(2, "aid-0002"))
    lane.request(append(3, None))  # no aid: cannot be sent twice
    host.calls.clear()

    member_lost(lane)
    (reclaim,) = host.calls
    assert [(type(m).__name__, getattr(m, "code", None)) for m in host.agent] == [
        ("Error", "unknown_outcome")
    ], "the append without an aid is answered at once"
    assert host.agent[0].id == 3
    host.agent.clear()
    lane.request(append(4, "aid-0004"))

    refused = Error(id=reclaim.request.id, code="reclaim_refused", detail="grace over", path=A)
    answer(lane, reclaim, refused)

    revoked, unknown = host.agent
    assert revoked == Revoked(lease=lease(A), path=A, reason="actor_restart")
    assert isinstance(unknown, Error) and (unknown.id, unknown.code) == (2, "unknown_outcome")
    assert [c.request.id for c in host.calls[1:]] == [4], (
        "the append made meanwhile goes to the owner, which refuses it: never written"
    )


def test_an_append_that_releases_is_sent_again_when_its_lease_is_not_reclaimed() -> None:
    """It may have released the lease itself before the loss: the owner answers it as written
    (its lease record keeps it); refused, its outcome is unknown, not "not written"."""
    for outcome in ("released before the loss", "refused"):
        lane, host = holding_a_lease()
        fused = append(2, "aid-0002").model_copy(update={"release": True})
        lane.request(fused)
        host.calls.clear()
        member_lost(lane)
        (reclaim,) = host.calls
        refused = Error(id=reclaim.request.id, code="reclaim_refused", detail="gone", path=A)
        answer(lane, reclaim, refused)
        resent = host.calls[-1]
        assert resent.request == fused, "sent again as it was, with its aid"
        host.agent.clear()
        if outcome == "refused":
            answer(lane, resent, Error(id=2, code="stale_fence", detail="not current", path=A))
            [told] = host.agent
            assert isinstance(told, Error) and (told.id, told.code) == (2, "unknown_outcome")
        else:
            written = Appended(id=2, offset=0, lines=1, fence=3, released=True)
            answer(lane, resent, written)
            assert host.agent == [written]


def test_the_owner_telling_the_holder_itself_ends_the_reclaim_and_it_is_told_once() -> None:
    lane, host = holding_a_lease()
    member_lost(lane)
    (reclaim,) = host.calls
    told = Revoked(lease=lease(A), path=A, reason="member_lost")
    lane.file_reply(FileReply(path=A, message=told, lane=UID))
    refused = Error(id=reclaim.request.id, code="reclaim_refused", path=A)
    answer(lane, reclaim, refused)
    assert host.agent == [told]


def test_an_append_through_another_lane_of_the_connection_waits_for_the_reclaim() -> None:
    host, shared = Host(), HolderReclaims()
    holder = LaneState(LaneRef(uid=UID, name="chat", address=None), host, shared)
    own = LaneState(LaneRef(uid="c1/", name="(connection)", address=None), host, shared)
    holder.request(Acquire(id=1, lane="chat", path=A, purpose="write"))
    granted = Granted(id=1, lease=lease(A), fence=3, path=A, purpose="write", secret=SECRET)
    holder.file_reply(FileReply(path=A, message=granted, lane=UID))
    own.request(append(2, "aid-0002"))  # a request naming only the lease: the connection's lane
    host.calls.clear()
    host.agent.clear()

    lost = FileRestarted(path=A, owner_lost=True)
    own.file_restarted(lost, (UID, lease(A)))  # the connection's lane hears of it first
    holder.file_restarted(lost, (UID, lease(A)))
    assert host.agent == []
    (reclaim,) = host.calls
    assert reclaim.lane.uid == UID, "asked back by the lane that holds it"
    own.request(append(3, "aid-0003"))
    assert len(host.calls) == 1

    back = granted.model_copy(update={"id": reclaim.request.id})
    holder.file_reply(FileReply(path=A, message=back, lane=UID))
    assert [(c.lane.uid, c.request.id) for c in host.calls[1:]] == [("c1/", 2), ("c1/", 3)]
    assert host.agent == []


def test_a_lost_actor_of_a_live_member_revokes_at_once_as_before() -> None:
    lane, host = holding_a_lease()
    member_lost(lane, owner_lost=False)
    assert host.agent == [Revoked(lease=lease(A), path=A, reason="actor_restart")]
    assert host.calls == []


def test_a_lease_granted_without_a_secret_is_revoked_when_its_member_is_lost() -> None:
    host = Host()
    lane = LaneState(LaneRef(uid=UID, name="chat", address=None), host)
    lane.request(Acquire(id=1, lane="chat", path=A, purpose="write"))
    granted = Granted(id=1, lease=lease(A), fence=3, path=A, purpose="write")
    lane.file_reply(FileReply(path=A, message=granted, lane=UID))
    host.agent.clear()
    member_lost(lane)
    assert host.agent == [Revoked(lease=lease(A), path=A, reason="actor_restart")]


# The Registry holds the reclaim until the member answers again ------------------------------


THERE_PATH = "/srv/there/a.jsonl"


def reclaim_open(nonce: int = 1, *, reclaim: bool = True) -> OpenChannel:
    """A link's first contact whose first queued call is a reclaim (or not)."""
    return OpenChannel(path=THERE_PATH, nonce=nonce, reclaim=reclaim)


def lost_federation(grace_ms: int = 10_000) -> tuple[Federation, FakeHost, Clock]:
    """THERE was used, then fell silent for longer than the member timeout."""
    host, clock = FakeHost(), Clock()
    fed = Federation(host, HERE, 2_000, clock=clock, reclaim_grace_ms=grace_ms)
    fed.on_members(Members(version=1, members=[HERE, THERE]), None)
    fed.route_open(reclaim_open(reclaim=False), "lane1")
    clock.now += 2_001
    fed.tick()
    lost = [m for t, m in host.take() if isinstance(m, FileRestarted)]
    assert [(m.path, m.owner_lost) for m in lost] == [(THERE_PATH, grace_ms > 0)]
    return fed, host, clock


def forwarded_opens(host: FakeHost) -> list[tuple[int, bool]]:
    """(nonce, reclaim) of the first contacts forwarded to the owner."""
    return [(m.open.nonce, m.open.reclaim) for _, m in host.sent if type(m).__name__ == "Forwarded"]


def test_a_reclaims_first_contact_with_a_lost_member_is_held_and_sent_once_it_answers() -> None:
    fed, host, clock = lost_federation()
    assert fed.route_open(reclaim_open(), "lane1")
    assert host.refused() == [], "held, not refused"
    clock.now += 1_000
    fed.tick()  # the member is probed again (a new relay) ...
    assert forwarded_opens(host) == [], "... but nothing is sent before it answers"
    acknowledge(fed, host)
    assert forwarded_opens(host) == [(1, True)]


def test_a_link_asking_again_replaces_its_held_first_contact_and_keeps_its_deadline() -> None:
    fed, host, clock = lost_federation()
    fed.route_open(reclaim_open(1), "lane1")
    clock.now += 6_000
    fed.route_open(reclaim_open(2), "lane1")  # its open timed out: asked again
    clock.now += 5_999
    fed.tick()
    assert host.refused() == []
    clock.now += 2
    fed.tick()
    assert [(o.nonce, o.code) for o in host.refused()] == [(2, "unavailable")], "one, the last"


def test_a_reclaim_for_a_member_back_under_a_new_incarnation_goes_to_it() -> None:
    fed, host, _clock = lost_federation()
    fed.route_open(reclaim_open(), "lane1")
    again = THERE.model_copy(update={"incarnation": "there-2"})
    fed.on_members(Members(version=2, members=[HERE, again]), None)
    assert forwarded_opens(host) == [(1, True)]
    assert host.created[-1]["sessionlane.incarnation"] == "there-2"


def test_a_held_reclaim_gives_up_after_the_grace_and_the_member_timeout() -> None:
    fed, host, clock = lost_federation()
    fed.route_open(reclaim_open(), "lane1")
    clock.now += 11_999
    fed.tick()
    assert host.refused() == []
    clock.now += 2
    fed.tick()
    assert [(o.nonce, o.code) for o in host.refused()] == [(1, "unavailable")]


def test_asking_again_without_the_reclaim_ends_the_hold_and_is_refused_at_once() -> None:
    fed, host, _clock = lost_federation()
    fed.route_open(reclaim_open(1), "lane1")
    fed.route_open(reclaim_open(2, reclaim=False), "lane1")  # its lane abandoned the path
    assert [(o.nonce, o.code) for o in host.refused()] == [(2, "unavailable")]
    assert not fed.parked, "nothing is held for it any more"


def test_without_a_reclaim_grace_lanes_are_told_at_once_and_reclaims_refused() -> None:
    fed, host, _clock = lost_federation(grace_ms=0)
    fed.route_open(reclaim_open(), "lane1")
    assert [o.code for o in host.refused()] == ["unavailable"]


# Any interleaving: each write answered once, the holder told at most once ----------------------


class HolderModel(RuleBasedStateMachine):
    """A connection's two lanes (the holder's, and the connection's own through which its
    lease's appends go) under losses of the owner member, reclaims granted or refused in any
    order, the owner's own ``revoked``, and answers from the file. The file answers only calls
    sent since the last loss (a lost member never answers)."""

    def __init__(self) -> None:
        super().__init__()
        self.host, shared = Host(), HolderReclaims()
        self.holder = LaneState(LaneRef(uid=UID, name="chat", address=None), self.host, shared)
        self.own = LaneState(
            LaneRef(uid="c1/", name="(connection)", address=None), self.host, shared
        )
        self.lanes = {UID: self.holder, "c1/": self.own}
        self.holder.request(Acquire(id=1, lane="chat", path=A, purpose="write"))
        granted = Granted(id=1, lease=lease(A), fence=3, path=A, purpose="write", secret=SECRET)
        self.holder.file_reply(FileReply(path=A, message=granted, lane=UID))
        self.host.agent.clear()
        self.held = True  # as the gateway's links see it (the holder of a loss)
        self.sent = len(self.host.calls)  # calls before this index went to a lost member
        self.asked: list[int] = []
        self.next_id = 10

    def live(self) -> list[LaneCall]:
        return self.host.calls[self.sent :]

    def reply(self, call: LaneCall, message: Any) -> None:
        self.host.calls.remove(call)  # a live one: after ``sent``, which stays valid
        lane = self.lanes[call.lane.uid]
        lane.file_reply(FileReply(path=A, message=message, lane=call.lane.uid))

    @rule(aid=st.booleans())
    def append(self, aid: bool) -> None:
        self.next_id += 1
        self.asked.append(self.next_id)
        self.own.request(append(self.next_id, f"aid-{self.next_id:04d}" if aid else None))

    @rule()
    def member_lost(self) -> None:
        self.sent = len(self.host.calls)
        lost = FileRestarted(path=A, owner_lost=True)
        holder = (UID, lease(A)) if self.held else None
        self.held = False
        for lane in (self.own, self.holder):
            lane.file_restarted(lost, holder)

    @rule(granted=st.booleans())
    def reclaim_answered(self, granted: bool) -> None:
        reclaims = [c for c in self.live() if isinstance(c.request, Acquire)]
        if not reclaims:
            return
        call = reclaims[0]
        # An owner that revoked the lease itself (owner_revokes) refuses its reclaim.
        granted = granted and bool(self.holder.reclaims.reclaiming)
        message: Any = (
            Granted(id=call.request.id, lease=lease(A), fence=3, path=A, purpose="write")
            if granted
            else Error(id=call.request.id, code="reclaim_refused", path=A)
        )
        self.held = granted
        self.reply(call, message)

    @rule()
    def owner_revokes(self) -> None:
        if self.held or self.holder.reclaims.reclaiming:
            self.held = False
            event = Revoked(lease=lease(A), path=A, reason="member_lost")
            self.holder.file_reply(FileReply(path=A, message=event, lane=UID))

    @rule()
    def file_answers_an_append(self) -> None:
        appends = [c for c in self.live() if isinstance(c.request, Append)]
        if appends:
            call = appends[0]
            self.reply(call, Appended(id=call.request.id, offset=0, lines=1, fence=3))

    @invariant()
    def nothing_internal_reaches_the_agent_and_the_holder_is_told_once(self) -> None:
        ids = [getattr(m, "id", None) for m in self.host.agent]
        assert not any(isinstance(i, str) and i.startswith("_") for i in ids)
        answers = [i for i in ids if i is not None]
        assert len(answers) == len(set(answers)), "no request answered twice"
        revoked = [m for m in self.host.agent if isinstance(m, Revoked)]
        assert len(revoked) <= 1, revoked

    def teardown(self) -> None:
        # Settle: the member is back and answers everything still asked of it.
        for _ in range(50):
            if not self.live():
                break
            call = self.live()[0]
            if isinstance(call.request, Acquire):
                self.reply(call, Error(id=call.request.id, code="reclaim_refused", path=A))
            elif isinstance(call.request, Append):
                self.reply(call, Appended(id=call.request.id, offset=0, lines=1, fence=3))
            else:
                self.reply(call, Error(id=call.request.id, code="stale_fence", path=A))
        answered = [m.id for m in self.host.agent if getattr(m, "id", None) is not None]
        assert sorted(answered) == sorted(self.asked), "every append answered exactly once"


TestHolderModel = HolderModel.TestCase
TestHolderModel.settings = settings(max_examples=150, stateful_step_count=25, deadline=None)


def test_a_release_in_flight_when_the_member_is_lost_is_sent_again_once_reclaimed() -> None:
    """Answered ``unavailable``, the client moves on while the lease comes back to its lane:
    its next acquires are reentrant grants of a lease it never lets go (the partition suite
    saw that as fences shared by many turns). It waits for the reclaim like a write."""
    lane, host = holding_a_lease()
    lane.request(Release(id=2, lease=lease(A)))  # in flight when the member is lost
    host.calls.clear()
    member_lost(lane)
    assert host.agent == [], "not answered unavailable"
    (reclaim,) = host.calls
    back = Granted(
        id=reclaim.request.id, lease=lease(A), fence=3, path=A, purpose="write", secret=SECRET
    )
    answer(lane, reclaim, back)
    assert [(type(c.request).__name__, c.request.id) for c in host.calls[1:]] == [("Release", 2)]

    lane, host = holding_a_lease()
    lane.request(Release(id=2, lease=lease(A)))
    host.calls.clear()
    member_lost(lane)
    (reclaim,) = host.calls
    refused = Error(id=reclaim.request.id, code="reclaim_refused", detail="grace over", path=A)
    answer(lane, reclaim, refused)
    assert [(type(m).__name__, m.id) for m in host.agent if not isinstance(m, Revoked)] == [
        ("Released", 2)
    ], "not reclaimed: not held here any more, so released"
