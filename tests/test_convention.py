"""Conventions: three ``sessionlane serve`` members, clients on two of them, the owner killed.

When the test runs as root and ``ip netns`` works, every member runs in a network namespace of
its own with its own address (10.x inside namespaces this test creates, joined by a bridge in
another namespace of its own; clients run in a fifth one), so every thespian port and gateway
really is on a separate host address. Otherwise every member runs on loopback with distinct
ports and roots (set ``CONVENTION_TEST_NETWORK=loopback`` to force that). Members are serve
subprocesses in their own sessions, killed with their actor process groups at teardown, and
the namespaces are deleted after them.

Client processes (:data:`AGENT`) take one JSON command per line and answer with JSON lines;
the test orders them through the service's own queue (``status``), never with sleeps.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pickle
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from ports import listen_port
from test_serve import (
    READY_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Serve,
    clean_env,
    live_pids,
    sessionlane_command,
    turns,
)
from thespian.actors import ActorExitRequest
from waiting import eventually

from sessionlane.actors import convention as conv
from sessionlane.actors import procfs
from sessionlane.actors.convention import (
    CAP_INCARNATION,
    CAP_ROOT,
    CAP_ROOTS,
    Relay,
    admit,
    member_capabilities,
    owner_of,
    roots_overlap,
)
from sessionlane.actors.federation import Federation
from sessionlane.actors.registry import Registry
from sessionlane.messages import convention as cm
from sessionlane.messages.convention import (
    Beat,
    BeatAck,
    Forwarded,
    ForwardedClose,
    Member,
    Members,
    OriginLost,
)
from sessionlane.messages.internal import ChannelOffer, FileRestarted, OpenChannel
from sessionlane.messages.wire import Status
from sessionlane.system.config import ConfigError, load_settings, read_cluster_key

pytestmark = pytest.mark.timeout(120)

TOKEN = "convention-test-token"
LINE_TIMEOUT_S = 30.0
FAIL_FAST_S = 5.0
"""The bound on noticing the owner died (its default ``member_timeout_ms`` is 2 s)."""

AGENT = """
import json, sys, time
from sessionlane.system.client import SessionLaneError, connect

address, token, name, reconnect_for = *sys.argv[1:4], float(sys.argv[4])

def out(**fields):
    print(json.dumps(fields), flush=True)

with connect(address, token=token, reconnect_for=reconnect_for) as sl:
    lane, lease = sl.lane(name), None
    out(step="ready")
    for line in sys.stdin:
        cmd = json.loads(line)
        op, began = cmd["op"], time.monotonic()
        try:
            if op == "acquire":
                lease = lane.acquire(cmd["path"], wait_timeout=cmd.get("wait_timeout", 60))
                out(step="granted", fence=lease.fence, took=time.monotonic() - began)
            elif op == "append":
                for seq in range(cmd["count"]):
                    lease.append({"lane": name, "seq": seq, "fence": lease.fence})
                out(step="appended")
            elif op == "release":
                lease.release()
                out(step="released")
            elif op == "status":
                files = [f.model_dump(mode="json") for f in sl.status(cmd["path"]).files]
                out(step="status", files=files, took=time.monotonic() - began)
            elif op == "wait_revoked":
                while lease.revoked is None and time.monotonic() - began < cmd["timeout"]:
                    time.sleep(0.005)
                out(step="revoked", reason=lease.revoked)
            elif op == "quit":
                break
        except SessionLaneError as exc:
            out(step="error", code=exc.code, detail=str(exc), took=time.monotonic() - began)
out(step="bye")
"""


# Pure rules -------------------------------------------------------------------------------------


def member(key: str, *roots: str, incarnation: str | None = None) -> Member:
    return Member(key=key, incarnation=incarnation or f"{key}#1", roots=list(roots), registry=None)


def test_roots_overlap_when_equal_or_nested_but_not_when_they_only_share_a_prefix() -> None:
    assert roots_overlap("/srv/a", "/srv/a")
    assert roots_overlap("/srv/a", "/srv/a/b") and roots_overlap("/srv/a/b", "/srv/a")
    assert roots_overlap("/srv/a/", "/srv/a")
    assert not roots_overlap("/srv/a", "/srv/ab")
    assert not roots_overlap("/srv/a", "/srv/b")


def test_the_owner_of_a_path_is_the_member_whose_root_holds_it_lexically() -> None:
    a, b = member("h1:1900", "/srv/a"), member("h2:1900", "/srv/b", "/data/b")
    assert owner_of("/srv/a/s.jsonl", [a, b]) is a
    assert owner_of("/data/b/x/s.jsonl", [a, b]) is b
    assert owner_of("/srv/a/../b/s.jsonl", [a, b]) is b, "normalised before matching"
    assert owner_of("/srv/ab/s.jsonl", [a, b]) is None
    assert owner_of("relative.jsonl", [a, b]) is None
    assert owner_of("/srv/a/\x00.jsonl", [a, b]) is None
    assert owner_of(None, [a, b]) is None


def test_the_directory_admits_disjoint_roots_and_refuses_same_or_nested_ones() -> None:
    a = member("h1:1900", "/srv/a")
    assert admit([a], member("h2:1900", "/srv/b")).refusal is None
    for roots in (["/srv/a"], ["/srv/a/sub"], ["/srv"], ["/srv/b", "/srv/a/x"]):
        refusal = admit([a], member("h2:1900", *roots)).refusal
        assert refusal is not None and "h1:1900" in refusal, roots


def test_a_member_claiming_again_under_its_own_identity_supersedes_its_dead_incarnation() -> None:
    old = member("h1:1900", "/srv/a", incarnation="old")
    again = member("h1:1900", "/srv/a", incarnation="new")
    assert admit([old], again).superseded == (old,)
    assert admit([old], old).superseded == (), "a repeated claim is idempotent"
    other = member("h2:1900", "/srv/a", incarnation="new")
    assert admit([old], other).refusal is not None, "another identity is refused, alive or not"


def test_a_relay_can_only_be_placed_on_the_incarnation_and_root_it_names() -> None:
    caps = member_capabilities("h1:1900", "inc-1", ["/srv/a"], leader=False)
    assert caps[CAP_ROOTS] == ("/srv/a",)
    assert Relay.actorSystemCapabilityCheck(caps, {CAP_INCARNATION: "inc-1", CAP_ROOT: "/srv/a"})
    assert not Relay.actorSystemCapabilityCheck(
        caps, {CAP_INCARNATION: "inc-0", CAP_ROOT: "/srv/a"}
    ), "a stale incarnation"
    assert not Relay.actorSystemCapabilityCheck(
        caps, {CAP_INCARNATION: "inc-1", CAP_ROOT: "/srv/b"}
    )
    assert not Relay.actorSystemCapabilityCheck({}, {CAP_INCARNATION: "inc-1"})


def test_ports_beyond_loopback_need_trusted_network_and_the_gateway_follows_bind_host(
    tmp_path: Path,
) -> None:
    token = tmp_path / "token"
    token.write_text("t" * 16)
    token.chmod(0o600)
    with pytest.raises(ConfigError) as refused:
        load_settings(env={}, overrides={"bind_host": "10.1.2.3"})
    assert refused.value.key == "bind_host" and "trusted_network" in refused.value.message
    with pytest.raises(ConfigError) as refused:
        load_settings(env={}, overrides={"leader": "10.1.2.3:1900", "admin_port": 1900})
    assert refused.value.key == "leader" and "trusted_network" in refused.value.message
    with pytest.raises(ConfigError) as refused:
        load_settings(env={}, overrides={"leader": "127.0.0.1:1900"})
    assert refused.value.key == "admin_port", "a member's identity needs a fixed admin port"

    settings, warnings = load_settings(
        env={},
        overrides={"bind_host": "10.1.2.3", "trusted_network": True, "token_file": str(token)},
    )
    assert settings.listen == "tcp://10.1.2.3:7420"
    assert any("trusted_network" in w for w in warnings)


def test_ports_beyond_loopback_need_no_trusted_network_with_a_cluster_key(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t" * 16)
    token.chmod(0o600)
    key = write_key(tmp_path / "cluster.key")

    settings, warnings = load_settings(
        env={},
        overrides={
            "bind_host": "10.1.2.3",
            "leader": "10.1.2.4:1900",
            "admin_port": 1900,
            "cluster_key_file": str(key),
            "token_file": str(token),
        },
    )

    assert settings.cluster_key_file == str(key) and not settings.trusted_network
    assert read_cluster_key(settings) == base64.b64decode(key.read_text())
    assert any("authenticated" in w and "not encrypted" in w for w in warnings), warnings


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_cluster_key_file_other_users_can_touch_is_refused_naming_the_key(
    tmp_path: Path, mode: int
) -> None:
    key = write_key(tmp_path / "cluster.key", mode=mode)
    with pytest.raises(ConfigError) as refused:
        load_settings(env={}, overrides={"cluster_key_file": str(key)})
    assert refused.value.key == "cluster_key_file"
    assert str(key) in refused.value.message and f"{mode:04o}" in refused.value.message


@pytest.mark.parametrize(
    "content, why",
    [
        (base64.b64encode(bytes(31)).decode(), "31 bytes of key material"),
        ("not base64!", "not base64"),
        ("", "0 bytes of key material"),
    ],
)
def test_a_short_or_malformed_or_missing_cluster_key_is_refused(
    tmp_path: Path, content: str, why: str
) -> None:
    key = tmp_path / "cluster.key"
    key.write_text(content)
    key.chmod(0o600)
    for path in (key, tmp_path / "missing.key"):
        with pytest.raises(ConfigError) as refused:
            load_settings(env={}, overrides={"cluster_key_file": str(path)})
        assert refused.value.key == "cluster_key_file" and str(path) in refused.value.message
        assert (why if path == key else "cannot be read") in refused.value.message


def test_a_cluster_key_file_in_a_config_file_is_relative_to_it(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    write_key(conf / "cluster.key")
    (conf / "sessionlane.toml").write_text('cluster_key_file = "cluster.key"\n')

    settings, _ = load_settings(conf / "sessionlane.toml", env={})

    assert settings.cluster_key_file == str(conf / "cluster.key")


def test_a_member_needs_the_leaders_key_or_trusted_network_even_on_loopback(
    tmp_path: Path,
) -> None:
    member = {"leader": "127.0.0.1:1900", "admin_port": 1901}
    with pytest.raises(ConfigError) as refused:
        load_settings(env={}, overrides=member)
    assert refused.value.key == "leader" and "cluster_key_file" in refused.value.message
    load_settings(env={}, overrides={**member, "cluster_key_file": str(write_key(tmp_path / "k"))})
    _, warnings = load_settings(env={}, overrides={**member, "trusted_network": True})
    assert any("not authenticated" in w for w in warnings), warnings


# Federation without thespian: a fake Registry and a fake clock ----------------------------------


class FakeHost:
    """Stands in for the Registry: records what the Federation sends, creates and serves."""

    def __init__(self) -> None:
        self.kept_ms: list[int] = []  # the keep_ms of each drop_peers
        self.myAddress = "registry@here"
        self.sent: list[tuple[Any, Any]] = []
        self.created: list[dict[str, Any]] = []
        self.opened: list[OpenChannel] = []
        self.dropped: list[tuple[str, list[Any], str]] = []
        self.active: set[str] = set()

    def send(self, target: Any, message: Any) -> None:
        self.sent.append((target, message))

    def createActor(
        self, actorClass: Any, targetActorRequirements: Any = None, globalName: Any = None
    ) -> Any:
        self.created.append(targetActorRequirements)
        return f"relay{len(self.created)}"

    def wakeupAfter(self, timePeriod: Any, payload: Any = None) -> None:
        pass

    def updateCapability(self, capabilityName: Any, capabilityValue: Any = None) -> None:
        self.sent.append(("admin", (capabilityName, capabilityValue)))

    def open_here(self, msg: OpenChannel) -> str | None:
        self.opened.append(msg)
        return msg.path

    def drop_peers(self, path: str, peers: list[Any], reason: str, keep_ms: int = 0) -> None:
        self.dropped.append((path, peers, reason))
        self.kept_ms.append(keep_ms)

    def refused(self, asker: str = "lane1") -> list[ChannelOffer]:
        """The refusals sent to ``asker`` so far (offers with an error code)."""
        return [m for t, m in self.sent if t == asker and isinstance(m, ChannelOffer) and m.code]

    def status_to(self, request: Any, reply_to: Any) -> None:
        pass

    def lane_closed(self, address: Any) -> None:
        pass

    def is_active(self, path: str) -> bool:
        return path in self.active

    def take(self) -> list[tuple[Any, Any]]:
        sent, self.sent = self.sent, []
        return sent


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


HERE = member("here:1900", "/srv/here", incarnation="here-1")
THERE = member("there:1900", "/srv/there", incarnation="there-1")


def open_channel(path: str, nonce: int = 1) -> OpenChannel:
    return OpenChannel(path=path, nonce=nonce)


def federation(host: FakeHost, clock: Clock) -> Federation:
    fed = Federation(host, HERE, 2_000, clock=clock)
    fed.on_members(Members(version=1, members=[HERE, THERE]), None)
    return fed


def acknowledge(fed: Federation, host: FakeHost) -> None:
    """The owner answers the last beat: everything sent before it arrived."""
    beats = [m for _, m in host.sent if isinstance(m, Beat)]
    fed.on_beat_ack(BeatAck(link=beats[-1].link, seq=beats[-1].seq, incarnation="there-1"), None)


def test_a_first_contact_with_another_members_root_goes_through_a_relay_on_that_incarnation() -> (
    None
):
    host, clock = FakeHost(), Clock()
    fed = federation(host, clock)

    assert not fed.route_open(open_channel("/srv/here/s.jsonl"), "lane1"), "ours: served here"
    assert fed.route_open(open_channel("/srv/there/s.jsonl", 2), "lane1")

    assert host.created == [{CAP_INCARNATION: "there-1", CAP_ROOT: "/srv/there"}]
    hops = [m for target, m in host.sent if target == "relay1"]
    assert [type(m).__name__ for m in hops] == ["RelayInit", "Beat", "Forwarded"]
    ask = hops[-1].open
    assert (ask.path, ask.nonce, ask.reply_to, ask.carried) == (
        "/srv/there/s.jsonl",
        2,
        "lane1",
        True,
    )
    assert fed.route_open(open_channel("/srv/there/t.jsonl", 3), "lane1")
    assert len(host.created) == 1, "one relay"


def test_a_silent_owner_is_lost_its_lanes_are_told_and_what_it_never_got_is_answered() -> None:
    host, clock = FakeHost(), Clock()
    fed = federation(host, clock)
    fed.route_open(open_channel("/srv/there/a.jsonl", 1), "lane1")
    fed.tick()
    acknowledge(fed, host)  # first contact 1 arrived
    fed.route_open(open_channel("/srv/there/b.jsonl", 2), "lane1")  # never confirmed
    host.take()

    clock.now += 2_001
    fed.tick()

    assert any(t == "relay1" and isinstance(m, ActorExitRequest) for t, m in host.sent), (
        "the relay is told to go: a merely slow owner then abandons our lanes' leases"
    )
    told = sorted(m.path for t, m in host.sent if t == "lane1" and isinstance(m, FileRestarted))
    assert told == ["/srv/there/a.jsonl", "/srv/there/b.jsonl"]
    (refused,) = host.refused()
    assert (refused.nonce, refused.code, refused.path) == (2, "unavailable", "/srv/there/b.jsonl")
    host.take()

    assert fed.route_open(open_channel("/srv/there/c.jsonl", 4), "lane1")
    assert [o.code for o in host.refused()] == ["unavailable"], "refused at once"
    assert len(host.created) == 1, "no probe before the backoff is over"


def test_a_lost_owner_is_probed_after_a_backoff_and_used_again_once_it_answers() -> None:
    host, clock = FakeHost(), Clock()
    fed = federation(host, clock)
    fed.route_open(open_channel("/srv/there/a.jsonl", 1), "lane1")
    clock.now += 2_001
    fed.tick()
    clock.now += 1_000
    host.take()

    fed.route_open(open_channel("/srv/there/a.jsonl", 2), "lane1")  # refused, starts a probe
    assert [o.code for o in host.refused()] == ["unavailable"]
    assert len(host.created) == 2
    acknowledge(fed, host)
    host.take()

    assert fed.route_open(open_channel("/srv/there/a.jsonl", 3), "lane1")
    assert [type(m).__name__ for t, m in host.take() if t == "relay2"] == ["Forwarded"]


def test_a_member_missing_from_the_table_is_lost_and_its_paths_are_unavailable_not_unknown() -> (
    None
):
    host, clock = FakeHost(), Clock()
    fed = federation(host, clock)
    fed.route_open(open_channel("/srv/there/a.jsonl", 1), "lane1")
    acknowledge(fed, host)
    host.take()

    fed.on_members(Members(version=2, members=[HERE]), None)
    assert [m.path for t, m in host.take() if isinstance(m, FileRestarted)] == [
        "/srv/there/a.jsonl"
    ]
    assert fed.route_open(open_channel("/srv/there/a.jsonl", 2), "lane1")
    assert "left the convention" in host.refused()[-1].reason

    back = member("there:1900", "/srv/there", incarnation="there-2")
    fed.on_members(Members(version=3, members=[HERE, back]), None)
    assert fed.route_open(open_channel("/srv/there/a.jsonl", 3), "lane1")
    assert host.created[-1] == {CAP_INCARNATION: "there-2", CAP_ROOT: "/srv/there"}
    fed.on_members(Members(version=2, members=[HERE]), None)
    assert fed.version == 3, "an older table never overrides a newer one"


def forwarded(path: str, asker: str, seq: int = 1) -> Forwarded:
    ask = OpenChannel(path=path, nonce=seq, reply_to=asker, carried=True)
    return Forwarded(origin="reg@a", link=1, seq=seq, open=ask)


def test_an_owner_closes_the_channels_of_a_lost_origins_lane_actors_on_its_active_files() -> None:
    host, clock = FakeHost(), Clock()
    owner = Federation(host, THERE, 2_000, clock=clock)
    owner.handle(forwarded("/srv/there/a.jsonl", "lane@a1"), "relay")
    owner.handle(forwarded("/srv/there/a.jsonl", "gateway@a", seq=2), "relay")
    owner.handle(forwarded("/srv/there/b.jsonl", "lane@a2", seq=3), "relay")
    assert [o.reply_to for o in host.opened] == ["lane@a1", "gateway@a", "lane@a2"]
    host.active = {"/srv/there/a.jsonl"}  # b.jsonl was passivated: nothing held there

    owner.handle(OriginLost(origin="reg@a", reason="silent"), "relay")

    ((path, peers, reason),) = host.dropped
    assert path == "/srv/there/a.jsonl" and sorted(peers) == ["gateway@a", "lane@a1"]
    assert reason == "member lost: silent"
    owner.handle(OriginLost(origin="reg@a", reason="again"), "relay")
    assert len(host.dropped) == 1, "reported once"


def test_a_closed_lane_actor_is_forgotten_by_its_owners_and_not_dropped_on_origin_loss() -> None:
    host, clock = FakeHost(), Clock()
    fed = federation(host, clock)
    fed.route_open(open_channel("/srv/there/a.jsonl"), "lane@a1")
    fed.lane_closed("lane@a1")
    (close,) = [m for _, m in host.take() if isinstance(m, ForwardedClose)]
    assert close.lane == "lane@a1"
    fed.lane_closed("lane@a1")
    assert not [m for _, m in host.take() if isinstance(m, ForwardedClose)], "once"

    owner = Federation(host, THERE, 2_000, clock=clock)
    owner.handle(forwarded("/srv/there/a.jsonl", "lane@a1"), "relay")
    owner.handle(forwarded("/srv/there/a.jsonl", "gateway@a", seq=2), "relay")
    host.active = {"/srv/there/a.jsonl"}
    owner.handle(close.model_copy(update={"origin": "reg@a"}), "relay")
    owner.handle(OriginLost(origin="reg@a", reason="silent"), "relay")
    ((_, peers, _),) = host.dropped
    assert peers == ["gateway@a"], "the closed lane actor closed its own channel"


def test_an_owner_tells_the_origin_the_canonical_name_of_a_path_it_was_asked_by_another() -> None:
    host, clock = FakeHost(), Clock()
    owner = Federation(host, THERE, 2_000, clock=clock)
    host.open_here = lambda msg: "/srv/there/real.jsonl"  # type: ignore[method-assign]
    owner.handle(forwarded("/srv/there/link.jsonl", "lane@a1"), "relay")
    ((target, resolved),) = [(t, m) for t, m in host.sent if isinstance(m, cm.Resolved)]
    assert target == "reg@a" and (resolved.lane, resolved.path) == (
        "lane@a1",
        "/srv/there/real.jsonl",
    )


def test_every_convention_message_has_a_handler_where_it_is_sent_and_survives_pickling() -> None:
    registry = set(Registry.handlers(Registry.__new__(Registry)))
    assert {cm.Join, *Federation.message_types()} <= registry
    hops = {cm.RelayInit, cm.Forwarded, cm.ForwardedClose, cm.ForwardedStatus, Beat}
    assert hops <= set(Relay.handlers(Relay.__new__(Relay)))
    assert {cm.Claim} <= set(conv.Directory.handlers(conv.Directory.__new__(conv.Directory)))
    assert set(Federation.message_types()) == set(Federation(FakeHost(), HERE, 1_000)._table), (
        "the Registry passes the Federation every message it handles"
    )
    assert {cm.Claim, cm.Admitted, cm.Refused} <= set(
        conv.Claimant.handlers(conv.Claimant.__new__(conv.Claimant))
    )
    samples = [
        cm.Join(key="h:1", incarnation="i", member_timeout_ms=2_000),
        cm.Joined(members=3),
        cm.JoinRefused(reason="r"),
        cm.Claim(member=HERE),
        cm.Admitted(version=1, members=[HERE, THERE]),
        cm.Refused(reason="r"),
        Members(version=1, members=[HERE]),
        cm.RelayInit(origin="o", link=1, timeout_ms=2_000),
        Forwarded(origin="o", link=1, seq=2, open=open_channel("/srv/there/a.jsonl")),
        cm.ForwardedClose(origin="o", link=1, seq=3, lane="lane1"),
        cm.ForwardedStatus(origin="o", link=1, seq=4, request=Status(path="/p"), reply_to="gw"),
        Beat(origin="o", link=1, seq=5),
        BeatAck(link=1, seq=5, incarnation="i"),
        cm.Checkin(key="h:1", incarnation="i", registry="r", seq=1),
        cm.CheckinAck(seq=1),
        OriginLost(origin="o", reason="r"),
        cm.Resolved(incarnation="i", lane="lane1", path="/p"),
    ]
    assert {type(m) for m in samples} == set(typing.get_args(cm.ConventionMessage))
    for message in samples:
        assert pickle.loads(pickle.dumps(message)) == message


# Where the members run ---------------------------------------------------------------------------


@dataclass
class Network:
    """Hosts for the members: network namespaces of this test's own, or loopback."""

    kind: str
    hosts: dict[str, str]
    """Member name (or ``client``) -> its address."""
    namespaces: dict[str, str] = field(default_factory=dict)

    def wrap(self, name: str, argv: list[str]) -> list[str]:
        """``argv`` run on ``name``'s host."""
        ns = self.namespaces.get(name)
        return ["ip", "netns", "exec", ns, *argv] if ns else argv

    def port(self, default: int) -> int:
        """In a namespace of its own every port is free; on loopback take a free one."""
        return default if self.kind == "netns" else listen_port()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextlib.contextmanager
def member_network(names: list[str]) -> Iterator[Network]:
    """One namespace per name, each with an address on a bridge in a namespace of its own;
    loopback for all when namespaces cannot be made here."""
    created: list[str] = []
    try:
        network = _namespaces(names, created)
        yield network or Network("loopback", {name: "127.0.0.1" for name in names})
    finally:
        for ns in reversed(created):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                _ip("netns", "del", ns)


def _namespaces(names: list[str], created: list[str]) -> Network | None:
    if os.environ.get("CONVENTION_TEST_NETWORK") == "loopback":
        return None
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return None
    tag = f"slc{os.getpid() % 100000}"
    subnet = f"10.{random.randint(100, 199)}.{random.randint(0, 255)}"
    switch = f"{tag}-sw"
    network = Network("netns", {})
    try:
        _ip("netns", "add", switch)
        created.append(switch)
        _ip(*f"-n {switch} link add br0 type bridge".split())
        _ip(*f"-n {switch} link set br0 up".split())
        for i, name in enumerate(names, start=1):
            ns = f"{tag}-{name}"
            _ip("netns", "add", ns)
            created.append(ns)
            _ip(*f"-n {switch} link add v{i} type veth peer name eth0 netns {ns}".split())
            _ip(*f"-n {switch} link set v{i} master br0 up".split())
            _ip(*f"-n {ns} link set lo up".split())
            _ip(*f"-n {ns} link set eth0 up".split())
            _ip(*f"-n {ns} addr add {subnet}.{i}/24 dev eth0".split())
            network.hosts[name] = f"{subnet}.{i}"
            network.namespaces[name] = ns
    except (OSError, subprocess.SubprocessError):
        return None  # no namespaces, bridges or veths here: the caller's finally cleans up
    return network


# Members and clients ---------------------------------------------------------------------------


class MemberServe(Serve):
    """``sessionlane serve`` on one member's host (its namespace, if it has one)."""

    def __init__(self, tmp: Path, network: Network, name: str, *args: str) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.run_dir = tmp / "run"
        self.run_dir.mkdir(exist_ok=True)
        self.output = tmp / "serve.out"
        self.env = clean_env(self.run_dir)
        argv = network.wrap(name, [*sessionlane_command(), "serve", *args])
        with self.output.open("wb") as out:
            # ``ip netns exec`` execs the command: the pid is serve's own.
            self.proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        self.state: dict[str, Any] = {}

    def hard_kill(self) -> None:
        """SIGKILL serve and its whole actor process group: a machine gone, no goodbyes."""
        for pgid in self.groups():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT_S)


class Agent:
    """A client process running :data:`AGENT` on the client host, connected to one member."""

    def __init__(
        self, network: Network, address: str, name: str, reconnect_for: float = 0.0
    ) -> None:
        self.name = name
        command = [sys.executable, "-c", AGENT, address, TOKEN, name, str(reconnect_for)]
        argv = network.wrap("client", command)
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[tuple[float, dict[str, Any]] | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), json.loads(line)))
        self.lines.put(None)

    def send(self, op: str, **fields: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()

    def expect(self, step: str, timeout: float = LINE_TIMEOUT_S) -> tuple[float, dict[str, Any]]:
        """The next line (when it arrived, what it says), which must be ``step``."""
        got = self.lines.get(timeout=timeout)
        assert got is not None, f"{self.name} exited ({self.proc.wait(5)}) before {step}"
        assert got[1]["step"] == step, (self.name, got[1])
        return got

    def do(self, op: str, step: str, timeout: float = LINE_TIMEOUT_S, **fields: Any) -> Any:
        self.send(op, **fields)
        return self.expect(step, timeout)[1]

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


@dataclass
class Convention:
    network: Network
    tmp: Path
    members: list[MemberServe] = field(default_factory=list)
    agents: list[Agent] = field(default_factory=list)
    token_file: Path = Path()
    key_file: Path = Path()
    """The members' shared ``cluster_key_file``."""
    roots: dict[str, Path] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    leader: str = ""
    config_lines: str = ""
    """More TOML lines for every member's configuration."""

    def serve(
        self,
        name: str,
        root: Path,
        *,
        admin_port: int,
        leader: str | None,
        run: str,
        key: str | None = None,
        listen: str | None = None,
    ) -> Any:
        """Start member ``name`` serving ``root`` (not waiting for it); returns it.

        ``key`` is the TOML line that decides how its frames are authenticated: by default the
        convention's shared ``cluster_key_file``. ``listen``: the gateway's address (by
        default a free port; a restarted member given its old one is found by its clients).
        """
        host = self.network.hosts[name]
        config = self.tmp / f"{run}.toml"
        if key is None:
            key = f'cluster_key_file = "{self.key_file}"'
        config.write_text(
            f'bind_host = "{host}"\n'
            f"{key}\n"
            f'token_file = "{self.token_file}"\n'
            f'listen = "{listen or f"tcp://{host}:{self.network.port(7420)}"}"\n'
            f"{self.config_lines}"
        )
        args = ["--root", str(root), "--config", str(config), "--admin-port", str(admin_port)]
        args += ["--log-file", str(self.tmp / f"{run}.log")]
        if leader is not None:
            args += ["--leader", leader]
        serve = MemberServe(self.tmp / run, self.network, name, *args)
        self.members.append(serve)
        return serve

    def start_three(self) -> tuple[MemberServe, MemberServe, MemberServe]:
        """Members a (the leader), b and c, each serving ``root-<name>``, all ready."""
        for name in "abc":
            self.roots[name] = self.tmp / f"root-{name}"
            self.roots[name].mkdir()
            self.ports[name] = self.network.port(1900)
        self.leader = f"{self.network.hosts['a']}:{self.ports['a']}"
        a = self.serve("a", self.roots["a"], admin_port=self.ports["a"], leader=None, run="a")
        a.wait_ready()
        b = self.serve(
            "b", self.roots["b"], admin_port=self.ports["b"], leader=self.leader, run="b"
        )
        c = self.serve(
            "c", self.roots["c"], admin_port=self.ports["c"], leader=self.leader, run="c"
        )
        b.wait_ready()
        c.wait_ready()
        print(f"network: {self.network.kind} {self.network.hosts}")
        return a, b, c

    def agent(self, serve: MemberServe, name: str, reconnect_for: float = 0.0) -> Agent:
        agent = Agent(self.network, serve.address, name, reconnect_for)
        self.agents.append(agent)
        return agent


@pytest.fixture
def convention(tmp_path: Path) -> Iterator[Convention]:
    with member_network(["a", "b", "c", "client"]) as network:
        made = Convention(network, tmp_path)
        made.token_file = tmp_path / "token"
        made.token_file.write_text(TOKEN)
        made.token_file.chmod(0o600)
        made.key_file = write_key(tmp_path / "cluster.key")
        try:
            yield made
        finally:
            for agent in made.agents:
                agent.kill()
            for serve in made.members:
                serve.kill()
            for serve in made.members:
                eventually(stopped(serve), "a member's processes to exit", timeout=10)


def write_key(path: Path, key: bytes | None = None, mode: int = 0o600) -> Path:
    """A ``cluster_key_file``: base64 of 32 random bytes (or ``key``), with ``mode``."""
    path.write_text(base64.b64encode(key if key is not None else os.urandom(32)).decode() + "\n")
    path.chmod(mode)
    return path


def stopped(serve: Serve) -> Callable[[], bool]:
    return lambda: not serve.leftovers()


def queued(probe: Agent, path: Path) -> list[str]:
    files = probe.do("status", "status", path=str(path))["files"]
    return [q["lane"] for q in files[0]["queue"]] if files else []


def processes_with_open(path: Path) -> list[int]:
    """Every process on this machine (all namespaces share its pids) with ``path`` open."""
    target = str(path)
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        found.append(int(pid))
                        break
    return found


def listening_hosts(serve: MemberServe) -> set[str]:
    """Hosts of every LISTEN socket a member's processes hold, read in the member's namespace."""
    pids = {serve.proc.pid, *live_pids(serve.state["pgid"])}
    hosts: set[str] = set()
    for pid in pids:
        inodes = procfs.socket_inodes(pid)
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/tcp") as fh:
            for line in fh.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:
                    hosts.add(procfs.decode_host(cols[1].split(":")[0], socket.AF_INET))
    return hosts


# What must show --------------------------------------------------------------------------------


@pytest.mark.tcp
def test_three_members_serve_one_file_from_its_owner_and_a_killed_owner_fails_fast_and_comes_back(
    convention: Convention, tmp_path: Path
) -> None:
    # Without a reclaim grace, the holder is told at once that its lease went with the owner
    # (with one, its member asks the lease back first: test_convention_faults.py).
    convention.config_lines = "reclaim_grace_ms = 0\n"
    a, b, c = convention.start_three()
    roots, ports, leader = convention.roots, convention.ports, convention.leader
    for serve, name in ((a, "a"), (b, "b"), (c, "c")):
        host = convention.network.hosts[name]
        assert listening_hosts(serve) == {host}, f"member {name} listens beyond {host}"

    path = roots["c"] / "shared.jsonl"  # owned by c; the clients talk to a and b
    gate = convention.agent(a, "gate")
    first = convention.agent(a, "lane-x")
    second = convention.agent(b, "lane-y")
    probe = convention.agent(b, "probe")
    waiter = convention.agent(a, "lane-z")
    for agent in convention.agents:
        agent.expect("ready")
    count = 20

    # Contention across members: FIFO, fences increasing, whole turns.
    held = gate.do("acquire", "granted", path=str(path))
    first.send("acquire", path=str(path))
    eventually(lambda: queued(probe, path) == ["lane-x"], "lane-x (on a) to queue", timeout=30)
    second.send("acquire", path=str(path))
    eventually(
        lambda: queued(probe, path) == ["lane-x", "lane-y"], "lane-y (on b) to queue", timeout=30
    )
    (owner_pid,) = processes_with_open(path)  # one SessionFile in the whole convention ...
    assert owner_pid in live_pids(c.state["pgid"]), "... on the member that owns the root"
    gate.do("release", "released")
    fence_x = first.expect("granted")[1]["fence"]
    first.do("append", "appended", count=count)
    first.do("release", "released")
    fence_y = second.expect("granted")[1]["fence"]
    second.do("append", "appended", count=count)
    assert held["fence"] < fence_x < fence_y, "fences increase in grant (FIFO) order"
    assert turns(path) == [
        ("lane-x", fence_x, list(range(count))),
        ("lane-y", fence_y, list(range(count))),
    ], "both turns whole, first come first served"
    waiter.send("acquire", path=str(path))
    eventually(lambda: queued(probe, path) == ["lane-z"], "lane-z (on a) to queue", timeout=30)

    # The owner dies: the holder hears its lease is lost, the waiter and new requests get
    # `unavailable`, fast.
    killed_at = time.monotonic()
    c.hard_kill()
    second.send("wait_revoked", timeout=10)
    revoked_at, revoked = second.expect("revoked", timeout=15)
    failed_at, failed = waiter.expect("error", timeout=15)
    assert revoked["reason"] == "actor_restart"
    assert failed["code"] == "unavailable", failed
    new = probe.do("acquire", "error", timeout=15, path=str(path))
    status = gate.do("status", "status", timeout=15, path=str(path))
    print(
        f"owner killed: holder told after {revoked_at - killed_at:.2f} s, waiter failed after"
        f" {failed_at - killed_at:.2f} s; a new acquire failed in {new['took']:.3f} s,"
        f" status answered in {status['took']:.3f} s"
    )
    assert revoked_at - killed_at < FAIL_FAST_S
    assert failed_at - killed_at < FAIL_FAST_S
    assert new["code"] == "unavailable" and new["took"] < 1.0
    assert status["files"][0]["counters"] == {"unavailable": 1}

    # The owner comes back (same identity): fences continue upward from its fence sidecar.
    restarted_at = time.monotonic()
    c2 = convention.serve("c", roots["c"], admin_port=ports["c"], leader=leader, run="c2")
    c2.wait_ready()
    again: dict[str, Any] = {}

    def granted_again() -> bool:
        # Until every member has the directory's new table, the old owner is still "lost".
        again.update(_acquire(gate, path))
        return bool(again["step"] == "granted")

    eventually(granted_again, "the restarted owner to serve through member a", timeout=20)
    print(f"owner restarted: a lease through a again after {time.monotonic() - restarted_at:.2f} s")
    assert again["fence"] > fence_y, "fences continue upward after the owner's restart"
    gate.do("append", "appended", count=1)
    gate.do("release", "released")
    assert turns(path)[-1] == ("gate", again["fence"], [0])
    assert len(processes_with_open(path)) <= 1

    # A newcomer claiming a root inside the owner's is refused, loudly, before it serves.
    nested = roots["c"] / "sub"
    nested.mkdir()
    intruder = convention.serve(
        "c", nested, admin_port=convention.network.port(1901), leader=leader, run="d"
    )
    assert intruder.proc.wait(READY_TIMEOUT_S) == 2, intruder.text
    assert "the convention refused this member" in intruder.text
    assert f"overlaps root {roots['c']}" in intruder.text
    assert "refusing member" in (tmp_path / "a.log").read_text()

    for agent in convention.agents:
        agent.send("quit")
        assert agent.proc.wait(LINE_TIMEOUT_S) == 0, agent.name
    for serve in (a, b, c2):
        assert serve.terminate() == 0, serve.text
        eventually(stopped(serve), "every process of a member to exit", timeout=10)


@pytest.mark.tcp
def test_a_member_that_dies_gives_up_its_lanes_leases_elsewhere_and_an_owner_that_leaves_fails_fast(
    convention: Convention,
) -> None:
    # Without a reclaim grace: the lease of a lost member's lane is abandoned at once (with
    # one, c keeps it for its holder's reclaim first: test_convention_faults.py).
    convention.config_lines = "reclaim_grace_ms = 0\n"
    a, b, c = convention.start_three()
    path = convention.roots["c"] / "elsewhere.jsonl"
    holder = convention.agent(b, "holder")
    waiter = convention.agent(a, "waiter")
    probe = convention.agent(a, "probe")
    for agent in convention.agents:
        agent.expect("ready")
    held = holder.do("acquire", "granted", path=str(path))
    waiter.send("acquire", path=str(path))
    eventually(lambda: queued(probe, path) == ["waiter"], "the waiter (on a) to queue", timeout=30)

    # b dies with its client's lease on c's file: c stops hearing b and abandons it.
    killed_at = time.monotonic()
    b.hard_kill()
    granted_at, granted = waiter.expect("granted", timeout=15)
    print(f"member of the holder killed: the waiter granted after {granted_at - killed_at:.2f} s")
    assert granted_at - killed_at < FAIL_FAST_S
    assert granted["fence"] > held["fence"]

    # c shuts down cleanly: its paths fail at once, with no wait for a heartbeat.
    stopping_at = time.monotonic()
    assert c.terminate() == 0, c.text
    waiter.send("wait_revoked", timeout=10)
    revoked_at, revoked = waiter.expect("revoked", timeout=15)
    print(f"owner stopped: the holder told after {revoked_at - stopping_at:.2f} s")
    assert revoked["reason"] in ("shutdown", "actor_restart")
    assert revoked_at - stopping_at < FAIL_FAST_S
    new = probe.do("acquire", "error", timeout=15, path=str(path))
    assert new["code"] == "unavailable" and new["took"] < 1.0, new


@pytest.mark.tcp
@pytest.mark.parametrize("without", ["another key", "no key (trusted_network)"])
def test_a_member_without_the_conventions_key_cannot_join_and_the_leader_acts_on_nothing(
    convention: Convention, tmp_path: Path, without: str
) -> None:
    for name in "ab":
        convention.roots[name] = tmp_path / f"root-{name}"
        convention.roots[name].mkdir()
        convention.ports[name] = convention.network.port(1900)
    leader = f"{convention.network.hosts['a']}:{convention.ports['a']}"
    a = convention.serve(
        "a", convention.roots["a"], admin_port=convention.ports["a"], leader=None, run="a"
    )
    a.wait_ready()
    if without == "another key":
        key = f'cluster_key_file = "{write_key(tmp_path / "other.key")}"'
    else:
        key = "trusted_network = true"
    b = convention.serve(
        "b",
        convention.roots["b"],
        admin_port=convention.ports["b"],
        leader=leader,
        run="b",
        key=key,
    )

    assert b.proc.wait(READY_TIMEOUT_S + 30) == 2, b.text
    assert f"the convention leader at {leader}" in b.text and "cluster_key_file" in b.text
    assert "Traceback" not in b.text
    leader_log = (tmp_path / "a.log").read_text()
    intruder = f"{convention.network.hosts['b']}:{convention.ports['b']}"
    assert f"member {intruder}" not in leader_log, "no claim of it reached the directory"
    dropped = (tmp_path / "a.thespian.log").read_text()
    hello = "bad hello" if without == "another key" else "no hello"
    assert f"sessionlane: refused a connection from {convention.network.hosts['b']}" in dropped
    assert f"({hello})" in dropped, "refused at its first bytes, before any frame"

    # The leader still serves, and a member with the key joins it.
    agent = convention.agent(a, "after")
    agent.expect("ready")
    agent.do("acquire", "granted", path=str(convention.roots["a"] / "s.jsonl"))
    c = convention.serve(
        "b", convention.roots["b"], admin_port=convention.network.port(1902), leader=leader, run="c"
    )
    c.wait_ready()


def _acquire(agent: Agent, path: Path) -> dict[str, Any]:
    agent.send("acquire", path=str(path), wait_timeout=5)
    got = agent.lines.get(timeout=LINE_TIMEOUT_S)
    assert got is not None, f"{agent.name} exited"
    return got[1]


@pytest.mark.tcp
@pytest.mark.parametrize(
    "flags, key",
    [
        (["--bind", "10.255.0.1"], "bind_host"),
        (["--leader", "192.0.2.1:1900", "--admin-port", "1901"], "leader"),
    ],
)
def test_a_member_beyond_loopback_without_trusted_network_refuses_to_start(
    tmp_path: Path, flags: list[str], key: str
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    serve = Serve(tmp_path, "--root", str(root), *flags)
    try:
        assert serve.proc.wait(READY_TIMEOUT_S) == 2, serve.text
    finally:
        serve.kill()
    assert f"config key {key}" in serve.text
    assert "trusted_network = true" in serve.text
    assert "Traceback" not in serve.text
