"""The Registry's side of a convention: sending first contacts to the member that owns a path.

:class:`Federation` is a plain object the Registry holds (its :class:`Host`): it keeps the
member table, a relay per remote member used, the beats that watch them, and what to answer
when one is lost. It carries no call: a lane's ``OpenChannel`` for a path another member owns
goes to that member's Registry (``Forwarded``), whose file offers the lane's actor a carried
channel; the lane's calls then go to the file directly (``sessionlane.actors.carried``).
The owner side (other members' lanes using our paths) is its part
:class:`sessionlane.actors.federation_serving.Serving`. The rules it follows are stated in
:mod:`sessionlane.actors.convention`.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeGuard

from thespian.actors import ActorExitRequest

from sessionlane.actors._shell import addr_key, monotonic_ms
from sessionlane.actors.convention import (
    CAP_INCARNATION,
    CAP_LEADER,
    CAP_MEMBER,
    CAP_ROOT,
    Claimant,
    Relay,
    owner_of,
    roots_overlap,
)
from sessionlane.actors.federation_serving import Serving, ServingHost
from sessionlane.actors.holder_reclaim import HeldReclaims
from sessionlane.messages.convention import (
    Admitted,
    Beat,
    BeatAck,
    Checkin,
    CheckinAck,
    Claim,
    Forwarded,
    ForwardedClose,
    ForwardedStatus,
    Joined,
    JoinRefused,
    Member,
    Members,
    OriginLost,
    Refused,
    RelayInit,
    Resolved,
)
from sessionlane.messages.internal import ChannelOffer, FileRestarted, OpenChannel
from sessionlane.messages.wire import FileStatus, Status, StatusReply

__all__ = ["Federation", "Host", "unavailable_status"]

log = logging.getLogger(__name__)

_BACKOFF_MIN_MS = 1_000.0
_BACKOFF_MAX_MS = 3_000.0
"""The longest wait between probes of a lost member: a fault of any length heals within it
(after the fault ends) plus one round trip. A probe is one relay creation, so a member lost
for long costs one small message every three seconds."""
_BEAT = "federation-beat"


class Host(ServingHost, Protocol):
    """What :class:`Federation` needs from the Registry it serves (a thespian actor)."""

    @property
    def myAddress(self) -> Any: ...

    def createActor(
        self, actorClass: Any, targetActorRequirements: Any = None, globalName: Any = None
    ) -> Any: ...

    def wakeupAfter(self, timePeriod: Any, payload: Any = None) -> None: ...

    def updateCapability(self, capabilityName: Any, capabilityValue: Any = None) -> None: ...


Phase = Literal["starting", "up", "probing", "lost"]


@dataclass
class _Sent:
    """A message sent to a remote member and not yet confirmed by a ``BeatAck``."""

    path: str
    lane: Any = None
    """The link actor whose ``OpenChannel`` this was (answered if the member is lost)."""
    nonce: int = 0
    status: Status | None = None
    reply_to: Any = None
    reclaim: OpenChannel | None = None
    """A reclaim's first contact: held (``parked``) if the member is lost before it answered."""


@dataclass
class _Use:
    """A lane of ours that used a remote member, and the paths it named there."""

    address: Any
    paths: set[str] = field(default_factory=set)


@dataclass
class _Remote:
    member: Member
    phase: Phase
    link: int
    relay: Any
    heard: float
    seq: int = 0
    unconfirmed: dict[int, _Sent] = field(default_factory=dict)
    lanes: dict[str, _Use] = field(default_factory=dict)
    retry_at: float = 0.0
    backoff_ms: float = _BACKOFF_MIN_MS
    probed_at: float = float("-inf")


class Federation:
    """A Registry's part in a convention: routing to owners, their liveness, our origins.

    Created by the Registry on ``Join``; every message of this module that reaches the Registry
    is handed to :meth:`handle`. Single-threaded, like the actor it lives in.
    """

    def __init__(
        self,
        host: Host,
        me: Member,
        timeout_ms: int,
        clock: Callable[[], float] = monotonic_ms,
        directory_file: str | None = None,
        reclaim_grace_ms: int = 0,
    ) -> None:
        self.host = host
        self.clock = clock
        """Milliseconds on a monotonic clock (tests pass a fake one)."""
        self.me = me
        self.timeout_ms = float(timeout_ms)
        self.members: list[Member] = [me]
        self.departed: dict[str, Member] = {}  # key -> a member that left; its roots unserved
        self.version = -1
        self.remotes: dict[str, _Remote] = {}  # incarnation -> state
        self.serving = Serving(host, me, reclaim_grace_ms=reclaim_grace_ms)
        """The owner side: other members' lanes that use our paths."""
        self.links = itertools.count(1)
        self.ticking = False
        self.joiner: Any = None
        self.directory_file = directory_file
        """Set on the leader: where its directory keeps the table (``Join.directory_file``)."""
        self.directory: Any = None
        """The directory that admitted us; checked in with while it answers."""
        self.directory_heard = 0.0
        self.checkins = 0
        self.checkins_acked = 0
        self.rejoining = False
        self.claimed_at = float("-inf")
        self.reclaim_ms = float(reclaim_grace_ms)
        """How long a lane's reclaim of a lease on a lost member's file waits for that member
        (plus ``timeout_ms``); 0: lanes are told at once (``sessionlane.actors.holder_reclaim``)."""
        self.parked = HeldReclaims()
        """Those reclaims, with when they give up."""
        self._table: dict[type, Callable[[Any, Any], None]] = {
            Admitted: self.on_admitted,
            Refused: self.on_refused,
            Members: self.on_members,
            Forwarded: self.serving.on_forwarded,
            ForwardedClose: self.serving.on_forwarded_close,
            ForwardedStatus: self.serving.on_forwarded_status,
            Beat: self.on_beat,
            BeatAck: self.on_beat_ack,
            CheckinAck: self.on_checkin_ack,
            OriginLost: self.serving.on_origin_lost,
            Resolved: self.on_resolved,
        }

    @classmethod
    def message_types(cls) -> tuple[type, ...]:
        """The message types the Registry must pass to :meth:`handle`."""
        return (
            Admitted,
            Refused,
            Members,
            Forwarded,
            ForwardedClose,
            ForwardedStatus,
            Beat,
            BeatAck,
            CheckinAck,
            OriginLost,
            Resolved,
        )

    def handle(self, msg: Any, sender: Any) -> None:
        self._table[type(msg)](msg, sender)

    # Joining --------------------------------------------------------------------------------

    def join(self, reply_to: Any) -> None:
        """Claim our roots with the directory on the leader; answer ``reply_to`` when decided."""
        self.joiner = reply_to
        self.claim()

    def claim(self) -> None:
        self.claimed_at = self.clock()
        claimant = self.host.createActor(Claimant, targetActorRequirements={CAP_LEADER: True})
        self.host.send(claimant, Claim(member=self.me, directory_file=self.directory_file))

    def on_admitted(self, msg: Admitted, sender: Any) -> None:
        if self.rejoining:
            self.version = -1  # the answer to our own claim is the table, whatever its number
        self.on_members(Members(version=msg.version, members=msg.members), sender)
        self.directory = msg.directory
        self.directory_heard = self.clock()
        self.checkins_acked = self.checkins
        if self.rejoining:
            self.rejoining = False
            log.warning("the convention's directory admitted this member again")
            # A restarted leader's actor system knows no member until it registers (thespian
            # re-registers every 7 minutes): a capability update makes it register now, so
            # relays can be placed here again.
            self.host.updateCapability(CAP_MEMBER, self.me.key)
        if self.joiner is not None:
            self.host.send(self.joiner, Joined(members=len(msg.members)))
            self.joiner = None
        self.arm()

    def on_refused(self, msg: Refused, sender: Any) -> None:
        log.error("this member was refused by the convention: %s", msg.reason)
        self.rejoining = False
        self.directory = None  # nothing more to check in with; the operator must act
        if self.joiner is not None:
            self.host.send(self.joiner, JoinRefused(reason=msg.reason))
            self.joiner = None

    def on_checkin_ack(self, msg: CheckinAck, sender: Any) -> None:
        if msg.seq == self.checkins:
            self.checkins_acked = msg.seq
            self.directory_heard = self.clock()

    def watch_directory(self, now: float) -> None:
        """Check in with the directory; when it stays silent for ``member_timeout_ms`` (the
        leader died, or restarted with a new directory), claim our roots again, once per
        ``member_timeout_ms`` until answered."""
        if self.rejoining:
            if now - self.claimed_at >= self.timeout_ms:
                self.claim()
            return
        if self.directory is None:
            return
        silent = now - self.directory_heard
        if silent > self.timeout_ms:
            log.warning(
                "the convention's directory is silent for %.0f ms: claiming this member's"
                " roots again",
                silent,
            )
            self.rejoining = True
            self.claim()
        elif self.checkins_acked == self.checkins:
            self.checkins += 1
            checkin = Checkin(
                key=self.me.key,
                incarnation=self.me.incarnation,
                registry=self.host.myAddress,
                seq=self.checkins,
            )
            self.host.send(self.directory, checkin)

    def on_members(self, msg: Members, sender: Any) -> None:
        if msg.version < self.version:
            return  # an older table overtaken by a newer one
        self.version = msg.version
        before = {m.key: m for m in self.members}
        self.members = [m for m in msg.members if m.incarnation != self.me.incarnation]
        self.members.append(self.me)
        current = {m.incarnation for m in self.members}
        for incarnation, remote in list(self.remotes.items()):
            if incarnation not in current:
                self.lose(remote, "it is no longer in the convention's table")
                del self.remotes[incarnation]
            else:
                self.sign_of_life(remote)  # (re)admitted: it may be reachable again
        self.unpark()  # a member back under a new incarnation is reached by a new relay
        # Remember who served the roots nobody serves now: their paths are unavailable, not
        # outside every root.
        keys = {m.key for m in self.members}
        for key, member in before.items():
            if key not in keys:
                self.departed[key] = member
        for key, member in list(self.departed.items()):
            if key in keys or any(
                roots_overlap(a, b) for m in self.members for a in m.roots for b in member.roots
            ):
                del self.departed[key]

    # Routing (origin side) ------------------------------------------------------------------

    def owner(self, path: Any, members: Iterable[Member]) -> Member | None:
        found = owner_of(path, members)
        if found is None and isinstance(path, str) and os.path.isabs(path) and "\x00" not in path:
            found = owner_of(os.path.realpath(path), members)  # a symlink into a root
        return found

    def remote_owner(self, path: Any) -> _Remote | Member | None:
        """The state of the remote member owning ``path``; the member that served it if it left
        the convention; None if the path is ours (or nobody's: then we refuse it ourselves)."""
        owner = self.owner(path, self.members)
        if owner is not None:
            return None if owner.incarnation == self.me.incarnation else self.remote_for(owner)
        return self.owner(path, self.departed.values())

    def reachable(self, remote: _Remote | Member) -> TypeGuard[_Remote]:
        """Whether calls may go to ``remote`` now. A lost member is probed again in the
        background once its backoff is over; its calls are refused meanwhile."""
        if isinstance(remote, Member):
            return False  # it left the convention
        if remote.phase == "lost":
            self.maybe_probe(remote)
        return remote.phase in ("starting", "up")

    def route_open(self, msg: OpenChannel, asker: Any) -> bool:
        """Send ``msg`` (from the link actor ``asker``) to the member that owns its path, whose
        file then offers ``asker`` a carried channel (or refuse it if that member is lost);
        False when the path is ours to serve. A first contact whose first call is a reclaim
        (``msg.reclaim``) of a lease on a lost member's file waits for that member instead."""
        remote = self.remote_owner(msg.path)
        if remote is None:
            return False
        key = addr_key(asker)
        if not msg.reclaim and self.parked.cancel(key, msg.path):
            log.info("%s no longer waits to reclaim a lease on %s", asker, msg.path)
        if not self.reachable(remote):
            if self.reclaim_ms > 0 and msg.reclaim:
                self.parked.hold(key, msg, asker, self.clock() + self.reclaim_ms + self.timeout_ms)
                return True
            self.host.send(asker, self.refused_offer(remote, msg.path, msg.nonce))
            return True
            return True
        use = remote.lanes.setdefault(addr_key(asker), _Use(asker))
        use.paths.update({msg.path, os.path.normpath(msg.path)})
        seq = self.next_seq(remote)
        reclaim = msg if msg.reclaim else None
        remote.unconfirmed[seq] = _Sent(msg.path, asker, msg.nonce, reclaim=reclaim)
        ask = msg.model_copy(update={"reply_to": asker, "carried": True})
        hop = Forwarded(origin=self.host.myAddress, link=remote.link, seq=seq, open=ask)
        self.host.send(remote.relay, hop)
        return True

    def unpark(self) -> None:
        """Send the held first contacts whose member answers again; refuse those out of time."""
        if not self.parked:
            return
        now = self.clock()
        for until, msg, asker in self.parked.take():
            remote = self.remote_owner(msg.path)
            if remote is not None and self.reachable(remote):
                self.route_open(msg, asker)
            elif remote is not None and now < until:
                self.parked.hold(addr_key(asker), msg, asker, until)
            else:
                why = "the member serving this path did not answer again in the reclaim grace"
                self.host.send(asker, self.parked.refusal(msg, why))

    def route_status(self, request: Status, reply_to: Any) -> bool:
        remote = self.remote_owner(request.path)
        if remote is None:
            return False
        assert request.path is not None
        if not self.reachable(remote):
            self.host.send(reply_to, unavailable_status(request, request.path))
            return True
        seq = self.next_seq(remote)
        remote.unconfirmed[seq] = _Sent(path=request.path, status=request, reply_to=reply_to)
        hop = ForwardedStatus(
            origin=self.host.myAddress,
            link=remote.link,
            seq=seq,
            request=request,
            reply_to=reply_to,
        )
        self.host.send(remote.relay, hop)
        return True

    def lane_closed(self, address: Any) -> None:
        """A Lane actor of ours closed (its channels closed themselves): the owners it used
        forget it. A gateway's lanes never close this way: their channels are the gateway's."""
        key = addr_key(address)
        for remote in self.remotes.values():
            if remote.lanes.pop(key, None) is not None and remote.phase in ("starting", "up"):
                hop = ForwardedClose(
                    origin=self.host.myAddress,
                    link=remote.link,
                    seq=self.next_seq(remote),
                    lane=address,
                )
                self.host.send(remote.relay, hop)

    def remote_for(self, member: Member) -> _Remote:
        remote = self.remotes.get(member.incarnation)
        if remote is None:
            remote = _Remote(member=member, phase="starting", link=0, relay=None, heard=0.0)
            self.remotes[member.incarnation] = remote
            self.connect(remote, "starting")
        return remote

    def connect(self, remote: _Remote, phase: Phase) -> None:
        """Create a relay on the member (thespian queues our messages until it is up)."""
        remote.phase = phase
        remote.probed_at = self.clock()
        remote.link = next(self.links)
        remote.seq = 0
        remote.heard = self.clock()
        requirements = {
            CAP_INCARNATION: remote.member.incarnation,
            CAP_ROOT: remote.member.roots[0],
        }
        remote.relay = self.host.createActor(Relay, targetActorRequirements=requirements)
        init = RelayInit(
            origin=self.host.myAddress, link=remote.link, timeout_ms=int(self.timeout_ms)
        )
        self.host.send(remote.relay, init)
        self.beat(remote)
        self.arm()

    def maybe_probe(self, remote: _Remote) -> None:
        if remote.phase == "lost" and self.clock() >= remote.retry_at:
            log.info("probing member %s again", remote.member.key)
            self.connect(remote, "probing")

    def next_seq(self, remote: _Remote) -> int:
        remote.seq += 1
        return remote.seq

    def beat(self, remote: _Remote) -> None:
        hop = Beat(origin=self.host.myAddress, link=remote.link, seq=self.next_seq(remote))
        self.host.send(remote.relay, hop)

    # Liveness (origin side) -----------------------------------------------------------------

    def arm(self) -> None:
        if not self.ticking and (self.remotes or self.directory is not None or self.rejoining):
            self.ticking = True
            self.host.wakeupAfter(self.timeout_ms / 4000.0, payload=_BEAT)

    @staticmethod
    def is_tick(payload: Any) -> bool:
        return isinstance(payload, str) and payload == _BEAT

    def tick(self) -> None:
        """Every ``member_timeout_ms / 4`` while a relay is in use: beat, or declare lost."""
        self.ticking = False
        now = self.clock()
        self.watch_directory(now)
        for remote in list(self.remotes.values()):
            if remote.phase == "lost":
                self.maybe_probe(remote)  # heal without waiting for a request to fail first
                continue
            silent = now - remote.heard
            if silent > self.timeout_ms:
                self.lose(remote, f"no answer for {silent:.0f} ms")
            else:
                self.beat(remote)
        self.unpark()
        self.arm()

    def on_beat(self, msg: Beat, sender: Any) -> None:
        """A member whose lanes use our paths beats: answer it, and if it is a member we lost,
        it is alive: probe it at once."""
        self.serving.on_beat(msg, sender)
        for remote in self.remotes.values():
            if remote.member.registry is not None and remote.member.registry == msg.origin:
                self.sign_of_life(remote)

    def sign_of_life(self, remote: _Remote) -> None:
        """``remote`` was heard from while lost (a late ack, its own beat): the fault is over,
        so its backoff restarts and it is probed now rather than when the backoff ends (at
        most once per ``_BACKOFF_MIN_MS``: a member that beats but cannot host a relay yet is
        not flooded with them)."""
        if remote.phase == "lost" and self.clock() - remote.probed_at >= _BACKOFF_MIN_MS:
            remote.backoff_ms = _BACKOFF_MIN_MS
            remote.retry_at = self.clock()
            self.maybe_probe(remote)

    def on_beat_ack(self, msg: BeatAck, sender: Any) -> None:
        remote = self.remotes.get(msg.incarnation)
        if remote is not None and remote.phase == "lost":
            self.sign_of_life(remote)
            return
        if remote is None or remote.link != msg.link:
            return
        remote.heard = self.clock()
        for seq in [s for s in remote.unconfirmed if s < msg.seq]:
            del remote.unconfirmed[seq]
        if remote.phase != "up":
            if remote.phase == "probing":
                log.warning("member %s answers again", remote.member.key)
            remote.phase = "up"
            remote.backoff_ms = _BACKOFF_MIN_MS
            self.unpark()

    def on_resolved(self, msg: Resolved, sender: Any) -> None:
        remote = self.remotes.get(msg.incarnation)
        use = remote.lanes.get(addr_key(msg.lane)) if remote is not None else None
        if use is not None:
            use.paths.add(msg.path)

    def on_child_exited(self, address: Any) -> bool:
        """A relay of ours exited (its member stopped or left); False if not a relay."""
        for remote in self.remotes.values():
            if remote.relay is not None and remote.relay == address:
                remote.relay = None  # already gone: no exit request for it
                self.lose(remote, "its relay exited (the member stopped or left)")
                return True
        return False

    def on_poison(self, message: Any) -> bool:
        """A message we sent could not be delivered; False if it is none of ours."""
        if isinstance(message, Claim):
            if self.rejoining:
                return True  # the leader is still away: the next tick claims again
            self.on_refused(Refused(reason="the convention leader could not be reached"), None)
            return True
        if isinstance(message, Checkin):
            return True  # an unanswered checkin is the sign itself
        if isinstance(message, RelayInit | Forwarded | ForwardedClose | ForwardedStatus | Beat):
            for remote in self.remotes.values():
                if remote.link == message.link:
                    self.lose(remote, "a message to its relay could not be delivered")
            return True
        return False

    def lose(self, remote: _Remote, reason: str) -> None:
        """Declare ``remote`` lost: tell our lanes, answer what it may never have received."""
        was = remote.phase
        if was == "lost":
            return
        remote.phase = "lost"
        if remote.relay is not None:
            self.host.send(remote.relay, ActorExitRequest())
            remote.relay = None
        if was == "probing":
            remote.backoff_ms = min(remote.backoff_ms * 2.0, _BACKOFF_MAX_MS)
        remote.retry_at = self.clock() + remote.backoff_ms
        uses, remote.lanes = remote.lanes, {}
        sent, remote.unconfirmed = remote.unconfirmed, {}
        if was == "probing" and not uses and not sent:
            return
        log.error(
            "member %s (roots %s) lost: %s; %d lanes told, %d requests answered unavailable",
            remote.member.key,
            ", ".join(remote.member.roots),
            reason,
            len(uses),
            len(sent),
        )
        for use in uses.values():
            for path in sorted(use.paths):
                lost = FileRestarted(path=path, aliases=[path], owner_lost=self.reclaim_ms > 0)
                self.host.send(use.address, lost)
        for _, item in sorted(sent.items()):
            if item.status is not None:
                self.host.send(item.reply_to, unavailable_status(item.status, item.path))
            elif item.reclaim is not None and self.reclaim_ms > 0:
                # A restarted member's first relay to an owner not yet registered with it
                # fails: a reclaim waits for the owner, as one sent while it is lost does.
                until = self.clock() + self.reclaim_ms + self.timeout_ms
                self.parked.hold(addr_key(item.lane), item.reclaim, item.lane, until)
            elif item.lane is not None:
                # A first contact the member may never have received: its calls wait in the
                # link for the offer, which is this refusal (sent nothing: ``unavailable``).
                self.host.send(item.lane, self.refused_offer(remote, item.path, item.nonce))

    @staticmethod
    def refused_offer(remote: _Remote | Member, path: str, nonce: int) -> ChannelOffer:
        """The answer to a first contact with a path of a lost (or departed) member."""
        if isinstance(remote, Member):
            detail = f"the member that served this path ({remote.key}) left the convention"
        else:
            detail = f"the member serving this path ({remote.member.key}) is unreachable"
        return ChannelOffer(path=path, nonce=nonce, reason=detail, code="unavailable")


def unavailable_status(request: Status, path: str) -> StatusReply:
    """The status of a path whose member is unreachable (``counters.unavailable`` = 1)."""
    entry = FileStatus(path=path, fence=0, holder=None, queue=[], counters={"unavailable": 1})
    return StatusReply(id=request.id, files=[entry])
