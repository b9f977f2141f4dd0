"""Conventions: several sessionlane services acting as one, each path served where its root is.

A convention is a thespian convention of sessionlane services ("members"). The leader is a
service started without ``leader`` (with a fixed ``admin_port``); every other member names it.
Each member advertises its roots, its identity ``bind_host:admin_port`` (:data:`CAP_MEMBER`) and
a fresh incarnation id per actor system (:data:`CAP_INCARNATION`) as thespian capabilities.
A client may connect to any member's gateway; a request for a path is served by the SessionFile
on the member whose root holds the path.

**Never two SessionFile actors for one path.** Three rules make it so:

1. Only the owner creates. A Registry creates a SessionFile only for a path that canonicalises
   inside *its own* roots (``Registry.serve``, unchanged from one machine), and on one member
   there is one Registry (a ``globalName``) with one child per canonical path.
2. Roots never overlap between admitted members. The leader runs one :class:`Directory` actor
   that admits members one ``Claim`` at a time (its mailbox serialises them). A claim with a root
   equal to, inside, or around a root of another admitted member is refused, loudly: the
   directory logs it, the newcomer's ``serve`` exits 2 with the reason, before its gateway opens.
   The only exceptions are proofs that the other claimant is gone: the same identity claiming
   again (``bind_host:admin_port`` cannot be bound twice, so the old incarnation is dead) or
   thespian reporting its system left the convention (a clean shutdown; for a vanished one,
   thespian waits three missed check-ins, about 22 minutes). Suspicion is not proof: a silent
   member keeps its roots until one of those happens.
3. Calls are forwarded, never served, by non-owners, and forwarded at most once. A Registry
   that gets a call for a path under another member's root hands it to a :class:`Relay`: an actor
   it created with ``targetActorRequirements`` naming the owner's incarnation and root, which
   :meth:`Relay.actorSystemCapabilityCheck` lets only that one actor system host (never a
   refused newcomer, never a stale registration of a restarted member). The relay, living on
   the owner, passes the call to the owner's Registry (looked up there by ``globalName``), which
   serves it or refuses it but never forwards a ``Forwarded`` call again: two Registries that
   briefly disagree about the table cause a refusal, never a second owner or a loop.

Replies and events go from the SessionFile straight to the Lane, whose address travels in the
``LaneCall``; order per lane holds because every hop (Lane, Registry, Relay, owner's Registry,
SessionFile) is one sender/target pair, which thespian keeps in order.

**Member loss.** Each Registry sends a ``Beat`` through every relay it uses every
``member_timeout_ms / 4``; the owner's Registry answers ``BeatAck`` directly. The owner is lost
when it stays silent for ``member_timeout_ms``, when the relay exits (``ChildActorExited``: a
member that shuts down or leaves), when the relay cannot be created or reached
(``PoisonMessage``), or when the directory's table no longer names that incarnation. Then, at
once: every lane that used the member gets ``FileRestarted`` for each path it used there (the
Lane reports its leases there ``revoked``, reason ``actor_restart``, and re-sends its pending
acquires, which are now answered ``unavailable``); the first requests on a path that the
member may never have received (sent since its last ``BeatAck``, so the Lane cannot yet match
them to a canonical path) are answered ``unavailable`` here; and new calls for its roots get
``unavailable`` at once, with a background probe (a fresh relay, exponential backoff) in case
the member was only slow. One window is left: a first request the member received and had not
answered yet when it died (a millisecond or so) is ended by the client's own reply timeout.
The old relay is told to exit: if the owner was alive after all, the relay's exit makes it
abandon our lanes' leases, so nothing stays held for a lane that was told it lost it.

The same watchdog runs the other way: a relay whose origin falls silent for
``member_timeout_ms`` (the origin member died with its lanes) tells its Registry
``OriginLost``, and the leases and waits of that origin's lanes are abandoned. A member that
comes back is a new incarnation; once the directory admits it, every Registry gets the new
table and its next call creates a new relay. Its fences continue upward: they are persisted per
path in the fence sidecars (``actors.fencestore``), not kept in memory.

The leader is special in two ways, both thespian's: only it knows every member (members know
only the leader), so a relay to a member not used before is placed through it; and the
directory lives there. If the leader dies, relays already in place keep working, but new
members cannot join and first contacts fail ``unavailable``; a restarted leader starts with an
empty directory, so restart the members after it.

**Trust.** Every message between members is pickled by thespian and unpickled by the receiver,
so every frame carries a MAC under the members' shared secret (``cluster_key_file``,
``system.transport_auth``): a frame from anyone without the key is dropped before it is
unpickled, and a member with another key cannot join (its claim never reaches the directory).
Without a key, members must set ``trusted_network = true``, which sends frames unauthenticated:
then anyone who can reach a member's ports can run code as the service's user
(``system.config``).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeGuard

from pydantic import BaseModel, ConfigDict
from thespian.actors import ActorExitRequest, ActorSystemConventionUpdate, WakeupMessage

from actors._shell import Handler, ShellActor, addr_key, monotonic_ms
from messages.internal import FileReply, FileRestarted, LaneCall, LaneRef
from messages.wire import Abandon, Error, FileStatus, Status, StatusReply

__all__ = [
    "CAP_INCARNATION",
    "CAP_LEADER",
    "CAP_MEMBER",
    "CAP_ROOT",
    "CAP_ROOTS",
    "DIRECTORY_NAME",
    "Admission",
    "Admitted",
    "Beat",
    "BeatAck",
    "Claim",
    "Claimant",
    "Directory",
    "Federation",
    "Forwarded",
    "ForwardedClose",
    "ForwardedStatus",
    "Join",
    "JoinRefused",
    "Joined",
    "Member",
    "Members",
    "OriginLost",
    "Refused",
    "Relay",
    "RelayInit",
    "Resolved",
    "admit",
    "member_capabilities",
    "owner_of",
    "roots_overlap",
]

log = logging.getLogger(__name__)

CAP_MEMBER = "sessionlane.member"
"""Capability: the member's identity, ``bind_host:admin_port``."""
CAP_INCARNATION = "sessionlane.incarnation"
"""Capability: a fresh id per actor system start (a restarted member is a new incarnation)."""
CAP_ROOTS = "sessionlane.roots"
"""Capability: the roots this member serves (a tuple of canonical directory paths)."""
CAP_LEADER = "sessionlane.leader"
"""Capability: True on the member that runs the :class:`Directory`."""
CAP_ROOT = "sessionlane.root"
"""Requirement key (with :data:`CAP_INCARNATION`) under which a :class:`Relay` is placed."""

DIRECTORY_NAME = "sessionlane-directory"
_REGISTRY_CLASS = "actors.registry.Registry"  # by name: actors.registry imports this module
_REGISTRY_NAME = "sessionlane-registry"  # actors.registry.REGISTRY_NAME
_DIRECTORY_CLASS = "system.convention.Directory"
_BACKOFF_MIN_MS = 1_000.0
_BACKOFF_MAX_MS = 30_000.0
_BEAT = "federation-beat"


def member_capabilities(
    key: str, incarnation: str, roots: Sequence[str], *, leader: bool
) -> dict[str, Any]:
    """The thespian capabilities a convention member advertises."""
    return {
        CAP_MEMBER: key,
        CAP_INCARNATION: incarnation,
        CAP_ROOTS: tuple(roots),
        CAP_LEADER: leader,
    }


# Messages -----------------------------------------------------------------------------------


class _Msg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


class Member(_Msg):
    """One admitted member, as the directory and every Registry know it."""

    key: str
    """``bind_host:admin_port``: stable across restarts of the member."""
    incarnation: str
    """Unique per actor system start."""
    roots: list[str]
    """Canonical roots, pairwise disjoint from every other admitted member's."""
    registry: Any
    """The member's Registry actor."""


class Join(_Msg):
    """From the Service to its Registry: claim our roots with the leader's directory."""

    kind: Literal["join"] = "join"
    key: str
    incarnation: str
    member_timeout_ms: int


class Joined(_Msg):
    """From the Registry to the Service: admitted; ``members`` counts the convention."""

    kind: Literal["joined"] = "joined"
    members: int


class JoinRefused(_Msg):
    kind: Literal["join_refused"] = "join_refused"
    reason: str


class Claim(_Msg):
    """From a Registry, through a :class:`Claimant` on the leader, to the :class:`Directory`."""

    kind: Literal["claim"] = "claim"
    member: Member


class Admitted(_Msg):
    kind: Literal["admitted"] = "admitted"
    version: int
    members: list[Member]


class Refused(_Msg):
    kind: Literal["refused"] = "refused"
    reason: str


class Members(_Msg):
    """From the directory to every admitted Registry, on every change of the table."""

    kind: Literal["members"] = "members"
    version: int
    members: list[Member]


class RelayInit(_Msg):
    """First message to a new relay: who its origin is and how long it may stay silent."""

    kind: Literal["relay_init"] = "relay_init"
    origin: Any
    link: int
    timeout_ms: int


class _Hop(_Msg):
    origin: Any
    """The Registry that sent it (through its relay); answers go straight back there."""
    link: int
    """The origin's id for the relay it used (a new relay is a new link)."""
    seq: int
    """Increasing per link: a ``BeatAck`` for ``seq`` confirms every earlier message."""


class Forwarded(_Hop):
    """A call for a path the owner serves, from another member's Registry."""

    kind: Literal["forwarded"] = "forwarded"
    call: LaneCall


class ForwardedClose(_Hop):
    """A lane that used the owner closed."""

    kind: Literal["forwarded_close"] = "forwarded_close"
    lane: Any
    uid: str = ""
    """One lane of the gateway at ``lane`` (it hosts many); empty: the lane actor ``lane``."""


class ForwardedStatus(_Hop):
    """Status of one path the owner serves; the owner answers ``reply_to`` directly."""

    kind: Literal["forwarded_status"] = "forwarded_status"
    request: Status
    reply_to: Any


class Beat(_Hop):
    kind: Literal["beat"] = "beat"


class BeatAck(_Msg):
    """From the owner's Registry to the origin: alive, and every message up to ``seq`` came."""

    kind: Literal["beat_ack"] = "beat_ack"
    link: int
    seq: int
    incarnation: str


class OriginLost(_Msg):
    """From a relay to its (owner's) Registry: the origin is gone; abandon its lanes' leases."""

    kind: Literal["origin_lost"] = "origin_lost"
    origin: Any
    reason: str


class Resolved(_Msg):
    """From the owner to the origin: the lane's raw path names this canonical one."""

    kind: Literal["resolved"] = "resolved"
    incarnation: str
    lane: Any
    path: str


# Pure rules ---------------------------------------------------------------------------------


def roots_overlap(a: str, b: str) -> bool:
    """Whether two absolute roots are equal or one lies inside the other (lexically)."""
    a, b = os.path.normpath(a), os.path.normpath(b)
    return os.path.commonpath([a, b]) in (a, b)


def owner_of(path: Any, members: Iterable[Member]) -> Member | None:
    """The member whose root holds ``path`` lexically, or None (relative, odd or unowned)."""
    if not isinstance(path, str) or "\x00" in path or not os.path.isabs(path):
        return None
    normal = os.path.normpath(path)
    for member in members:
        for root in member.roots:
            if os.path.commonpath([normal, root]) == root:
                return member
    return None


@dataclass(frozen=True)
class Admission:
    """What the directory decides about a claim."""

    superseded: tuple[Member, ...] = ()
    """Earlier incarnations of the claimant (same key): dead, dropped from the table."""
    refusal: str | None = None
    """Why the claim is refused, or None when it is admitted."""


def admit(members: Iterable[Member], claim: Member) -> Admission:
    """Admit ``claim`` unless a root of it overlaps a root of another admitted member."""
    superseded = []
    for member in members:
        if member.key == claim.key:
            if member.incarnation != claim.incarnation:
                superseded.append(member)
            continue
        for mine in claim.roots:
            for theirs in member.roots:
                if roots_overlap(mine, theirs):
                    return Admission(
                        refusal=f"root {mine} overlaps root {theirs} of member {member.key}"
                        " (two members must never serve one path)"
                    )
    return Admission(superseded=tuple(superseded))


# Actors -------------------------------------------------------------------------------------


class Directory(ShellActor):
    """On the leader: the table of admitted members; admits one claim at a time."""

    log = log

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.members: dict[str, Member] = {}  # key -> member
        self.version = 0
        self.watching = False

    def handlers(self) -> dict[type, Handler]:
        return {Claim: self.on_claim, ActorSystemConventionUpdate: self.on_update}

    def on_claim(self, msg: Claim, sender: Any) -> None:
        if not self.watching:
            self.watching = True
            self.notifyOnSystemRegistrationChanges(True)
        claim = msg.member
        decision = admit(self.members.values(), claim)
        if decision.refusal is not None:
            log.error("refusing member %s: %s", claim.key, decision.refusal)
            self.send(sender, Refused(reason=decision.refusal))
            return
        for old in decision.superseded:
            log.warning("member %s restarted: incarnation %s replaced", old.key, old.incarnation)
        known = self.members.get(claim.key)
        self.members[claim.key] = claim
        if known != claim:
            self.version += 1
            log.info("admitted member %s with roots %s", claim.key, ", ".join(claim.roots))
            self.publish(exclude=claim.key)
        self.send(sender, Admitted(version=self.version, members=list(self.members.values())))

    def on_update(self, msg: ActorSystemConventionUpdate, sender: Any) -> None:
        if msg.remoteAdded:
            return
        incarnation = (msg.remoteCapabilities or {}).get(CAP_INCARNATION)
        gone = [m for m in self.members.values() if m.incarnation == incarnation]
        for member in gone:
            log.warning("member %s left the convention", member.key)
            del self.members[member.key]
        if gone:
            self.version += 1
            self.publish()

    def publish(self, exclude: str | None = None) -> None:
        table = Members(version=self.version, members=list(self.members.values()))
        for member in self.members.values():
            if member.key != exclude:
                self.send(member.registry, table)


class Claimant(ShellActor):
    """Placed on the leader; carries one claim to the directory and its answer back."""

    log = log

    @staticmethod
    def actorSystemCapabilityCheck(capabilities: dict[str, Any], requirements: Any) -> bool:
        return capabilities.get(CAP_LEADER) is True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reply_to: Any = None

    def handlers(self) -> dict[type, Handler]:
        return {Claim: self.on_claim, Admitted: self.on_answer, Refused: self.on_answer}

    def on_claim(self, msg: Claim, sender: Any) -> None:
        self.reply_to = sender
        directory = self.createActor(_DIRECTORY_CLASS, globalName=DIRECTORY_NAME)
        self.send(directory, msg)

    def on_answer(self, msg: Admitted | Refused, sender: Any) -> None:
        if self.reply_to is not None:
            self.send(self.reply_to, msg)
        self.send(self.myAddress, ActorExitRequest())


class Relay(ShellActor):
    """Placed on a path's owner by another member's Registry (its origin); passes its calls to
    the owner's Registry, and reports the origin lost when its beats stop."""

    log = log

    @staticmethod
    def actorSystemCapabilityCheck(capabilities: dict[str, Any], requirements: Any) -> bool:
        wanted = (requirements or {}).get(CAP_INCARNATION)
        root = (requirements or {}).get(CAP_ROOT)
        return (
            wanted is not None
            and capabilities.get(CAP_INCARNATION) == wanted
            and root in capabilities.get(CAP_ROOTS, ())
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.origin: Any = None
        self.registry: Any = None
        self.timeout_ms = 0.0
        self.heard = 0.0
        self.reported = False

    def handlers(self) -> dict[type, Handler]:
        return {
            RelayInit: self.on_init,
            Forwarded: self.on_hop,
            ForwardedClose: self.on_hop,
            ForwardedStatus: self.on_hop,
            Beat: self.on_hop,
            WakeupMessage: self.on_wakeup,
            ActorExitRequest: self.on_exit,
        }

    def on_init(self, msg: RelayInit, sender: Any) -> None:
        self.origin = msg.origin
        self.timeout_ms = float(msg.timeout_ms)
        self.heard = monotonic_ms()
        self.registry = self.createActor(_REGISTRY_CLASS, globalName=_REGISTRY_NAME)
        self.wakeupAfter(self.timeout_ms / 2000.0)

    def on_hop(self, msg: _Hop, sender: Any) -> None:
        if self.registry is None:
            return  # RelayInit always comes first from the origin; anything else is a stray
        self.heard = monotonic_ms()
        self.send(self.registry, msg)

    def on_wakeup(self, msg: WakeupMessage, sender: Any) -> None:
        silent = monotonic_ms() - self.heard
        if silent <= self.timeout_ms:
            self.wakeupAfter(self.timeout_ms / 2000.0)
            return
        self.report(f"origin silent for {silent:.0f} ms")
        self.send(self.myAddress, ActorExitRequest())

    def on_exit(self, msg: ActorExitRequest, sender: Any) -> None:
        self.report("relay told to exit")

    def report(self, reason: str) -> None:
        if not self.reported and self.registry is not None:
            self.reported = True
            self.send(self.registry, OriginLost(origin=self.origin, reason=reason))


# The Registry's side ------------------------------------------------------------------------


class Host(Protocol):
    """What :class:`Federation` needs from the Registry it serves (a thespian actor)."""

    @property
    def myAddress(self) -> Any: ...

    def send(self, target: Any, message: Any) -> None: ...

    def createActor(
        self, actorClass: Any, targetActorRequirements: Any = None, globalName: Any = None
    ) -> Any: ...

    def wakeupAfter(self, timePeriod: Any, payload: Any = None) -> None: ...

    def serve(self, call: LaneCall) -> str | None:
        """Serve ``call`` here (never forward it); the canonical path, or None if refused."""

    def refuse(self, call: LaneCall, error: Error) -> None: ...

    def status_to(self, request: Status, reply_to: Any) -> None: ...

    def lane_closed(self, address: Any) -> None: ...

    def is_active(self, path: str) -> bool: ...


Phase = Literal["starting", "up", "probing", "lost"]


@dataclass
class _Sent:
    """A message sent to a remote member and not yet confirmed by a ``BeatAck``."""

    path: str
    lane: Any = None
    lane_uid: str = ""
    request_id: Any = None
    canonical: bool = False
    status: Status | None = None
    reply_to: Any = None


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


@dataclass
class _Origin:
    """Another member's Registry whose lanes use our paths."""

    address: Any
    lanes: dict[str, tuple[LaneRef, set[str]]] = field(default_factory=dict)


class Federation:
    """A Registry's part in a convention: routing to owners, their liveness, our origins.

    Created by the Registry on ``Join``; every message of this module that reaches the Registry
    is handed to :meth:`handle`. Single-threaded, like the actor it lives in.
    """

    def __init__(
        self, host: Host, me: Member, timeout_ms: int, clock: Callable[[], float] = monotonic_ms
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
        self.origins: dict[str, _Origin] = {}  # addr_key(origin registry) -> state
        self.links = itertools.count(1)
        self.ticking = False
        self.joiner: Any = None
        self._table: dict[type, Callable[[Any, Any], None]] = {
            Admitted: self.on_admitted,
            Refused: self.on_refused,
            Members: self.on_members,
            Forwarded: self.on_forwarded,
            ForwardedClose: self.on_forwarded_close,
            ForwardedStatus: self.on_forwarded_status,
            Beat: self.on_beat,
            BeatAck: self.on_beat_ack,
            OriginLost: self.on_origin_lost,
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
            OriginLost,
            Resolved,
        )

    def handle(self, msg: Any, sender: Any) -> None:
        self._table[type(msg)](msg, sender)

    # Joining --------------------------------------------------------------------------------

    def join(self, reply_to: Any) -> None:
        """Claim our roots with the directory on the leader; answer ``reply_to`` when decided."""
        self.joiner = reply_to
        claimant = self.host.createActor(Claimant, targetActorRequirements={CAP_LEADER: True})
        self.host.send(claimant, Claim(member=self.me))

    def on_admitted(self, msg: Admitted, sender: Any) -> None:
        self.on_members(Members(version=msg.version, members=msg.members), sender)
        if self.joiner is not None:
            self.host.send(self.joiner, Joined(members=len(msg.members)))
            self.joiner = None

    def on_refused(self, msg: Refused, sender: Any) -> None:
        log.error("this member was refused by the convention: %s", msg.reason)
        if self.joiner is not None:
            self.host.send(self.joiner, JoinRefused(reason=msg.reason))
            self.joiner = None

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

    def route(self, call: LaneCall) -> bool:
        """Forward ``call`` if another member owns its path (or refuse it if that member is
        lost); False when it is ours to serve."""
        remote = self.remote_owner(call.path)
        if remote is None:
            return False
        if not self.reachable(remote):
            self.host.refuse(call, self.unavailable(remote, call.request.id, call.path))
            return True
        use = remote.lanes.setdefault(addr_key(call.lane.address), _Use(call.lane.address))
        use.paths.update({call.path, os.path.normpath(call.path)})
        seq = self.next_seq(remote)
        if call.request.id is not None:
            remote.unconfirmed[seq] = _Sent(
                path=call.path,
                lane=call.lane.address,
                lane_uid=call.lane.uid,
                request_id=call.request.id,
                canonical=call.canonical,
            )
        hop = Forwarded(origin=self.host.myAddress, link=remote.link, seq=seq, call=call)
        self.host.send(remote.relay, hop)
        return True

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

    def lane_closed(self, address: Any, uid: str = "") -> None:
        """A lane of ours closed: the owners it used forget it.

        A gateway's lane (``uid`` set) shares its address with the gateway's other lanes, so
        the address stays known here (for ``FileRestarted``); only that lane is forgotten.
        """
        key = addr_key(address)
        for remote in self.remotes.values():
            used = remote.lanes.get(key) is not None
            if used and not uid:
                del remote.lanes[key]
            if used and remote.phase in ("starting", "up"):
                hop = ForwardedClose(
                    origin=self.host.myAddress,
                    link=remote.link,
                    seq=self.next_seq(remote),
                    lane=address,
                    uid=uid,
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
        if not self.ticking:
            self.ticking = True
            self.host.wakeupAfter(self.timeout_ms / 4000.0, payload=_BEAT)

    @staticmethod
    def is_tick(payload: Any) -> bool:
        return isinstance(payload, str) and payload == _BEAT

    def tick(self) -> None:
        """Every ``member_timeout_ms / 4`` while a relay is in use: beat, or declare lost."""
        self.ticking = False
        now = self.clock()
        for remote in self.remotes.values():
            if remote.phase == "lost":
                continue
            silent = now - remote.heard
            if silent > self.timeout_ms:
                self.lose(remote, f"no answer for {silent:.0f} ms")
            else:
                self.beat(remote)
        if any(r.phase != "lost" for r in self.remotes.values()):
            self.arm()

    def on_beat_ack(self, msg: BeatAck, sender: Any) -> None:
        remote = self.remotes.get(msg.incarnation)
        if remote is None or remote.link != msg.link or remote.phase == "lost":
            return
        remote.heard = self.clock()
        for seq in [s for s in remote.unconfirmed if s < msg.seq]:
            del remote.unconfirmed[seq]
        if remote.phase != "up":
            if remote.phase == "probing":
                log.warning("member %s answers again", remote.member.key)
            remote.phase = "up"
            remote.backoff_ms = _BACKOFF_MIN_MS

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
            self.on_refused(Refused(reason="the convention leader could not be reached"), None)
            return True
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
                self.host.send(use.address, FileRestarted(path=path))
        for _, item in sorted(sent.items()):
            if item.status is not None:
                self.host.send(item.reply_to, unavailable_status(item.status, item.path))
            elif not item.canonical and item.lane is not None:
                # The lane learns a path's canonical name from the first reply; until then
                # FileRestarted cannot find this request, so it is answered here.
                error = self.unavailable(remote, item.request_id, item.path)
                reply = FileReply(path=item.path, message=error, lane=item.lane_uid)
                self.host.send(item.lane, reply)

    @staticmethod
    def unavailable(remote: _Remote | Member, request_id: Any, path: str) -> Error:
        """The refusal for a path of a lost (or departed) member."""
        if isinstance(remote, Member):
            detail = f"the member that served this path ({remote.key}) left the convention"
        else:
            detail = f"the member serving this path ({remote.member.key}) is unreachable"
        return Error(id=request_id, code="unavailable", detail=detail, path=path)

    # Serving (owner side) -------------------------------------------------------------------

    def origin(self, msg: _Hop) -> _Origin:
        key = addr_key(msg.origin)
        found = self.origins.get(key)
        if found is None:
            found = self.origins[key] = _Origin(msg.origin)
        return found

    def on_forwarded(self, msg: Forwarded, sender: Any) -> None:
        call = msg.call
        canonical = self.host.serve(call)
        if canonical is None:
            return
        # Keyed by lane, not by address: the gateway hosts many lanes at one address.
        _, paths = self.origin(msg).lanes.setdefault(
            f"{addr_key(call.lane.address)}|{call.lane.uid}", (call.lane, set())
        )
        paths.add(canonical)
        if not call.canonical and canonical != call.path:
            resolved = Resolved(
                incarnation=self.me.incarnation, lane=call.lane.address, path=canonical
            )
            self.host.send(msg.origin, resolved)

    def on_forwarded_close(self, msg: ForwardedClose, sender: Any) -> None:
        lanes = self.origin(msg).lanes
        if msg.uid:
            lanes.pop(f"{addr_key(msg.lane)}|{msg.uid}", None)
            return  # the gateway's other lanes still use its address
        prefix = f"{addr_key(msg.lane)}|"
        for key in [k for k in lanes if k.startswith(prefix)]:
            del lanes[key]
        self.host.lane_closed(msg.lane)

    def on_forwarded_status(self, msg: ForwardedStatus, sender: Any) -> None:
        self.host.status_to(msg.request, msg.reply_to)

    def on_beat(self, msg: Beat, sender: Any) -> None:
        self.origin(msg)
        ack = BeatAck(link=msg.link, seq=msg.seq, incarnation=self.me.incarnation)
        self.host.send(msg.origin, ack)

    def on_origin_lost(self, msg: OriginLost, sender: Any) -> None:
        origin = self.origins.pop(addr_key(msg.origin), None)
        if origin is None or not origin.lanes:
            return
        log.warning(
            "origin %s lost (%s): abandoning what its %d lanes hold or wait for here",
            msg.origin,
            msg.reason,
            len(origin.lanes),
        )
        for ref, paths in origin.lanes.values():
            for path in sorted(paths):
                if not self.host.is_active(path):
                    continue  # passivated: it held nothing
                abandon = Abandon(lane=ref.name, path=path, reason=f"member lost: {msg.reason}")
                self.host.serve(LaneCall(lane=ref, path=path, canonical=True, request=abandon))


def unavailable_status(request: Status, path: str) -> StatusReply:
    """The status of a path whose member is unreachable (``counters.unavailable`` = 1)."""
    entry = FileStatus(path=path, fence=0, holder=None, queue=[], counters={"unavailable": 1})
    return StatusReply(id=request.id, files=[entry])
