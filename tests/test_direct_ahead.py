"""A direct client's first ``direct`` on a new file is answered with the Registry's offer.

The Registry, activating a file for a gateway's ask that carries a client's ``direct``, mints
the ticket, hands it to the new file with its ``FileInit`` and gives it to the gateway with its
offer; the gateway answers the client at once, and the client's hello waits in the listener's
backlog with the gateway's (``docs/activation.md``). Real services and raw frames where the
wire is under test; the choice of when a ticket may be minted is tested without processes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_direct_channels import abstract, gateway, offer, refused

from sessionlane.actors.registry import direct_ahead
from sessionlane.messages.internal import DirectAhead, OpenChannel
from sessionlane.messages.wire import Direct
from sessionlane.system.client import connect
from sessionlane.system.runtime.service import embedded_service


def _ask(**changes: object) -> OpenChannel:
    request = Direct(id=1, lane="a", path="/r/a.jsonl", peer_uid=1000, max_frame_bytes=65536)
    direct = DirectAhead(gateway_lane="c1.x/a", priority="interactive", request=request)
    return OpenChannel(path="/r/a.jsonl", nonce=1, direct=direct).model_copy(update=changes)


def test_a_ticket_is_minted_only_for_a_direct_that_a_socket_listener_bound_ahead_answers() -> None:
    one, two = direct_ahead(_ask()), direct_ahead(_ask())
    assert one is not None and two is not None
    assert one.ticket != two.ticket and len(one.ticket) == 32  # as a file's own: 24 bytes
    assert one.request == _ask().direct.request  # type: ignore[union-attr]
    assert direct_ahead(_ask(ahead=False)) is None  # the file's own answer is wanted
    assert direct_ahead(_ask(carried=True)) is None  # another host: no socket to offer
    assert direct_ahead(_ask(direct=None)) is None


@pytest.mark.tcp
@pytest.mark.timeout(120)
def test_the_ticket_minted_ahead_opens_the_new_files_channel_once(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    with embedded_service([str(tmp_path)], idle_ms=60_000) as service:
        gw = gateway(service)
        given = offer(gw, "a", path)
        channel = abstract(given["address"])
        channel.send({"k": "direct", "v": 1, "ticket": given["ticket"]})
        welcome = channel.recv()
        assert (welcome["k"], welcome["path"], welcome["lane"]) == ("welcome", str(path), "a")
        granted = channel.acquire("a", path)
        assert granted["type"] == "granted", granted
        replay = abstract(given["address"])
        replay.send({"k": "direct", "v": 1, "ticket": given["ticket"]})
        assert refused(replay)  # single use, as a ticket the file minted
        channel.close()
        gw.close()


@pytest.mark.tcp
@pytest.mark.timeout(120)
def test_a_ticket_minted_ahead_for_a_file_another_service_owns_opens_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.jsonl"
    with (
        embedded_service([str(tmp_path)], idle_ms=60_000) as one,
        embedded_service([str(tmp_path)], idle_ms=60_000) as two,
        connect(one.address) as first,
    ):
        held = first.lane("a").acquire(str(path), purpose="prompt")
        assert held is not None
        gw = gateway(two)
        # Answered by the Registry before the file tried its ownership lock (the file itself
        # would have answered ``unavailable``)...
        given = offer(gw, "b", path)
        # ...but the file never took the lock, so nobody is served on its listener: the hello
        # is refused, or the listener is already gone (the file closed it as it failed).
        try:
            channel = abstract(given["address"], timeout=10.0)
            channel.send({"k": "direct", "v": 1, "ticket": given["ticket"]})
        except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError):
            pass
        else:
            assert refused(channel)
        answer = gw.acquire("b", path)
        assert answer["type"] == "error" and answer["code"] == "unavailable", answer
        assert "served by another sessionlane service" in answer["detail"]
        gw.close()
        held.release()
