"""``sessionlane.system.gateway.admission``: the gateway's admission rules and pre-hello limits,
without a socket.

Plus ``sessionlane.messages.codec.take_frame``, the hello-sized framing the gateway reads a first
frame with.
"""

from __future__ import annotations

import struct

import pytest

from sessionlane.messages.codec import take_frame
from sessionlane.messages.errors import TooLarge
from sessionlane.system.gateway.admission import (
    AcceptBackoff,
    HelloDeadlines,
    Policy,
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


def test_with_a_token_file_the_token_decides_whoever_the_peer_is() -> None:
    for uid in (US, STRANGER, None):
        assert hello_refusal(TOKEN, uid, "s3cret") is None
        for wrong in (None, "", "wrong", "s3cret-and-more"):
            assert hello_refusal(TOKEN, uid, wrong) == "bad or no token"


def test_only_the_default_policy_needs_the_peers_uid() -> None:
    assert DEFAULT.by_peer
    assert not OPEN.by_peer and not TOKEN.by_peer


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
