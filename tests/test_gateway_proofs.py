"""The gateway's token proof, driven by hand: ``Clients`` on real socket pairs, a fake clock and
a host that records the wake-ups it is asked for.

Whose each connection is (the uid the kernel would report) is given per socket, so one test
can play the service's own user and a stranger side by side: a stranger's wrong proofs must
never delay the owner's, and a waiting proof must be answered at its turn, not before.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from sessionlane.messages import handshake
from sessionlane.messages.codec import HEADER
from sessionlane.system.gateway import clients as clients_module
from sessionlane.system.gateway.admission import WRONG_PROOF_REFUSAL, Policy
from sessionlane.system.gateway.clients import Client, Clients
from sessionlane.system.gateway.timers import GatewayTimer, ProofDue

TOKEN = "the-token-0123456789abcdef"
OWNER = 1000
STRANGER = 65534


class Host:
    """The gateway's side of ``Clients``: records wake-ups; has no other request to serve."""

    def __init__(self) -> None:
        self.wakes: list[tuple[GatewayTimer, float]] = []

    def wake(self, timer: GatewayTimer, seconds: float) -> None:
        self.wakes.append((timer, seconds))

    def on_request(self, client: Client, request: Any) -> None:
        raise AssertionError(f"nothing but the handshake here, got {request}")

    def on_closed(self, client: Client, reason: str) -> None:
        pass


class Peer:
    """The far end of one connection: sends frames, reads what the gateway answered."""

    def __init__(self, sock: socket.socket, fd: int) -> None:
        self.sock = sock
        self.fd = fd  # the gateway's end
        self.nonce = os.urandom(handshake.NONCE_BYTES)
        self.challenge: bytes | None = None
        self.ids = iter(range(1, 100))
        sock.setblocking(False)

    def send(self, message: dict[str, Any]) -> None:
        body = msgpack.packb({"v": 1, "id": next(self.ids), **message}, use_bin_type=True)
        self.sock.sendall(HEADER.pack(len(body)) + body)

    def answers(self) -> list[dict[str, Any]]:
        data = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        found = []
        while data:
            (length,) = HEADER.unpack_from(data)
            found.append(msgpack.unpackb(data[HEADER.size : HEADER.size + length], raw=False))
            data = data[HEADER.size + length :]
        return found


class Gateway:
    """``Clients`` with a token, a fake clock (ms) and uids given per connection."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 0.0
        self.host = Host()
        self.clients = Clients(self.host, lambda: self.now)
        self.clients.policy = Policy(token=TOKEN, allow_other_users=False, service_uid=OWNER)
        self.uids: dict[int, int] = {}
        monkeypatch.setattr(
            clients_module.peercred, "peer_uid", lambda sock: self.uids[sock.fileno()]
        )
        self.socks: list[socket.socket] = []

    def connect(self, uid: int) -> Peer:
        ours, theirs = socket.socketpair()
        self.socks += [ours, theirs]
        self.uids[ours.fileno()] = uid
        fd = ours.fileno()
        self.clients.admit_socket(ours, f"uid {uid}")
        return Peer(theirs, fd)

    def deliver(self, peer: Peer) -> None:
        """The gateway's event loop: the connection is readable (if it is watched)."""
        if peer.fd in self.clients.fds():
            self.clients.on_ready(peer.fd)

    def hello(self, peer: Peer) -> None:
        peer.send({"type": "hello", "client": "t", "nonce": peer.nonce})
        self.deliver(peer)
        (challenge,) = peer.answers()
        assert challenge["type"] == "challenge"
        peer.challenge = challenge["nonce"]

    def prove(self, peer: Peer, token: str) -> None:
        assert peer.challenge is not None
        proof = handshake.client_proof(token, peer.nonce, peer.challenge)
        peer.send({"type": "proof", "proof": proof})
        self.deliver(peer)

    def take_wakes(self) -> list[float]:
        """The delays (ms) of the ``ProofDue`` wake-ups asked since the last call."""
        found = [round(s * 1000) for t, s in self.host.wakes if isinstance(t, ProofDue)]
        self.host.wakes.clear()
        return found

    def close(self) -> None:
        self.clients.close_all("test over")
        for sock in self.socks:
            sock.close()


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gateway]:
    made = Gateway(monkeypatch)
    yield made
    made.close()


def test_a_strangers_wrong_proofs_wait_their_turns_and_never_delay_the_owner(
    gateway: Gateway,
) -> None:
    first = gateway.connect(STRANGER)
    gateway.hello(first)
    gateway.prove(first, "a-wrong-token-0123456789")
    (refused,) = first.answers()
    assert (refused["code"], refused["detail"]) == ("unauthorized", WRONG_PROOF_REFUSAL)

    guesses = [gateway.connect(STRANGER) for _ in range(4)]
    for peer in guesses:
        gateway.hello(peer)
        gateway.prove(peer, "another-wrong-token-0123")
    assert [p.answers() for p in guesses] == [[]] * 4, "all four wait for their turns"
    assert gateway.take_wakes() == [250], "one wake-up, at the earliest turn"

    # Their turns: 250, 500, 1000, 2000 ms (each waits the doubled delay after the one before).
    for i, (now, next_wake) in enumerate(((250.0, 250), (500.0, 500))):
        gateway.now = now
        gateway.clients.proofs_due()
        assert guesses[i].answers()[0]["detail"] == WRONG_PROOF_REFUSAL
        assert [p.answers() for p in guesses[i + 1 :]] == [[]] * (3 - i)
        assert gateway.take_wakes() == [next_wake]

    # The owner mistypes once, then proves the right token: its own turn, 250 ms later,
    # comes before the stranger's pending one at 1000 ms, and gets its own wake-up.
    gateway.now = 510.0
    typo = gateway.connect(OWNER)
    gateway.hello(typo)
    gateway.prove(typo, "the-token-0123456789abcdeX")
    assert typo.answers()[0]["detail"] == WRONG_PROOF_REFUSAL, "its first: answered at once"
    owner = gateway.connect(OWNER)
    gateway.hello(owner)
    gateway.prove(owner, TOKEN)
    assert owner.answers() == []
    assert gateway.take_wakes() == [250]

    gateway.now = 760.0
    gateway.clients.proofs_due()
    (welcome,) = owner.answers()
    assert welcome["type"] == "welcome"
    assert assert_server_proof(welcome, owner)
    assert [p.answers() for p in guesses[2:]] == [[]] * 2, "the stranger still waits"

    gateway.now = 1000.0
    gateway.clients.proofs_due()
    assert guesses[2].answers()[0]["detail"] == WRONG_PROOF_REFUSAL
    assert guesses[3].answers() == []


def assert_server_proof(welcome: dict[str, Any], peer: Peer) -> bool:
    assert peer.challenge is not None
    expected = handshake.server_proof(TOKEN, peer.nonce, peer.challenge)
    return bool(welcome["proof"] == expected)


def test_a_waiting_connection_is_not_read_until_its_turn_and_then_what_it_sent_is_served(
    gateway: Gateway,
) -> None:
    typo = gateway.connect(OWNER)
    gateway.hello(typo)
    gateway.prove(typo, "not-the-token-0123456789")
    peer = gateway.connect(OWNER)
    gateway.hello(peer)
    gateway.prove(peer, TOKEN)
    peer.send({"type": "keepalive"})  # sent before its welcome: read only once admitted
    assert peer.fd not in gateway.clients.fds(), "a waiting connection is not watched"
    gateway.deliver(peer)
    assert peer.answers() == []
    gateway.now = 250.0
    gateway.clients.proofs_due()
    assert [m["type"] for m in peer.answers()] == ["welcome", "alive"]


def test_a_request_other_than_proof_after_the_challenge_is_refused(gateway: Gateway) -> None:
    peer = gateway.connect(STRANGER)
    gateway.hello(peer)
    peer.send({"type": "status"})
    gateway.deliver(peer)
    (refused,) = peer.answers()
    assert (refused["code"], refused["detail"]) == (
        "unauthorized",
        "expected proof after the challenge, got status",
    )
