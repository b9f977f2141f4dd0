"""Conventions: several sessionlane services acting as one, each path served where its root is.

A convention is a thespian convention of sessionlane services ("members"). The leader is a
service started without ``leader`` (with a fixed ``admin_port``); every other member names it.
Each member advertises its roots, its identity ``bind_host:admin_port`` (:data:`CAP_MEMBER`) and
a fresh incarnation id per actor system (:data:`CAP_INCARNATION`) as thespian capabilities.
A client may connect to any member's gateway; a request for a path is served by the SessionFile
on the member whose root holds the path.

**Never two SessionFile actors for one path.** Three rules make it so:

1. Only the owner creates. A Registry creates a SessionFile only for a path that canonicalises
   inside *its own* roots (``Registry.open_here``, unchanged from one machine), and on one member
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
3. First contacts are forwarded, never served, by non-owners, and forwarded at most once. A
   Registry that gets an ``OpenChannel`` for a path under another member's root hands it to a
   :class:`Relay`: an actor
   it created with ``targetActorRequirements`` naming the owner's incarnation and root, which
   :meth:`Relay.actorSystemCapabilityCheck` lets only that one actor system host (never a
   refused newcomer, never a stale registration of a restarted member). The relay, living on
   the owner, passes it to the owner's Registry (looked up there by ``globalName``), which
   serves it or refuses it but never forwards a ``Forwarded`` one again: two Registries that
   briefly disagree about the table cause a refusal, never a second owner or a loop.

The owner's file answers the lane's actor (a Lane, a gateway; its address travels in the
``OpenChannel``) with a carried channel (``sessionlane.actors.carried``): the lane's calls
then go to the file directly as channel frames in thespian messages, and the replies come
straight back; no Registry or relay is on that path. Order per lane holds because a channel
is one sender/target pair, which thespian keeps in order.

**Member loss.** Each Registry sends a ``Beat`` through every relay it uses every
``member_timeout_ms / 4``; the owner's Registry answers ``BeatAck`` directly. The owner is lost
when it stays silent for ``member_timeout_ms``, when the relay exits (``ChildActorExited``: a
member that shuts down or leaves), when the relay cannot be created or reached
(``PoisonMessage``), or when the directory's table no longer names that incarnation. Then, at
once: every link actor that used the member gets ``FileRestarted`` for each path it used there,
which loses its channel there (the lane reports its lease there ``revoked``, reason
``actor_restart``, unanswered writes ``unknown_outcome``, other requests ``unavailable``, and
re-sends its pending acquires, which are now answered ``unavailable``); a first contact the
member may never have received (sent since its last ``BeatAck``) is answered with a refused
offer (``unavailable``); and new first contacts for its roots get ``unavailable`` at once, with
a background probe (a fresh relay, exponential backoff capped at 3 s) in case the member was
only slow.
The old relay is told to exit: if the owner was alive after all, the relay's exit makes it
abandon our lanes' leases, so nothing stays held for a lane that was told it lost it.

The same watchdog runs the other way: a relay whose origin falls silent for
``member_timeout_ms`` (the origin member died with its lanes) tells its Registry
``OriginLost``, and the owner's files close the carried channels of that origin's link actors,
abandoning their lanes' leases and waits. A member that
comes back is a new incarnation; once the directory admits it, every Registry gets the new
table and its next call creates a new relay. Its fences continue upward: they are persisted per
path in the fence sidecars (``sessionlane.actors.fencestore``), not kept in memory.

The leader is special in two ways, both thespian's: only it knows every member (members know
only the leader), so a relay to a member not used before is placed through it; and the
directory lives there. If the leader dies, relays already in place keep working, but new
members cannot join and first contacts fail ``unavailable``. The directory keeps its table in
the leader's state directory on every change, and a restarted leader reads it back before it
answers any claim: a member it names keeps its roots (an overlapping claim is refused) until
it claims them again or :data:`UNCONFIRMED_TIMEOUT_S` passes. Every member checks in with the
directory every ``member_timeout_ms / 4``; when it stays silent for ``member_timeout_ms`` the
member claims its roots again (once per ``member_timeout_ms``) until a directory answers, then
makes its actor system register with the leader's at once (a capability update), so relays can
be placed on it again. No member restarts, and no lease is revoked, for a leader restart (but
the leader's own files' leases, which lived in the leader).

**Trust.** Every message between members is pickled by thespian and unpickled by the receiver,
so every frame carries a MAC under the members' shared secret (``cluster_key_file``,
``sessionlane.system.runtime.transport_auth``): a frame from anyone without the key is dropped
before it is unpickled, and a member with another key cannot join (its claim never reaches the
directory). Without a key, members must set ``trusted_network = true``, which sends frames
unauthenticated: then anyone who can reach a member's ports can run code as the service's user
(``sessionlane.system.config``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from thespian.actors import ActorExitRequest, ActorSystemConventionUpdate, WakeupMessage

from sessionlane.actors._shell import Handler, ShellActor, monotonic_ms
from sessionlane.messages.convention import (
    Admitted,
    Beat,
    Checkin,
    CheckinAck,
    Claim,
    Forwarded,
    ForwardedClose,
    ForwardedStatus,
    Hop,
    Member,
    Members,
    OriginLost,
    Refused,
    RelayInit,
)

__all__ = [
    "CAP_INCARNATION",
    "CAP_LEADER",
    "CAP_MEMBER",
    "CAP_ROOT",
    "CAP_ROOTS",
    "DIRECTORY_NAME",
    "Admission",
    "Claimant",
    "Directory",
    "Relay",
    "admit",
    "load_table",
    "member_capabilities",
    "owner_of",
    "roots_overlap",
    "save_table",
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
UNCONFIRMED_TIMEOUT_S = 3 * (7 * 60 + 22)
"""How long a member read back from the directory's file keeps its roots without claiming them
again: thespian's own wait for a vanished member (three missed re-registrations)."""


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


def load_table(path: str) -> tuple[int, list[Member]]:
    """The table version and members a directory kept in ``path`` (none if there is no file).

    Members read back carry no Registry address: they are known to have been admitted, not to
    be alive. An unreadable file is reported and read as empty (a leader that kept nothing).
    """
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        members = [
            Member(key=m["key"], incarnation=m["incarnation"], roots=m["roots"], registry=None)
            for m in data["members"]
        ]
        return int(data["version"]), members
    except FileNotFoundError:
        return 0, []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("the directory's table in %s is unreadable (%s): starting empty", path, exc)
        return 0, []


def save_table(path: str, version: int, members: Iterable[Member]) -> None:
    """Keep the table in ``path`` (replaced atomically, private to the service's user)."""
    data = {
        "version": version,
        "members": [
            {"key": m.key, "incarnation": m.incarnation, "roots": m.roots} for m in members
        ],
    }
    partial = f"{path}.partial"
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(partial, path)
    except OSError as exc:
        log.error("could not keep the directory's table in %s: %s", path, exc)


# Actors -------------------------------------------------------------------------------------


class Directory(ShellActor):
    """On the leader: the table of admitted members; admits one claim at a time.

    The table is kept in the leader's ``directory_file`` on every change. A restarted leader
    reads it back before it answers any claim: the members it names keep their roots (claims
    overlapping them are refused) until they claim them again, which they do as soon as the
    directory answers (they check in, see :class:`sessionlane.actors.federation.Federation`),
    or until :data:`UNCONFIRMED_TIMEOUT_S` passes without a word from them.
    """

    log = log

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.members: dict[str, Member] = {}  # key -> member
        self.version = 0
        self.watching = False
        self.file: str | None = None
        """Where the table is kept; None until the leader's own claim said where."""
        self.waiting: list[tuple[Claim, Any]] = []
        self.unconfirmed: set[str] = set()
        """Keys read back from the file that have not claimed again."""

    def handlers(self) -> dict[type, Handler]:
        return {
            Claim: self.on_claim,
            Checkin: self.on_checkin,
            ActorSystemConventionUpdate: self.on_update,
            WakeupMessage: self.on_wakeup,
        }

    def on_claim(self, msg: Claim, sender: Any) -> None:
        if not self.watching:
            self.watching = True
            self.notifyOnSystemRegistrationChanges(True)
        if self.file is None:
            if msg.directory_file is None:
                self.waiting.append((msg, sender))  # answered once the table is read back
                return
            self.open(msg.directory_file)
            waiting, self.waiting = self.waiting, []
            for claim, claimant in [(msg, sender), *waiting]:
                self.decide(claim, claimant)
            return
        self.decide(msg, sender)

    def open(self, path: str) -> None:
        self.file = path
        if not path:
            return
        self.version, members = load_table(path)
        for member in members:
            self.members[member.key] = member
            self.unconfirmed.add(member.key)
        if members:
            log.warning(
                "directory restarted: %d members read back from %s keep their roots until"
                " they claim them again (or for %d s)",
                len(members),
                path,
                UNCONFIRMED_TIMEOUT_S,
            )
            self.wakeupAfter(float(UNCONFIRMED_TIMEOUT_S))

    def decide(self, msg: Claim, sender: Any) -> None:
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
        self.unconfirmed.discard(claim.key)
        if known != claim:
            self.version += 1
            log.info("admitted member %s with roots %s", claim.key, ", ".join(claim.roots))
            self.changed(exclude=claim.key)
        admitted = Admitted(
            version=self.version, members=list(self.members.values()), directory=self.myAddress
        )
        self.send(sender, admitted)

    def on_checkin(self, msg: Checkin, sender: Any) -> None:
        known = self.members.get(msg.key)
        if known is not None and known.incarnation == msg.incarnation:
            self.send(msg.registry, CheckinAck(seq=msg.seq))
        # Otherwise no answer: the member claims again (and is admitted or refused).

    def on_update(self, msg: ActorSystemConventionUpdate, sender: Any) -> None:
        if msg.remoteAdded:
            return
        incarnation = (msg.remoteCapabilities or {}).get(CAP_INCARNATION)
        gone = [m for m in self.members.values() if m.incarnation == incarnation]
        self.drop(gone, "left the convention")

    def on_wakeup(self, msg: WakeupMessage, sender: Any) -> None:
        silent = [self.members[key] for key in sorted(self.unconfirmed) if key in self.members]
        self.drop(silent, f"dropped: it did not claim its roots again in {UNCONFIRMED_TIMEOUT_S} s")

    def drop(self, gone: list[Member], why: str) -> None:
        for member in gone:
            log.warning("member %s %s", member.key, why)
            del self.members[member.key]
            self.unconfirmed.discard(member.key)
        if gone:
            self.version += 1
            self.changed()

    def changed(self, exclude: str | None = None) -> None:
        """Keep the new table, then tell every member that can be told (not ``exclude``)."""
        if self.file:
            save_table(self.file, self.version, self.members.values())
        table = Members(version=self.version, members=list(self.members.values()))
        for member in self.members.values():
            if member.key != exclude and member.registry is not None:
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
        directory = self.createActor(Directory, globalName=DIRECTORY_NAME)
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
        # Imported here, not at the top: the Registry's module imports this one (through its
        # Federation), and the relay is the one actor of the convention that creates it.
        from sessionlane.actors.registry import REGISTRY_NAME, Registry

        self.registry = self.createActor(Registry, globalName=REGISTRY_NAME)
        self.wakeupAfter(self.timeout_ms / 2000.0)

    def on_hop(self, msg: Hop, sender: Any) -> None:
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
