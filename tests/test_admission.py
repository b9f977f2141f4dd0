"""``sessionlane.system.gateway.admission``: the gateway's admission rules and pre-hello limits,
without a socket.

Plus ``sessionlane.messages.codec.take_frame``, the hello-sized framing the gateway reads a first
frame with.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sessionlane.messages import handshake
from sessionlane.messages.codec import take_frame
from sessionlane.messages.errors import TooLarge
from sessionlane.system.gateway.admission import (
    CLEAR_TOKEN_REFUSAL,
    NO_PROOF_REFUSAL,
    AcceptBackoff,
    HelloDeadlines,
    Policy,
    ProofDelays,
    RateLimit,
    connection_cap,
    hello_refusal,
    startup_refusal,
)

US = 1000
STRANGER = 65534
DEFAULT = Policy(token=None, allow_other_users=False, service_uid=US)
OPEN = Policy(token=None, allow_other_users=True, service_uid=US)
TOKEN = Policy(token="s3cret", allow_other_users=False, service_uid=US)


def test_by_default_our_own_user_needs_no_token_and_anyone_else_is_refused_saying_why() -> None:
    assert hello_refusal(DEFAULT, US, None) is None
    assert hello_refusal(DEFAULT, US, "anything") is None
    refusal = hello_refusal(DEFAULT, STRANGER, None)
    assert refusal is not None
    assert "peer runs as uid 65534, not the service's user (uid 1000)" in refusal
    assert "configure token_file or allow_other_users" in refusal
    assert hello_refusal(DEFAULT, STRANGER, "a guess") == refusal


def test_a_peer_whose_user_cannot_be_told_is_refused_like_a_stranger() -> None:
    refusal = hello_refusal(DEFAULT, None, None)
    assert refusal is not None
    assert "cannot be told" in refusal and "token_file or allow_other_users" in refusal


def test_allow_other_users_admits_every_peer_without_a_token() -> None:
    for uid in (US, STRANGER, None):
        assert hello_refusal(OPEN, uid, None) is None


def test_with_a_token_file_a_hello_with_a_nonce_is_challenged_and_a_clear_token_refused() -> None:
    nonce = bytes(handshake.NONCE_BYTES)
    for uid in (US, STRANGER, None):
        assert hello_refusal(TOKEN, uid, None, nonce) is None, "challenged: the proof decides"
        assert hello_refusal(TOKEN, uid, None) == NO_PROOF_REFUSAL
        for clear in ("s3cret", "", "wrong"):  # even the right token: it crossed the wire
            assert hello_refusal(TOKEN, uid, clear, nonce) == CLEAR_TOKEN_REFUSAL
    assert "upgrade the client" in CLEAR_TOKEN_REFUSAL


def test_only_the_default_policy_needs_the_peers_uid() -> None:
    assert DEFAULT.by_peer
    assert not OPEN.by_peer and not TOKEN.by_peer


def test_with_a_token_a_known_other_user_is_a_stranger_until_it_proved_it() -> None:
    assert TOKEN.reads_uid and DEFAULT.reads_uid and not OPEN.reads_uid
    assert TOKEN.is_stranger(STRANGER)
    assert not TOKEN.is_stranger(US), "the service's own user is never capped"
    assert not TOKEN.is_stranger(None), "an unknown peer is not a user to cap"
    assert DEFAULT.is_stranger(STRANGER) and DEFAULT.is_stranger(None)
    assert not OPEN.is_stranger(STRANGER)


def test_the_two_proofs_differ_and_depend_on_the_token_and_both_nonces() -> None:
    nc, ns = b"c" * 32, b"s" * 32
    mine = handshake.client_proof("tok-0123456789abcdef", nc, ns)
    assert mine != handshake.server_proof("tok-0123456789abcdef", nc, ns)
    assert mine != handshake.client_proof("tok-0123456789abcdeF", nc, ns)
    assert mine != handshake.client_proof("tok-0123456789abcdef", ns, nc)
    assert len(mine) == handshake.PROOF_BYTES
    assert handshake.matches(mine, mine) and not handshake.matches(None, mine)


def test_the_proofs_of_the_worked_example_in_protocol_md() -> None:
    token = "0123456789abcdef0123456789abcdef"
    nc, ns = bytes(range(32)), bytes(range(32, 64))
    assert handshake.client_proof(token, nc, ns).hex() == (
        "1dcff4a3af71ef0485bb9cdff7c324a132690d4e39c3f9b68853a31136cb9b26"
    )
    assert handshake.server_proof(token, nc, ns).hex() == (
        "eae33381ce57c64253d1699c3c908084372f3add8f6f865463fe34f892093ad2"
    )


# Wrong proofs are slowed per peer ------------------------------------------------------------


def test_a_peers_first_proof_is_checked_at_once_and_each_wrong_one_doubles_the_wait() -> None:
    delays = ProofDelays(base_ms=250, max_ms=8_000)
    now = 0.0
    turns = []
    for _ in range(8):
        turn = delays.slot(("uid", STRANGER), now)
        assert turn is not None
        turns.append(turn - now)
        now = turn
        delays.checked(("uid", STRANGER), right=False, now=now)
    assert turns == [0, 250, 500, 1_000, 2_000, 4_000, 8_000, 8_000]


def test_proofs_sent_at_once_after_a_wrong_one_wait_in_line_and_do_not_guess_faster() -> None:
    delays = ProofDelays(base_ms=250, max_ms=8_000)
    assert delays.slot("p", 0.0) == 0.0
    delays.checked("p", right=False, now=0.0)
    turns = [delays.slot("p", 1.0) for _ in range(4)]
    assert turns == [250.0, 500.0, 1_000.0, 2_000.0], "spaced, growing, whoever sent them"


def test_a_burst_of_right_proofs_is_not_spaced_and_a_right_proof_forgets_the_peer() -> None:
    delays = ProofDelays()
    assert [delays.slot("pool", 5.0) for _ in range(10)] == [5.0] * 10
    for _ in range(10):
        delays.checked("pool", right=True, now=5.0)
    assert len(delays) == 0
    assert delays.slot("x", 0.0) == 0.0
    delays.checked("x", right=False, now=0.0)
    assert delays.slot("x", 1.0) == 250.0
    delays.checked("x", right=True, now=250.0)
    assert delays.slot("x", 300.0) == 300.0, "the right proof reset the wait"


def test_one_peers_wrong_proofs_never_delay_another_peer() -> None:
    delays = ProofDelays()
    for i in range(5):
        turn = delays.slot(("uid", STRANGER), float(i))
        assert turn is not None
        delays.checked(("uid", STRANGER), right=False, now=turn)
    assert delays.slot(("uid", US), 10.0) == 10.0


def test_a_peer_is_forgotten_after_a_quiet_while_and_the_table_stays_bounded() -> None:
    delays = ProofDelays(forget_ms=60_000, max_peers=100)
    delays.slot("a", 0.0)
    delays.checked("a", right=False, now=0.0)
    assert delays.slot("a", 60_251.0) == 60_251.0, "quiet for a minute: forgotten"
    for i in range(1_000):
        delays.slot(("host", str(i)), float(i))
        delays.checked(("host", str(i)), right=False, now=float(i))
    assert len(delays) == 100


def test_a_proof_that_would_wait_too_long_is_refused_unchecked() -> None:
    delays = ProofDelays(base_ms=250, max_ms=8_000, max_wait_ms=30_000)
    delays.slot("p", 0.0)
    delays.checked("p", right=False, now=0.0)
    turns = [delays.slot("p", 0.0) for _ in range(10)]
    assert turns[:8] == [250.0, 500.0, 1_000.0, 2_000.0, 4_000.0, 8_000.0, 16_000.0, 24_000.0]
    assert turns[8:] == [None, None], "past 30 s of waiting proofs, the next is refused at once"


def test_where_peers_cannot_be_told_apart_only_a_token_or_an_explicit_opening_may_start() -> None:
    refusal = startup_refusal(DEFAULT, identifies_peers=False, platform="darwin")
    assert refusal is not None
    assert "darwin" in refusal and "token_file" in refusal and "allow_other_users" in refusal
    assert startup_refusal(TOKEN, identifies_peers=False, platform="darwin") is None
    assert startup_refusal(OPEN, identifies_peers=False, platform="darwin") is None
    assert startup_refusal(DEFAULT, identifies_peers=True) is None


def test_the_connection_cap_leaves_a_quarter_of_the_open_file_limit_to_the_process() -> None:
    assert connection_cap(512, 1_048_576) == 512
    assert connection_cap(512, -1) == 512, "unlimited"
    assert connection_cap(4096, 1024) == 768
    assert connection_cap(512, 256) == 192, "at least 64 kept back"
    assert connection_cap(512, 50) == 1, "never zero"


def test_hello_deadlines_expire_oldest_first_and_forget_the_greeted() -> None:
    deadlines = HelloDeadlines(timeout_ms=500)
    deadlines.add(1, now=0)
    deadlines.add(2, now=100)
    deadlines.add(3, now=200)
    assert deadlines.next_due() == 500
    deadlines.discard(2)  # said hello
    assert deadlines.expired(now=499) == []
    assert deadlines.expired(now=700) == [1, 3]
    assert deadlines.next_due() is None and len(deadlines) == 0
    deadlines.add(4, now=800)
    assert deadlines.expired(now=1299) == [] and deadlines.expired(now=1300) == [4]


def test_accept_backoff_doubles_up_to_its_cap_and_a_success_ends_the_episode() -> None:
    backoff = AcceptBackoff(first_s=0.05, max_s=2.0)
    assert backoff.succeeded() == 0, "no episode yet"
    delays = [backoff.failed() for _ in range(8)]
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert backoff.succeeded() == 8
    assert backoff.failed() == 0.05, "a new episode starts short again"


def test_a_rate_limit_lets_one_event_per_period_through_and_counts_the_rest() -> None:
    limit = RateLimit(period_ms=10_000)
    assert limit.allow(0) == 0
    assert limit.allow(1) is None
    assert limit.allow(9_999) is None
    assert limit.allow(10_000) == 2
    assert limit.allow(10_001) is None


def test_take_frame_refuses_a_header_announcing_more_than_the_limit_before_its_body() -> None:
    buf = bytearray(struct.pack(">I", 8 * 1024 * 1024))
    with pytest.raises(TooLarge, match="8388608 bytes exceeds the 4096"):
        take_frame(buf, 4096)


def test_take_frame_returns_the_first_frame_and_leaves_the_rest_unparsed() -> None:
    big = struct.pack(">I", 100_000)  # fine later, under the connection's own limit
    buf = bytearray(struct.pack(">I", 3) + b"abc" + big)
    assert take_frame(bytearray(buf[:5]), 4096) is None, "incomplete"
    assert take_frame(buf, 4096) == b"abc"
    assert bytes(buf) == big


# ProofDelays, any interleaving ---------------------------------------------------------------


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["stranger", "owner", "other"]),  # whose proof
            st.booleans(),  # right?
            st.integers(min_value=0, max_value=3_000),  # ms since the previous event
        ),
        max_size=60,
    )
)
def test_turns_never_come_sooner_than_the_wrong_proofs_before_them_allow(
    events: list[tuple[str, bool, int]],
) -> None:
    """Proofs arrive and are judged at their turns, in any order across peers: a peer's
    turns never go back, each comes at least the doubled delay after a wrong proof of the
    same peer was judged, and a peer that never sent a wrong proof never waits."""
    delays = ProofDelays(base_ms=250, max_ms=8_000, forget_ms=60_000)
    now = 0.0
    waiting: list[tuple[float, str, bool]] = []  # (turn, peer, right)
    last_turn: dict[str, float] = {}
    last_judged: dict[str, tuple[bool, float]] = {}  # peer -> (right, when)
    for peer, right, gap in events:
        now += gap
        # Judge what is due by now, in turn order (the gateway's timer).
        waiting.sort()
        while waiting and waiting[0][0] <= now:
            turn, who, ok = waiting.pop(0)
            delays.checked(who, ok, turn)
            last_judged[who] = (ok, turn)
        turn = delays.slot(peer, now)
        if turn is None:
            continue  # refused unchecked: too far ahead
        assert turn >= now
        assert turn >= last_turn.get(peer, 0.0), "a peer's turns never go back"
        last_turn[peer] = turn
        if peer not in last_judged and not any(w == peer for _, w, _ in waiting):
            assert turn == now, "no proof judged or waiting yet: no wait"
        ok, when = last_judged.get(peer, (True, 0.0))
        if not ok and now - when <= 60_000:
            assert turn >= when + 250, "a wrong proof delays the peer's next one"
        waiting.append((turn, peer, right))
