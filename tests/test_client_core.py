"""The client's I/O-free core, without sockets: ``ClientCore``, the operations, the checks.

What both surfaces share is tested here once, by feeding the core what a socket would have
delivered and reading what it says to do; ``test_client.py`` and
``test_client_connections.py`` run the same behaviours end to end through both surfaces.
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any

import pytest
from tenacity import Retrying

from sessionlane.messages import handshake
from sessionlane.messages.codec import HEADER, decode_request
from sessionlane.messages.errors import (
    ERROR_CODES,
    BadFrame,
    Contended,
    InvalidRecord,
    LeaseRevoked,
    LeaseTimeout,
    NotHolder,
    PathNotAllowed,
    QueueFull,
    SessionLaneError,
    ShuttingDown,
    StaleFence,
    TooLarge,
    Unauthorized,
    Unavailable,
    UnknownOutcome,
    error_for,
)
from sessionlane.messages.wire import (
    Abandoned,
    AbortRequested,
    Acquire,
    Alive,
    Append,
    Appended,
    Challenge,
    Error,
    ExternalChange,
    Granted,
    Keepalive,
    Queued,
    Release,
    Released,
    Revoked,
    Rewritten,
    Skipped,
    Status,
    StatusReply,
    Welcome,
)
from sessionlane.system.client import _ops as ops
from sessionlane.system.client._core import (
    Answer,
    ClientCore,
    ConnectionLost,
    Link,
    Send,
    Settings,
)
from sessionlane.system.client._records import check_frame, check_records
from sessionlane.system.client._verify import service_refusal

SETTINGS = Settings("tcp://127.0.0.1:7420", None, keepalive=5.0, max_frame_bytes=1024)


def welcomed(core: ClientCore[str, None], now: float = 0.0) -> Link[str, None]:
    """A link of ``core`` that said hello and was welcomed."""
    link, _hello = core.opened(None, now)
    core.welcomed(link, Welcome(id=1, server="sessionlane test", protocol=1))
    return link


def granted(lease: str = "L1", fence: int = 7, path: str = "/s/a.jsonl", rid: Any = 2) -> Granted:
    return Granted(id=rid, lease=lease, fence=fence, path=path, purpose="prompt")


def run(op: ops.Op[Any], *outcomes: Any) -> tuple[list[Any], Any]:
    """Drive ``op`` with ``outcomes`` (replies, or errors thrown in): its requests, its result."""
    requests = []
    step = ops.advance(op, None)
    for outcome in outcomes:
        assert isinstance(step, ops.Call), f"finished early: {step}"
        requests.append(step.request)
        step = ops.advance(op, outcome)
    assert isinstance(step, ops.Finished), f"still calling: {step}"
    return requests, step.value


@pytest.fixture
def core() -> ClientCore[str, None]:
    return ClientCore(SETTINGS)


# Settings ----------------------------------------------------------------------------------


def test_settings_take_the_address_from_sessionlane_listen_and_strip_the_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SESSIONLANE_LISTEN", "127.0.0.1:9")
    settings = Settings.of(None, " s3cret\n")
    assert (settings.address, settings.token) == ("127.0.0.1:9", "s3cret")
    with pytest.raises(ValueError, match="HOST:PORT"):
        Settings.of("localhost", None)


def test_without_reconnect_for_a_refused_connect_is_tried_once() -> None:
    attempts = 0
    with pytest.raises(ConnectionRefusedError):
        for attempt in Retrying(**Settings("h:1", None).retry_policy()):
            with attempt:
                attempts += 1
                raise ConnectionRefusedError(111, "Connect call failed ('h', 1)")
    assert attempts == 1


def test_a_refused_connect_is_worded_by_the_system_whatever_the_surface_said() -> None:
    asyncio_words = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9)")
    error = Settings("127.0.0.1:9", None).unreachable(asyncio_words)
    assert error.detail == "cannot reach sessionlane at 127.0.0.1:9: Connection refused"
    assert "timed out" in Settings("h:1", None).unreachable(TimeoutError("timed out")).detail


def test_a_reply_may_take_the_requests_own_wait_plus_a_margin() -> None:
    settings = Settings("h:1", None, timeout=3.0)
    assert settings.reply_limit(None) == 13.0 and settings.reply_limit(60.0) == 70.0


# Connections and requests ------------------------------------------------------------------


def test_nothing_but_the_hello_goes_out_before_the_welcome(core: ClientCore[str, None]) -> None:
    link, hello = core.opened(None, 0.0)
    assert hello.type == "hello" and hello.client == f"python:{os.getpid()}"
    assert core.link is None  # requests of other callers wait for the reconnect
    assert core.keepalive(link, 100.0) == (5.0, None)
    core.welcomed(link, Welcome(id=1, server="sessionlane 1.0", protocol=1))
    assert core.link is link and core.server == "sessionlane 1.0"


def test_a_refused_hello_raises_its_error_and_the_link_is_not_used(
    core: ClientCore[str, None],
) -> None:
    link, _ = core.opened(None, 0.0)
    with pytest.raises(Unauthorized):
        core.welcomed(link, Error(id=1, code="unauthorized", detail="token"))
    assert core.link is None


# Verifying the service --------------------------------------------------------------------

TOKEN = "client-token-0123456789"


def test_with_a_token_the_hello_carries_a_nonce_and_the_service_must_prove_the_token() -> None:
    core: ClientCore[str, None] = ClientCore(Settings.of("127.0.0.1:9", TOKEN))
    link, hello = core.opened(None, 0.0)
    assert hello.token is None and hello.nonce is not None and len(hello.nonce) == 32
    theirs = os.urandom(32)
    proof = core.challenged(link, Challenge(id=1, nonce=theirs))
    assert proof is not None
    assert proof.proof == handshake.client_proof(TOKEN, hello.nonce, theirs)
    assert core.link is None, "nothing else goes out before the service proved the token"
    right = handshake.server_proof(TOKEN, hello.nonce, theirs)
    core.welcomed(link, Welcome(id=2, server="sessionlane/0.1", protocol=1, proof=right))
    assert core.link is link


@pytest.mark.parametrize(
    ("challenge", "proof", "why"),
    [
        (True, None, "did not prove it knows the token"),
        (True, b"x" * 32, "did not prove it knows the token"),
        (True, "client", "did not prove it knows the token"),  # our own proof, sent back
        (False, None, "did not ask for the token proof"),
    ],
)
def test_a_service_that_does_not_prove_the_token_is_refused_and_not_used(
    challenge: bool, proof: bytes | str | None, why: str
) -> None:
    core: ClientCore[str, None] = ClientCore(Settings.of("127.0.0.1:9", TOKEN))
    link, _hello = core.opened(None, 0.0)
    theirs = os.urandom(32)
    if challenge:
        sent = core.challenged(link, Challenge(id=1, nonce=theirs))
        assert sent is not None
        if proof == "client":
            proof = sent.proof
    assert not isinstance(proof, str)
    with pytest.raises(Unauthorized, match=why):
        core.welcomed(link, Welcome(id=2, server="impostor", protocol=1, proof=proof))
    assert core.link is None


def test_a_service_older_than_the_token_proof_is_named_as_such() -> None:
    core: ClientCore[str, None] = ClientCore(Settings.of("127.0.0.1:9", TOKEN))
    link, _ = core.opened(None, 0.0)
    older = Error(id=1, code="bad_frame", detail="nonce: Extra inputs are not permitted")
    with pytest.raises(Unauthorized, match=r"older than this client.*upgrade the service"):
        core.challenged(link, older)


def test_a_challenge_to_a_client_without_a_token_says_the_service_needs_one(
    core: ClientCore[str, None],
) -> None:
    link, hello = core.opened(None, 0.0)
    assert hello.nonce is None and hello.token is None
    with pytest.raises(Unauthorized, match="requires a token"):
        core.challenged(link, Challenge(id=1, nonce=os.urandom(32)))


def test_the_owner_of_the_services_socket_must_be_the_expected_user() -> None:
    me = os.geteuid()
    other = me + 1
    plain = Settings.of("127.0.0.1:9", None)
    assert service_refusal(plain, me) is None
    refusal = service_refusal(plain, other)
    assert refusal is not None
    assert f"runs as uid {other}, not uid {me} (this client's user)" in refusal
    assert f"pass service_user={other}" in refusal and "nothing was sent" in refusal
    assert "cannot tell which user" in (service_refusal(plain, None) or "")
    assert service_refusal(Settings.of("127.0.0.1:9", None, service_user=other), other) is None
    assert service_refusal(Settings.of("127.0.0.1:9", None, service_user="*"), None) is None
    with_token = Settings.of("127.0.0.1:9", TOKEN)
    assert service_refusal(with_token, other) is None, "with a token, the proof decides"
    assert service_refusal(with_token, None) is None
    named = Settings.of("127.0.0.1:9", TOKEN, service_user=str(me))
    assert "runs as uid" in (service_refusal(named, other) or "")
    assert Settings.of("x:1", None, service_user="root").service_user == 0
    with pytest.raises(ValueError, match="no such user"):
        Settings.of("x:1", None, service_user="no-such-user-here")


def test_request_ids_are_never_reused_across_connections(core: ClientCore[str, None]) -> None:
    first = welcomed(core)
    rid1, data = core.request(first, Status(), "w1", now=1.0)
    assert decode_request(data[HEADER.size :]) == Status(id=rid1)
    core.lost(first, "gone")
    second = welcomed(core)
    rid2, _ = core.request(second, Status(), "w2", now=2.0)
    assert rid2 > rid1 and second.pending == {rid2: "w2"} and second.last_sent == 2.0


def test_a_frame_over_max_frame_bytes_is_refused_and_nothing_is_registered(
    core: ClientCore[str, None],
) -> None:
    link = welcomed(core)
    big = Append(lane="a", path="/s/a.jsonl", records=[{"x": "y" * 2000}])
    with pytest.raises(TooLarge, match="nothing sent"):
        core.request(link, big, "w", now=1.0)
    assert link.pending == {} and link.last_sent == 0.0


def test_the_final_reply_wakes_its_waiter_and_queued_is_only_progress(
    core: ClientCore[str, None],
) -> None:
    link = welcomed(core)
    rid, _ = core.request(link, Status(), "w", now=1.0)
    assert core.received(link, Queued(id=rid, position=1)) is None
    reply = StatusReply(id=rid, files=[])
    assert core.received(link, reply) == Answer("w", reply)
    assert link.pending == {}
    assert core.received(link, reply) is None  # a reply to nobody is dropped


def test_a_grant_to_an_acquire_given_up_on_is_released_at_once(
    core: ClientCore[str, None], caplog: pytest.LogCaptureFixture
) -> None:
    link = welcomed(core)
    rid, _ = core.request(link, Acquire(lane="a", path="/s/a.jsonl", purpose="prompt"), "w", 1.0)
    core.given_up(link, rid, Acquire(lane="a", path="/s/a.jsonl", purpose="prompt"))
    assert core.received(link, Queued(id=rid, position=1)) is None
    with caplog.at_level(logging.INFO, logger="sessionlane.client"):
        action = core.received(link, granted(rid=rid))
    assert isinstance(action, Send)
    assert decode_request(action.data[HEADER.size :]) == Release(id=f"orphan{rid}", lease="L1")
    assert "releasing lease L1: its acquire was given up" in caplog.text
    assert core.leases == {}  # never tracked: no lease object exists for it


def test_only_an_acquire_or_a_recover_given_up_on_is_remembered(
    core: ClientCore[str, None],
) -> None:
    link = welcomed(core)
    rid, _ = core.request(link, Status(), "w", now=1.0)
    core.given_up(link, rid, Status())
    assert link.pending == {} and link.orphans == set()
    rid, _ = core.request(link, Acquire(lane="a", path="/p.jsonl", purpose="prompt"), "w", 1.0)
    core.received(link, granted(rid=rid))  # answered first: giving up now changes nothing
    core.given_up(link, rid, Acquire(lane="a", path="/p.jsonl", purpose="prompt"))
    assert link.orphans == set()


def test_a_keepalive_goes_out_when_nothing_was_sent_for_the_interval(
    core: ClientCore[str, None],
) -> None:
    link = welcomed(core, now=10.0)
    assert core.keepalive(link, 12.0) == (3.0, None)
    core.request(link, Status(), "w", now=14.0)  # a request counts as sending
    assert core.keepalive(link, 18.0) == (1.0, None)
    wait, data = core.keepalive(link, 19.5)
    assert wait == 5.0 and data is not None
    assert decode_request(data[HEADER.size :]) == Keepalive(id=f"ka{link.generation}")
    assert link.last_sent == 19.5


def test_a_lost_connection_revokes_every_lease_fails_its_waiters_and_warns_once(
    core: ClientCore[str, None], caplog: pytest.LogCaptureFixture
) -> None:
    link = welcomed(core)
    state = core.track(granted())
    core.request(link, Status(), "w", now=1.0)
    with caplog.at_level(logging.WARNING, logger="sessionlane.client"):
        assert core.lost(link, "connection reset") == ["w"]
        assert core.lost(link, "again") == []
    assert state.revoked == "connection_lost" and core.leases == {} and core.link is None
    assert caplog.messages == ["sessionlane tcp://127.0.0.1:7420: connection reset"]
    assert "connection reset" in core.lost_error(link).detail
    with pytest.raises(Unavailable, match="not connected"):
        core.request(link, Status(), "w", now=2.0)
    assert core.link_for(reconnect=True) is None  # the next call reconnects ...
    with pytest.raises(Unavailable, match="not connected"):
        core.link_for(reconnect=False)  # ... but never for a lease's own request


def test_a_closed_client_revokes_its_leases_quietly_and_opens_nothing_again(
    core: ClientCore[str, None], caplog: pytest.LogCaptureFixture
) -> None:
    link = welcomed(core)
    state = core.track(granted())
    with caplog.at_level(logging.WARNING, logger="sessionlane.client"):
        assert core.close() == []
    assert link.lost is not None and state.revoked == "connection_closed"
    assert caplog.messages == []
    with pytest.raises(Unavailable, match="closed"):
        core.link_for(reconnect=True)
    with pytest.raises(Unavailable, match="closed"):
        core.opened(None, 0.0)


def test_a_client_closed_during_its_hello_does_not_take_the_connection(
    core: ClientCore[str, None],
) -> None:
    link, _ = core.opened(None, 0.0)
    core.close()
    with pytest.raises(Unavailable, match="closed"):
        core.welcomed(link, Welcome(id=1, server="s", protocol=1))
    assert core.link is None


# Leases and events -------------------------------------------------------------------------


def test_events_reach_the_lease_they_name(core: ClientCore[str, None]) -> None:
    link = welcomed(core)
    a, b = core.track(granted("A")), core.track(granted("B"))
    core.received(link, AbortRequested(lease="A", path="/s/a.jsonl", grace_ms=500))
    core.received(link, ExternalChange(lease="B", path="/s/a.jsonl", kind="truncate"))
    core.received(link, Revoked(lease="B", path="/s/a.jsonl", reason="max_hold"))
    core.received(link, Revoked(lease="unknown", path="/s/a.jsonl", reason="max_hold"))
    assert (a.abort_requested, a.revoked) == (True, None)
    assert (b.external_changes, b.revoked) == (["truncate"], "max_hold")
    assert set(core.leases) == {"A"}


def test_a_reentrant_grant_shares_the_state_and_the_last_level_releases_it(
    core: ClientCore[str, None],
) -> None:
    outer = core.track(granted())
    inner = core.track(granted())
    assert inner is outer and outer.holds == 2
    core.untrack(inner)
    assert not outer.released and core.leases == {"L1": outer}
    core.untrack(outer)
    assert outer.released and core.leases == {}
    with pytest.raises(LeaseRevoked, match="released"):
        outer.check_usable()


def test_abandoned_leases_are_revoked(core: ClientCore[str, None]) -> None:
    kept, dropped = core.track(granted("K")), core.track(granted("D"))
    _, result = run(ops.abandon(core, "lane", None, None), Abandoned(id=1, leases=["D"]))
    assert result == ["D"] and dropped.revoked == "abandoned" and kept.revoked is None


# Operations --------------------------------------------------------------------------------


def test_acquire_sends_its_limits_in_milliseconds_and_anchors_a_relative_path(
    core: ClientCore[str, None],
) -> None:
    op = ops.acquire(
        core, "lane", "background", "rel.jsonl", "write",
        wait_timeout=1.5, max_hold=0.0001, on_contention="skip",
    )  # fmt: skip
    (request,), state = run(op, granted(path=os.path.join(os.getcwd(), "rel.jsonl")))
    assert request.path == os.path.join(os.getcwd(), "rel.jsonl")
    assert (request.wait_timeout_ms, request.max_hold_ms, request.priority) == (
        1500,
        1,
        "background",
    )
    assert core.leases == {"L1": state} and state.fence == 7


def test_a_skipped_acquire_is_none_and_a_refused_one_raises_naming_the_path(
    core: ClientCore[str, None],
) -> None:
    def acquire() -> ops.Op[Any]:
        return ops.acquire(
            core, "l", "interactive", "/s/a.jsonl", "prompt",
            wait_timeout=None, max_hold=None, on_contention="fail",
        )  # fmt: skip

    assert run(acquire(), Skipped(id=1))[1] is None
    with pytest.raises(Contended) as caught:
        run(acquire(), Error(id=2, code="contended", detail="held"))
    assert caught.value.path == "/s/a.jsonl" and core.leases == {}


def test_a_revoked_or_released_lease_refuses_to_write_without_sending(
    core: ClientCore[str, None],
) -> None:
    lease = ops.LeaseView(core.track(granted()), "lane")
    lease.state.revoked = "max_hold"
    with pytest.raises(LeaseRevoked, match="max_hold") as revoked:
        run(ops.lease_append(core, lease, [{"n": 1}], None))
    assert (revoked.value.code, revoked.value.reason) == ("revoked", "max_hold")
    released = ops.LeaseView(core.track(granted("L2")), "lane")
    run(ops.release(core, released, quiet=False), Released(id=1, lease="L2"))
    with pytest.raises(LeaseRevoked, match="released") as gone:
        run(ops.rewrite(core, released, [{"n": 1}]))
    assert (gone.value.code, gone.value.reason) == ("revoked", "released")


def test_records_are_checked_before_anything_is_sent(core: ClientCore[str, None]) -> None:
    lease = ops.LeaseView(core.track(granted()), "lane")
    with pytest.raises(InvalidRecord):
        run(ops.lease_append(core, lease, [{"bad": float("nan")}], None))
    with pytest.raises(InvalidRecord, match="empty batch"):
        run(ops.lane_append(core, "lane", "/s/a.jsonl", [], None))
    (request,), lines = run(ops.rewrite(core, lease, []), Rewritten(id=1, lines=0, fence=7))
    assert request.records == [] and lines == 0  # a rewrite may empty the file


def test_a_write_whose_connection_was_lost_raises_lease_revoked(
    core: ClientCore[str, None],
) -> None:
    lease = ops.LeaseView(core.track(granted()), "lane")
    op = ops.lease_append(core, lease, [{"n": 1}], None)
    assert isinstance(ops.advance(op, None), ops.Call)
    lease.state.revoked = "connection_lost"  # what ``lost`` does before the error arrives
    with pytest.raises(LeaseRevoked, match="lost") as lost:
        ops.advance(op, Unavailable("connection lost before the reply"))
    assert (lost.value.code, lost.value.reason) == ("revoked", "connection_lost")


def test_a_write_that_is_only_late_stays_unavailable(core: ClientCore[str, None]) -> None:
    lease = ops.LeaseView(core.track(granted()), "lane")
    with pytest.raises(Unavailable, match="no reply"):
        run(ops.lease_append(core, lease, [{"n": 1}], None), Unavailable("no reply"))
    assert lease.revoked is None


def test_a_stale_fence_answer_marks_the_lease_revoked(core: ClientCore[str, None]) -> None:
    lease = ops.LeaseView(core.track(granted()), "lane")
    with pytest.raises(StaleFence):
        run(ops.lease_append(core, lease, [{"n": 1}], None), Error(id=1, code="stale_fence"))
    assert lease.revoked == "stale_fence"


def test_an_append_returns_where_it_landed(core: ClientCore[str, None]) -> None:
    lease = ops.LeaseView(core.track(granted()), "lane")
    reply = Appended(id=1, offset=10, lines=2, fence=7)
    (request,), result = run(ops.lease_append(core, lease, [{"a": 1}, {"b": 2}], "flush"), reply)
    assert (request.lease, request.fence, request.durability) == ("L1", 7, "flush")
    assert (result.offset, result.lines, result.fence) == (10, 2, 7)


def test_a_quiet_release_of_a_lease_already_gone_sends_nothing_and_forgets_it(
    core: ClientCore[str, None],
) -> None:
    lease = ops.LeaseView(core.track(granted()), "lane")
    lease.state.revoked = "max_hold"
    assert run(ops.release(core, lease, quiet=True)) == ([], None)
    assert lease.level_released and lease.state.holds == 0
    late = ops.LeaseView(core.track(granted("L2")), "lane")
    with pytest.raises(Unavailable):  # not quiet: the caller hears that no answer came
        run(ops.release(core, late, quiet=False), Unavailable("no reply"))
    assert late.level_released and core.leases == {}  # the level is given up either way


def test_a_release_refused_not_holder_raises_unless_quiet_and_each_level_releases_once(
    core: ClientCore[str, None],
) -> None:
    loud = ops.LeaseView(core.track(granted()), "lane")
    with pytest.raises(NotHolder):
        run(ops.release(core, loud, quiet=False), Error(id=1, code="not_holder"))
    quiet = ops.LeaseView(core.track(granted("L2")), "lane")
    assert run(ops.release(core, quiet, quiet=True), Error(id=2, code="not_holder")) == (
        [Release(lease="L2")],
        None,
    )
    assert run(ops.release(core, quiet, quiet=False)) == ([], None)  # already released


def test_a_release_abandoned_midway_still_releases_its_level(core: ClientCore[str, None]) -> None:
    lease = ops.LeaseView(core.track(granted()), "lane")
    op = ops.release(core, lease, quiet=False)
    assert isinstance(ops.advance(op, None), ops.Call)
    op.close()  # what a surface does when its caller is cancelled
    assert lease.level_released and lease.state.released


def test_recover_waits_its_grace_beyond_the_timeout_and_status_returns_the_reply(
    core: ClientCore[str, None],
) -> None:
    op = ops.recover(core, "/s/a.jsonl", "stuck", 2.5, "recovery")
    call = ops.advance(op, None)
    assert isinstance(call, ops.Call) and call.timeout == 2.5 + SETTINGS.timeout
    assert call.request.grace_ms == 2500
    finished = ops.advance(op, granted())
    assert isinstance(finished, ops.Finished) and core.leases == {"L1": finished.value}
    reply = StatusReply(id=1, files=[])
    assert run(ops.status(None), reply) == ([Status()], reply)


# Checks before sending ---------------------------------------------------------------------


def test_check_records_accepts_what_a_jsonl_line_can_hold() -> None:
    records = [{"a": [1, 2.5, "x", None, True, {"b": (1, 2)}]}]
    assert check_records(records, max_record_bytes=None) == records
    with pytest.raises(InvalidRecord, match="over max_record_bytes"):
        check_records([{"a": "x" * 100}], max_record_bytes=50)


def test_check_frame_measures_the_body_not_the_header() -> None:
    data = HEADER.pack(10) + b"x" * 10
    assert check_frame(data, 10) == data and check_frame(data, None) == data
    with pytest.raises(TooLarge):
        check_frame(data, 9)


# Errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls",
    [
        SessionLaneError,
        LeaseTimeout,
        Contended,
        LeaseRevoked,
        StaleFence,
        NotHolder,
        PathNotAllowed,
        InvalidRecord,
        QueueFull,
        TooLarge,
        Unauthorized,
        BadFrame,
        Unavailable,
        ShuttingDown,
    ],
)
def test_exceptions_pickle_with_their_fields(cls: type[SessionLaneError]) -> None:
    error = cls("what happened", path="/sessions/a.jsonl")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls
    assert (copy.code, copy.detail, copy.path) == (error.code, "what happened", error.path)
    assert str(copy) == str(error)
    assert isinstance(copy, SessionLaneError)


def test_every_wire_code_maps_to_its_exception() -> None:
    expected = {
        "lease_timeout": LeaseTimeout,
        "contended": Contended,
        "stale_fence": StaleFence,
        "not_holder": NotHolder,
        "path_not_allowed": PathNotAllowed,
        "invalid_record": InvalidRecord,
        "too_large": TooLarge,
        "unauthorized": Unauthorized,
        "bad_frame": BadFrame,
        "queue_full": QueueFull,
        "unavailable": Unavailable,
        "shutting_down": ShuttingDown,
    }
    for code in ERROR_CODES:
        error = error_for(code, "d", "/p")
        assert error.code == code and error.detail == "d" and error.path == "/p"
        assert type(error) is expected.get(code, type(error))
        assert pickle.loads(pickle.dumps(error)).code == code
    assert set(expected) <= ERROR_CODES


def test_a_write_whose_connection_ended_after_it_was_sent_has_an_unknown_outcome(
    core: ClientCore[str, None],
) -> None:
    lease = ops.LeaseView(core.track(granted()), "lane")
    op = ops.lease_append(core, lease, [{"n": 1}], None)
    assert isinstance(ops.advance(op, None), ops.Call)
    lease.state.revoked = "connection_lost"  # what ``lost`` does before the error arrives
    with pytest.raises(UnknownOutcome, match="read it") as lost:
        ops.advance(op, ConnectionLost("connection lost before the reply"))
    assert (lost.value.code, lost.value.reason) == ("unknown_outcome", "connection_lost")
    assert isinstance(lost.value, LeaseRevoked), "the lease is gone as well"
    with pytest.raises(UnknownOutcome):
        run(ops.lane_append(core, "lane", "/s/a.jsonl", [{"n": 2}], None), ConnectionLost("x"))
    with pytest.raises(UnknownOutcome):
        run(
            ops.lease_append(core, ops.LeaseView(core.track(granted("L2")), "lane"), [{}], None),
            Error(id=1, code="unknown_outcome", detail="route lost"),
        )


@pytest.mark.parametrize("gateway", ["answers", "is lost"])
def test_a_direct_channel_closing_under_a_lease_asks_the_gateway_why(gateway: str) -> None:
    """A direct channel that closes under a held lease, while the gateway's connection is up:
    the file's process ended, or the whole service did and the gateway's connection has not
    said so yet. The core asks the gateway (a keepalive); its answer means the service lives
    on (``actor_restart``, as the gateway says of the leases it routed), its loss means the
    service is gone (``connection_lost``). Nothing is decided before either."""
    core: ClientCore[str, None] = ClientCore(SETTINGS)
    link = welcomed(core)
    channel = core.direct_opened(("/s/a.jsonl", "a"), None, 1.0)
    rid, _ = core.request(channel, Acquire(lane="a", path="/s/a.jsonl", purpose="prompt"), "w", 1.0)
    answer = core.received(channel, granted(rid=rid))
    assert isinstance(answer, Answer)
    state = core.track(answer.reply, lane="a")
    assert core.probe() is None  # nothing orphaned: nothing to ask

    core.lost(channel, "closed by the file", ask=True)
    assert state.revoked is None and "L1" in core.leases  # not decided yet
    probe = core.probe()
    assert probe is not None and core.probe() is None  # one question at a time
    sent = decode_request(probe[HEADER.size :])
    assert isinstance(sent, Keepalive)
    core.received(link, Alive(id="ka-unrelated"))  # an answer to something else decides nothing
    assert state.revoked is None
    if gateway == "answers":
        core.received(link, Alive(id=sent.id))
        assert state.revoked == "actor_restart"
    else:
        core.lost(link, "connection closed by the service")
        assert state.revoked == "connection_lost"
    assert "L1" not in core.leases and not core.orphaned


def test_a_direct_channel_our_send_failed_on_ends_its_lease_at_once() -> None:
    """A send of ours that failed on a direct channel (``ask`` unset) asks nobody: the lease
    ends ``connection_lost`` before the failed call returns, as a failed gateway send does."""
    core: ClientCore[str, None] = ClientCore(SETTINGS)
    welcomed(core)
    channel = core.direct_opened(("/s/a.jsonl", "a"), None, 1.0)
    rid, _ = core.request(channel, Acquire(lane="a", path="/s/a.jsonl", purpose="prompt"), "w", 1.0)
    answer = core.received(channel, granted(rid=rid))
    assert isinstance(answer, Answer)
    state = core.track(answer.reply, lane="a")
    core.lost(channel, "send failed: broken pipe")
    assert state.revoked == "connection_lost" and "L1" not in core.leases
    assert core.probe() is None and not core.orphaned


# Budgets and ride-out windows (reconnect_for) ----------------------------------------------


def riding_out() -> tuple[ClientCore[str, None], list[float]]:
    """A core that rides out a lost service for 60 s, on a fake clock (``now[0]``, seconds)."""
    core: ClientCore[str, None] = ClientCore(
        Settings("tcp://127.0.0.1:7420", None, reconnect_for=60)
    )
    now = [100.0]
    core.clock = lambda: now[0]
    return core, now


def test_an_acquire_whose_wait_ends_while_the_service_is_away_raises_lease_timeout() -> None:
    core, now = riding_out()
    op = ops.acquire(
        core, "l", "interactive", "/s/a.jsonl", "prompt",
        wait_timeout=0.4, max_hold=None, on_contention="wait",
    )  # fmt: skip
    first = ops.advance(op, None)
    assert isinstance(first, ops.Call) and first.deadline == 100.4
    again = ops.advance(op, ConnectionLost("connection lost before the reply"))
    assert isinstance(again, ops.Call) and again.deadline == 100.4, "one budget across retries"
    with pytest.raises(LeaseTimeout, match=r"0\.4 s") as caught:
        ops.advance(op, core.out_of_budget())  # the reconnect, cut short at the deadline
    assert caught.value.path == "/s/a.jsonl" and isinstance(caught.value.__cause__, Unavailable)
    # A refusal that ends after the budget (the reconnect was not cut, the clock moved on).
    late = ops.acquire(
        core, "l", "interactive", "/s/a.jsonl", "prompt",
        wait_timeout=0.4, max_hold=None, on_contention="wait",
    )  # fmt: skip
    assert isinstance(ops.advance(late, None), ops.Call)
    now[0] += 1.0
    with pytest.raises(LeaseTimeout):
        ops.advance(late, Unavailable("cannot reach sessionlane at x: Connection refused"))


def test_a_reconnect_is_cut_by_its_callers_budget_and_only_a_whole_window_is_shared() -> None:
    core, now = riding_out()
    assert core.connect_plan(None, 0) == (None, True)
    assert core.connect_plan(now[0] + 0.4, 0) == (pytest.approx(0.4), False)
    assert core.connect_plan(now[0] + 90, 0) == (None, True), "reconnect_for is the shorter"
    with pytest.raises(Unavailable, match="budget"):
        core.connect_plan(now[0] - 1, 0)
    held = core.track(granted_with_secret())
    held.suspended = True
    core.reconnect_failed(Unavailable("cannot reach sessionlane at x: Connection refused"))
    assert (held.suspended, held.revoked, core.leases) == (False, "restart", {})
    with pytest.raises(Unavailable, match="cannot reach") as shared:
        core.connect_plan(None, 0)  # a caller that waited for that reconnect: no window of its own
    assert not isinstance(shared.value, LeaseTimeout)
    assert core.connect_plan(None, core.connect_failures) == (None, True), "a later call tries"


def granted_with_secret(lease: str = "L1") -> Granted:
    return Granted(id=2, lease=lease, fence=7, path="/s/a.jsonl", purpose="prompt", secret="S" * 32)


def test_a_lease_whose_reclaim_gave_up_meanwhile_fails_its_call_without_sending_it() -> None:
    core, _ = riding_out()
    lease = ops.LeaseView(core.track(granted_with_secret(), "lane"), "lane")
    lease.state.suspended = True
    op = ops.lease_append(core, lease, [{"n": 1}], None)
    reclaim = ops.advance(op, None)
    assert isinstance(reclaim, ops.Call) and reclaim.request.reclaim is not None
    core.reconnect_failed(Unavailable("cannot reach sessionlane at x: Connection refused"))
    with pytest.raises(LeaseRevoked) as caught:
        ops.advance(op, Unavailable("cannot reach sessionlane at x: Connection refused"))
    assert caught.value.reason == "restart" and not isinstance(caught.value, UnknownOutcome)


def test_a_write_sent_before_the_loss_is_of_unknown_outcome_when_the_reclaim_gives_up() -> None:
    core, _ = riding_out()
    lease = ops.LeaseView(core.track(granted_with_secret(), "lane"), "lane")
    op = ops.lease_append(core, lease, [{"n": 1}], None)
    assert isinstance(ops.advance(op, None), ops.Call)
    lease.state.suspended = True  # what ``lost`` does with reconnect_for, before the error
    reclaim = ops.advance(op, ConnectionLost("connection lost before the reply"))
    assert isinstance(reclaim, ops.Call) and reclaim.request.reclaim is not None
    with pytest.raises(UnknownOutcome, match="read it") as caught:
        ops.advance(op, Unavailable("cannot reach sessionlane at x: Connection refused"))
    assert caught.value.reason == "restart" and lease.revoked == "restart"


def test_an_append_that_releases_is_not_sent_again_to_a_service_still_away() -> None:
    """Refused by a live service, it is asked again (the lease record may answer it); the
    service not back within the window, it is not: that would be a second window."""
    core, _ = riding_out()
    lease = ops.LeaseView(core.track(granted_with_secret(), "lane"), "lane")
    lease.state.suspended = True
    op = ops.lease_append(core, lease, [{"n": 1}], None, True)
    reclaim = ops.advance(op, None)
    assert isinstance(reclaim, ops.Call) and reclaim.request.reclaim is not None
    with pytest.raises(LeaseRevoked) as caught:
        ops.advance(op, Unavailable("cannot reach sessionlane at x: Connection refused"))
    assert caught.value.reason == "restart" and not isinstance(caught.value, UnknownOutcome)
