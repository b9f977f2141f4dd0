"""A bad argument to a client call raises ``ValueError`` at that call, on both surfaces.

The clients here point at a port nobody listens on: an argument that got past the checks
would try to send and fail with ``Unavailable`` instead, so each ``ValueError`` also shows
that nothing was sent.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sessionlane.messages.errors import Unavailable
from sessionlane.system.client import connect
from sessionlane.system.client._async import AsyncSessionLane
from sessionlane.system.client._core import Settings
from sessionlane.system.client._sync import SessionLane


@pytest.fixture
def closed_address() -> Iterator[str]:
    """A loopback address nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield f"tcp://127.0.0.1:{port}"


Call = Callable[[Any], Any]
"""One call on a lane of a client, returning what the surface returns (maybe a coroutine)."""


def run_sync(address: str, call: Call, priority: Any = "interactive") -> Any:
    sl = SessionLane(Settings.of(address, None))
    result = call(sl.lane("l", priority))
    if hasattr(result, "__enter__"):  # lease(): checked as the ``with`` enters it
        with result:
            return None
    return result


def run_async(address: str, call: Call, priority: Any = "interactive") -> Any:
    async def body() -> Any:
        sl = AsyncSessionLane(Settings.of(address, None))
        result = call(sl.lane("l", priority))
        if hasattr(result, "__aenter__"):  # lease(): checked as the ``async with`` enters it
            async with result:
                return None
        return await result

    return asyncio.run(body())


SURFACES = [pytest.param(run_sync, id="sync"), pytest.param(run_async, id="async")]

BAD_CALLS = [
    pytest.param(
        lambda lane: lane.acquire("/tmp/x.jsonl", "urgent"), "purpose='urgent'", id="purpose"
    ),
    pytest.param(
        lambda lane: lane.acquire("/tmp/x.jsonl", on_contention="queue"),
        "on_contention='queue'",
        id="on_contention",
    ),
    pytest.param(
        lambda lane: lane.acquire("/tmp/x.jsonl", wait_timeout=-1), "wait_timeout=-1", id="wait"
    ),
    pytest.param(
        lambda lane: lane.acquire("/tmp/x.jsonl", wait_timeout=float("nan")),
        "not a finite",
        id="nan",
    ),
    pytest.param(lambda lane: lane.acquire("/tmp/x.jsonl", max_hold=0), "max_hold=0", id="hold"),
    pytest.param(lambda lane: lane.lease("/tmp/x.jsonl", "lock"), "purpose='lock'", id="lease"),
    pytest.param(lambda lane: lane.acquire(""), "path must not be empty", id="path"),
    pytest.param(lambda lane: lane.acquire("/" + "a" * 5000), "at most 4096", id="long"),
    pytest.param(lambda lane: lane.abandon(reason="x" * 600), "at most 512", id="reason"),
    pytest.param(
        lambda lane: lane.append("/tmp/x.jsonl", {"a": 1}, durability="sync"),
        "durability='sync'",
        id="durability",
    ),
]


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize(("call", "words"), BAD_CALLS)
def test_a_bad_argument_is_a_value_error_at_the_call_and_nothing_is_sent(
    surface: Callable[..., Any], call: Call, words: str, closed_address: str
) -> None:
    with pytest.raises(ValueError, match=words.replace("(", r"\(")) as caught:
        surface(closed_address, call)
    assert "validation error" not in str(caught.value)  # not pydantic's words


@pytest.mark.parametrize("surface", SURFACES)
def test_an_unknown_priority_is_refused_by_lane_itself(
    surface: Callable[..., Any], closed_address: str
) -> None:
    with pytest.raises(ValueError, match=r"priority='urgent' is not one of 'recovery', "):
        surface(closed_address, lambda lane: None, priority="urgent")


@pytest.mark.parametrize("surface", SURFACES)
def test_good_arguments_pass_the_checks_and_reach_the_network(
    surface: Callable[..., Any], closed_address: str
) -> None:
    # The control: the same call with valid arguments gets as far as connecting.
    with pytest.raises(Unavailable):
        surface(closed_address, lambda lane: lane.acquire("/tmp/x.jsonl", "write", max_hold=1))


def test_a_wrong_type_is_a_type_error() -> None:
    sl = SessionLane(Settings.of("tcp://127.0.0.1:1", None))
    with pytest.raises(TypeError, match="wait_timeout must be a number of seconds, not str"):
        sl.lane("l").acquire("/tmp/x.jsonl", wait_timeout="5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lane name must be 1 to 256 characters"):
        sl.lane("")


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"timeout": -1}, "timeout=-1"),
        ({"timeout": 0}, "timeout=0"),
        ({"keepalive": 0}, "keepalive=0"),
        ({"reconnect_for": -0.5}, "reconnect_for=-0.5"),
        ({"max_record_bytes": 0}, "max_record_bytes=0"),
    ],
)
def test_connect_refuses_bad_options_before_connecting(
    options: dict[str, Any], words: str, closed_address: str
) -> None:
    with pytest.raises(ValueError, match=words):
        connect(closed_address, **options)
    with pytest.raises(ValueError, match=words):
        Settings.of(closed_address, None, **options)  # what connect_async builds too


def test_recover_checks_its_grace_and_lane(closed_address: str) -> None:
    sl = SessionLane(Settings.of(closed_address, None))
    with pytest.raises(ValueError, match="grace=-1"):
        sl.recover("/tmp/x.jsonl", grace=-1)
    with pytest.raises(ValueError, match="lane must be 1 to 256"):
        sl.recover("/tmp/x.jsonl", lane="")
