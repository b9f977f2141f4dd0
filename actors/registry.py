"""Registry: one per actor system. Maps canonical paths to their SessionFile actors.

It resolves, confines, supervises and hands out channels; it is not a data path. Every first
contact with a file comes through here (``OpenChannel``): the path is resolved and confined to
the roots (refused in the ``ChannelOffer`` with ``path_not_allowed`` otherwise, nothing
created), the SessionFile is created on first use as this actor's child (so a crash reaches us
as ``ChildActorExited``), and the request is forwarded to it, which offers its channel; the
lanes' requests then go over that channel (a socket, or carried in thespian messages where no
socket can go: ``sessionlane.actors.carried``), never through here.

A file activated by an ``OpenChannel`` is started from a child the zygote parked ahead with its
listener already bound and its ``FileInit`` handed over (``sessionlane.actors.ahead``): the
Registry answers that ask itself with the listener, at once, and sends the file nothing (the
ask is not counted as forwarded: the asker's connection, not a message, is what keeps the file
from idling), so the asker connects while the file starts; the file accepts only once it holds
its ownership lock. A listener that closes before its welcome (the file could not activate, or
retired) makes the asker ask again without ``ahead``: that ask goes to the file, whose answer
says why.

Passivation is race-free: a SessionFile that has been idle (no holder, queue, traffic or open
channel) reports how many messages it received, and is retired only if that equals the number
forwarded to it, so nothing can be in flight to an actor that exits.

A SessionFile that dies otherwise is restarted at once; the lanes that used it are told
(``FileRestarted``) so they report their leases on it as revoked (``actor_restart``).

A SessionFile that could not activate (its file is owned by another service, cannot be
opened, has a corrupt fence sidecar, or descriptors ran out) answers every message it gets
with its error and says so (``ActivationFailed``); it is retired like an idle one, when it has
answered everything forwarded to it, and never restarted: the next call for the path activates
a new one, which tries again (the other owner may have gone).

At most one SessionFile process per path at a time, retiring ones included: a path whose
previous actor is still exiting (it holds the file's ownership lock until its process ends)
gets its new actor only once the old one's ``ChildActorExited`` arrives; messages for it wait
in the Registry meanwhile (bounded by ``_SUCCESSOR_WAIT_S``, after which it starts anyway).

Capacity. At most ``Configure.max_files`` SessionFiles live at once (retiring ones count until
they are gone: they still hold a process and its descriptors); a call or channel request for
one more file is refused ``too_many_files`` and the live files go on. Running out of
descriptors here is a refusal too (``sessionlane.actors.capacity``): a file is activated only with
descriptors to spare, and a child thespian could not start is never restarted in a loop.

In a convention (``Join``, sent by the Service) the Registry also routes first contacts: an
``OpenChannel`` for a path under another member's root goes to that member's Registry, whose
file offers the asker a carried channel; first contacts forwarded to us are served here and
never forwarded again. That part, and why no path ever gets two
SessionFiles across the convention, is ``sessionlane.actors.federation.Federation``.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from thespian.actors import ActorExitRequest, ChildActorExited, PoisonMessage, WakeupMessage

from sessionlane.actors import ahead
from sessionlane.actors._shell import Handler, ShellActor, addr_key, monotonic_ms, retitle
from sessionlane.actors.ahead import BoundAhead
from sessionlane.actors.capacity import fd_headroom, never_started
from sessionlane.actors.confined import containing_root
from sessionlane.actors.direct_channels import mint_ticket
from sessionlane.actors.federation import Federation
from sessionlane.actors.paths import canonicalize
from sessionlane.actors.registry_records import FileEntry, Gather, Gathers
from sessionlane.actors.session_file import SessionFile
from sessionlane.actors.timers import GatherTimeout, SuccessorWait
from sessionlane.messages.carried import CarriedLost
from sessionlane.messages.convention import Join, Member
from sessionlane.messages.errors import ErrorCode, PathNotAllowed
from sessionlane.messages.internal import (
    ActivationFailed,
    AwaitHolders,
    ChannelOffer,
    Configure,
    Configured,
    DirectAhead,
    Drain,
    Drained,
    FileInit,
    FileRestarted,
    FileStatusAnswer,
    FileStatusQuery,
    HoldersAwaited,
    IdleNotice,
    LaneClosed,
    OpenChannel,
    StatusQuery,
)
from sessionlane.messages.wire import Error, Status, StatusReply

__all__ = ["REGISTRY_NAME", "Registry"]

log = logging.getLogger(__name__)

REGISTRY_NAME = "sessionlane-registry"
_STATUS_TIMEOUT_S = 2.0
_DRAIN_TIMEOUT_S = 3.0
_RESTART_BURST = 5
_MAX_ALIASES = 64
_SUCCESSOR_WAIT_S = 5.0
"""How long a new SessionFile waits for its path's retiring predecessor to exit."""
_START_BACKOFF_MS = 1_000.0
"""After a SessionFile could not be started, new files are refused this long (no retry loop)."""


class Registry(ShellActor):
    log = log

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config: Configure | None = None
        self.files: dict[str, FileEntry] = {}
        self.children: dict[str, Any] = {}  # child key -> address, live or retiring
        self.by_address: dict[str, str] = {}  # child key -> path (live children only)
        self.retiring: dict[str, str] = {}  # child key -> path, asked to exit, not yet gone
        self.incarnations: dict[str, int] = {}
        self.gathers = Gathers()
        self.draining = False
        self.federation: Federation | None = None
        self.start_failed_at: float | None = None

    def receiveMessage(self, msg: Any, sender: Any) -> None:
        super().receiveMessage(msg, sender)
        ahead.run_deferred()  # the zygote parks the next child only once this is answered

    def handlers(self) -> dict[type, Handler]:
        federated: dict[type, Handler] = {t: self.on_federated for t in Federation.message_types()}
        return {
            **federated,
            Join: self.on_join,
            PoisonMessage: self.on_poison,
            Configure: self.on_configure,
            AwaitHolders: self.on_await_holders,
            OpenChannel: self.on_open_channel,
            IdleNotice: self.on_idle,
            ActivationFailed: self.on_activation_failed,
            ChildActorExited: self.on_child_exited,
            LaneClosed: self.on_lane_closed,
            StatusQuery: self.on_status,
            FileStatusAnswer: self.on_status_answer,
            Drain: self.on_drain,
            Drained: self.on_drained,
            WakeupMessage: self.on_wakeup,
            ActorExitRequest: self.on_exit,
        }

    def on_exit(self, msg: ActorExitRequest, sender: Any) -> None:
        # thespian tells the children to exit after this handler: their ChildActorExited must
        # not restart them (a SessionFile started now would outlive the system's shutdown).
        self.draining = True

    def on_configure(self, msg: Configure, sender: Any) -> None:
        self.config = msg
        retitle(self, f"registry {msg.file.owner.gateway if msg.file.owner else ''}".rstrip())
        self.send(sender, Configured())

    def on_await_holders(self, msg: AwaitHolders, sender: Any) -> None:
        """Activate the files whose holder may reclaim them (a start within the grace)."""
        activated = 0
        for path in msg.paths:
            if self.preactivate(path):
                activated += 1
        self.send(sender, HoldersAwaited(activated=activated, skipped=len(msg.paths) - activated))

    def preactivate(self, path: str) -> bool:
        """Start the SessionFile of ``path`` with no request for it; False when it is not
        (not serving, already active, outside the roots or another member's, no capacity)."""
        if not self.serving():
            return False
        assert self.config is not None
        try:
            path = canonicalize(path, self.config.roots, self.config.suffixes)
        except PathNotAllowed as exc:
            log.info("not awaiting the holder of %s: %s", path, exc.detail)
            return False
        federation = self.federation
        if path in self.files or (federation and federation.remote_owner(path) is not None):
            return False
        if (full := self.capacity_refusal(path)) is not None:
            log.warning("not awaiting the holder of %s yet: %s", path, full)
            return False
        self.activate(path)
        return True

    # Routing -------------------------------------------------------------------------------

    def serving(self) -> bool:
        return self.config is not None and not self.draining

    def on_open_channel(self, msg: OpenChannel, sender: Any) -> None:
        """A lane's first contact with ``msg.path``: served here, or by its convention owner."""
        federation = self.federation
        if federation is not None and self.serving() and federation.route_open(msg, sender):
            return
        self.open_here(msg.model_copy(update={"reply_to": sender}))

    def open_here(self, msg: OpenChannel) -> str | None:
        """Activate the file of ``msg.path`` and have it offer ``msg.reply_to`` a channel
        (never forwarded again); the canonical path, or None when refused.

        A refusal is an offer without a channel, whose ``code`` and ``reason`` answer the calls
        that waited for it: not serving, a path outside the roots, no capacity.
        """
        asker = msg.reply_to

        def refuse(reason: str, code: ErrorCode) -> None:
            offer = ChannelOffer(path=msg.path, nonce=msg.nonce, reason=reason, code=code)
            self.send(asker, offer)

        if not self.serving():
            refuse(
                "the registry is not serving", "shutting_down" if self.draining else "unavailable"
            )
            return None
        assert self.config is not None
        try:
            path = canonicalize(msg.path, self.config.roots, self.config.suffixes)
        except PathNotAllowed as exc:
            refuse(exc.detail, "path_not_allowed")
            return None
        entry = self.files.get(path)
        fresh, direct = entry is None, None
        if entry is None:
            if (full := self.capacity_refusal(path)) is not None:
                refuse(full, "too_many_files")
                return None
            direct = direct_ahead(msg)
            entry = self.activate(path, tickets=(direct,) if direct is not None else ())
        entry.lanes[addr_key(asker)] = asker
        if path != msg.path and len(entry.aliases) < _MAX_ALIASES:
            entry.aliases.add(msg.path)
        bound, entry.bound = entry.bound if fresh else None, None
        if bound is not None and msg.ahead and not msg.carried and SessionFile.channels:
            self.offer_ahead(msg, entry, bound, direct)  # answered: nothing goes to the file
            return path
        entry.forwarded += 1
        self.forward(entry, msg)
        return path

    def offer_ahead(
        self, msg: OpenChannel, entry: FileEntry, bound: BoundAhead, direct: DirectAhead | None
    ) -> None:
        """Answer the ask that activated ``entry`` with the listener bound ahead of its actor:
        the asker's hello waits in its backlog while the actor starts and opens the file (which
        accepts only once it holds the file's ownership lock). With the ticket minted for the
        ask's ``direct`` (``direct``), which the file took with its ``FileInit``."""
        assert self.config is not None
        offer = ChannelOffer(
            path=msg.path,
            nonce=msg.nonce,
            canonical=entry.path,
            address=bound.name,
            token=bound.token,
            incarnation=entry.incarnation,
            idle_ms=self.config.file.idle_ms,
            direct_ticket=direct.ticket if direct is not None else "",
        )
        self.send(msg.reply_to, offer)

    def drop_peers(self, path: str, peers: list[Any], reason: str, keep_ms: int = 0) -> None:
        """The convention member of ``peers`` is lost: the file closes their channels."""
        entry = self.files.get(path)
        if entry is not None:
            entry.forwarded += 1
            lost = CarriedLost(path=path, peers=tuple(peers), reason=reason, keep_ms=keep_ms)
            self.forward(entry, lost)

    def is_active(self, path: str) -> bool:
        return path in self.files

    def capacity_refusal(self, path: str) -> str | None:
        """Why a new SessionFile for ``path`` may not be started now, or None if it may."""
        assert self.config is not None
        live, cap = len(self.children), self.config.max_files
        if live >= cap:
            return (
                f"{live} files are live, max_files is {cap}: retry once idle files are "
                "passivated (idle_ms), or raise max_files"
            )
        failed, now = self.start_failed_at, monotonic_ms()
        if failed is not None and now - failed < _START_BACKOFF_MS:
            return (
                f"a file's actor could not be started {now - failed:.0f} ms ago (out of file "
                "descriptors or processes): retry in a moment"
            )
        return fd_headroom()

    def activate(
        self,
        path: str,
        restarts: deque[float] | None = None,
        tickets: tuple[DirectAhead, ...] = (),
    ) -> FileEntry:
        """A new entry for ``path``; its actor starts now (with ``tickets``: direct-channel
        tickets minted for it), or once its predecessor is gone."""
        incarnation = self.incarnations.get(path, 0) + 1
        self.incarnations[path] = incarnation
        key = f"{incarnation}:{path}"
        entry = FileEntry(path=path, address=None, incarnation=incarnation, key=key)
        if restarts is not None:
            entry.restarts = restarts
        self.files[path] = entry
        if path in self.retiring.values():
            log.debug("%s: waiting for the previous actor to exit", path)
            self.wakeupAfter(_SUCCESSOR_WAIT_S, payload=SuccessorWait(key))
        else:
            self.start_file(entry, tickets)
        return entry

    def start_file(self, entry: FileEntry, tickets: tuple[DirectAhead, ...] = ()) -> None:
        """Create ``entry``'s actor, initialise it, and hand it what waited for it."""
        assert self.config is not None and entry.address is None
        init = FileInit(
            path=entry.path,
            settings=self.config.file,
            incarnation=entry.incarnation,
            root=containing_root(entry.path, self.config.roots),
            restarted=bool(entry.restarts),  # only a restart after a death passes them
            tickets=tickets,
        )
        ahead.take_spawned()  # nothing left from a start that did not go through the zygote
        ahead.first(init)  # a parked child opens its file before thespian has connected it
        try:
            address = self.createActor(SessionFile)
        finally:
            ahead.take_first()
        entry.bound = ahead.take_spawned()
        entry.address = address
        self.children[entry.key] = address
        self.by_address[entry.key] = entry.path
        if entry.bound is None:  # no listener bound ahead: its FileInit goes by thespian
            # Nobody is offered a listener bound ahead, so no ticket minted for that offer
            # may reach the file (a parked child whose listener could not be bound is not
            # handed the FileInit above either: ``_Zygote.spawn``).
            self.send(address, init.model_copy(update={"tickets": ()}) if tickets else init)
        pending, entry.pending = entry.pending, []
        for message in pending:
            self.send(address, message)

    def forward(self, entry: FileEntry, message: Any) -> None:
        """To ``entry``'s actor, or held until it starts."""
        if entry.address is None:
            entry.pending.append(message)
        else:
            self.send(entry.address, message)

    def start_successor(self, path: str) -> None:
        entry = self.files.get(path)
        if entry is not None and entry.address is None and not self.draining:
            self.start_file(entry)

    def child_key(self, address: Any) -> str | None:
        """The key of the SessionFile child at ``address``, or None if it is not one.

        Not ``addr_key``: on multiproc bases ``createActor`` returns a local placeholder whose
        ``str()`` changes once the child is up and never equals the ``str()`` of the address
        the child later sends from (or exits with). thespian's ``==`` knows they are one actor.
        """
        for key, known in self.children.items():
            if known == address:
                return key
        return None

    # Passivation and restarts --------------------------------------------------------------

    def on_idle(self, msg: IdleNotice, sender: Any) -> None:
        if self.retire(msg.path, msg.received, sender):
            log.info("passivating %s after %d calls", msg.path, msg.received)

    def on_activation_failed(self, msg: ActivationFailed, sender: Any) -> None:
        if self.retire(msg.path, msg.received, sender):
            log.info("retiring the actor of %s (%s: %s)", msg.path, msg.code, msg.detail)

    def retire(self, path: str, received: int, sender: Any) -> bool:
        """Ask ``sender``, the actor of ``path``, to exit if every forwarded message reached it.

        False when it is not (or no longer) the path's actor, or a message is still in flight
        to it (it will ask again after answering it).
        """
        entry = self.files.get(path)
        if entry is None or entry.address is None or self.child_key(sender) != entry.key:
            return False
        if entry.forwarded != received:
            return False
        key = entry.key
        del self.files[path]
        self.by_address.pop(key, None)
        self.retiring[key] = path
        self.send(sender, ActorExitRequest())
        return True

    def on_child_exited(self, msg: ChildActorExited, sender: Any) -> None:
        key = self.child_key(msg.childAddress)
        if key is None:
            if self.federation is not None:
                self.federation.on_child_exited(msg.childAddress)
            return
        del self.children[key]
        if key in self.retiring:
            self.start_successor(self.retiring.pop(key))
            return
        path = self.by_address.pop(key, None)
        if path is None or self.draining:
            return
        old = self.files.pop(path)
        if never_started(msg.childAddress):
            self.not_started(old)
            return
        recent = old.died(monotonic_ms())
        log.error(
            "SessionFile for %s died (incarnation %d, %d restarts in the last minute); "
            "restarting, its leases are lost",
            path,
            old.incarnation,
            recent,
        )
        self.fail_gathers(key)
        if recent > _RESTART_BURST:
            log.error("not restarting %s: it keeps dying; the next call will try again", path)
        else:
            entry = self.activate(path, old.restarts)
            entry.lanes = old.lanes
            entry.aliases = old.aliases
        for lane in old.lanes.values():
            restarted = FileRestarted(
                path=path, aliases=sorted(old.aliases), incarnation=old.incarnation
            )
            self.send(lane, restarted)

    def not_started(self, old: FileEntry) -> None:
        """thespian could not start ``old``'s process (out of descriptors or processes).

        Not restarted: that would fail again at once. What was sent to it is lost, so its
        lanes are told as for a restart (unanswered requests get ``unavailable``, waiting
        acquires ask again and meet the capacity check).
        """
        log.error(
            "could not start a SessionFile for %s (thespian reported the child gone before "
            "it came up; out of file descriptors or processes?)",
            old.path,
        )
        self.start_failed_at = monotonic_ms()
        self.fail_gathers(old.key)
        restarted = FileRestarted(
            path=old.path, aliases=sorted(old.aliases), incarnation=old.incarnation
        )
        for lane in old.lanes.values():
            self.send(lane, restarted)

    def on_lane_closed(self, msg: LaneClosed, sender: Any) -> None:
        self.lane_closed(msg.address)
        if self.federation is not None:
            self.federation.lane_closed(msg.address)

    def lane_closed(self, address: Any) -> None:
        key = addr_key(address)
        for entry in self.files.values():
            entry.lanes.pop(key, None)

    # Convention ----------------------------------------------------------------------------

    def on_join(self, msg: Join, sender: Any) -> None:
        if self.config is None or self.federation is not None:
            log.error("ignoring a Join %s", "before Configure" if self.config is None else "again")
            return
        me = Member(
            key=msg.key,
            incarnation=msg.incarnation,
            roots=list(self.config.roots),
            registry=self.myAddress,
        )
        self.federation = Federation(
            self,
            me,
            msg.member_timeout_ms,
            directory_file=msg.directory_file,
            reclaim_grace_ms=msg.reclaim_grace_ms,
        )
        self.federation.join(sender)

    def on_federated(self, msg: Any, sender: Any) -> None:
        if self.federation is None:
            log.warning("dropped %s: this registry is in no convention", type(msg).__name__)
            return
        self.federation.handle(msg, sender)

    def on_poison(self, msg: PoisonMessage, sender: Any) -> None:
        if self.federation is not None and self.federation.on_poison(msg.poisonMessage):
            return
        log.warning("undeliverable %s: %s", type(msg.poisonMessage).__name__, msg.details)

    # Status and drain ----------------------------------------------------------------------

    def on_status(self, msg: StatusQuery, sender: Any) -> None:
        request, federation = msg.request, self.federation
        if request.path is not None and federation and federation.route_status(request, sender):
            return  # the path's owner is another member: it answers the gateway directly
        self.status_to(request, sender)

    def status_to(self, request: Status, reply_to: Any) -> None:
        """Answer ``reply_to`` with the status of ``request.path`` here (or of every file)."""
        entries = list(self.files.values())
        if request.path is not None and self.config is not None:
            try:
                path = canonicalize(request.path, self.config.roots, self.config.suffixes)
            except PathNotAllowed as exc:
                code: ErrorCode = "path_not_allowed"
                error = Error(id=request.id, code=code, detail=exc.detail, path=request.path)
                self.send(reply_to, error)
                return
            entries = [e for e in entries if e.path == path]
        qid = self.gathers.start(Gather(reply_to, request.id, {e.key for e in entries}))
        for entry in entries:
            entry.forwarded += 1
            self.forward(entry, FileStatusQuery(query=qid))
        self.wakeupAfter(_STATUS_TIMEOUT_S, payload=GatherTimeout(qid))
        self.answer(self.gathers.finish(qid))

    def on_status_answer(self, msg: FileStatusAnswer, sender: Any) -> None:
        self.answer(self.gathers.status(msg.query, self.child_key(sender), msg.status))

    def on_drain(self, msg: Drain, sender: Any) -> None:
        self.draining = True
        for entry in [e for e in self.files.values() if e.address is None]:
            self.abandon_waiting(entry)
        targets = {e.key: e.address for e in self.files.values()}
        qid = self.gathers.start(Gather(sender, None, set(targets), kind="drain"))
        for address in targets.values():
            self.send(address, Drain())
        self.wakeupAfter(_DRAIN_TIMEOUT_S, payload=GatherTimeout(qid))
        self.answer(self.gathers.finish(qid))

    def on_drained(self, msg: Drained, sender: Any) -> None:
        for gather in self.gathers.drained(self.child_key(sender)):
            self.answer(gather)

    def abandon_waiting(self, entry: FileEntry) -> None:
        """The service drains: answer what waited for a never-started actor, forget it."""
        del self.files[entry.path]
        pending, entry.pending = entry.pending, []
        for message in pending:
            if isinstance(message, OpenChannel):
                reason, code = "the service is stopping", "shutting_down"
                offer = ChannelOffer(
                    path=message.path, nonce=message.nonce, reason=reason, code=code
                )
                self.send(message.reply_to, offer)
        self.fail_gathers(entry.key)

    def on_wakeup(self, msg: WakeupMessage, sender: Any) -> None:
        match msg.payload:
            case GatherTimeout(query=qid):
                self.answer(self.gathers.finish(qid, force=True))
            case SuccessorWait(key=key):
                self.successor_waited(key)
            case beat if self.federation is not None and Federation.is_tick(beat):
                self.federation.tick()

    def successor_waited(self, key: str) -> None:
        """The predecessor of entry ``key`` did not exit in time: start it anyway."""
        entry = next((e for e in self.files.values() if e.key == key), None)
        if entry is not None and entry.address is None and not self.draining:
            log.warning(
                "%s: the previous actor has not exited within %.0f s; starting anyway",
                entry.path,
                _SUCCESSOR_WAIT_S,
            )
            self.start_file(entry)

    def fail_gathers(self, key: str) -> None:
        """The child ``key`` will never answer: complete the fan-outs that waited for it."""
        for gather in self.gathers.gone(key):
            self.answer(gather)

    def answer(self, gather: Gather | None) -> None:
        """Answer a completed fan-out (None: nothing completed)."""
        if gather is None:
            return
        if gather.kind == "drain":
            self.send(gather.reply_to, Drained(files=len(self.files)))
            return
        files = sorted(gather.answers, key=lambda f: f.path)
        self.send(gather.reply_to, StatusReply(id=gather.request_id, files=files))


def direct_ahead(msg: OpenChannel) -> DirectAhead | None:
    """The ticket for the ``direct`` of an ask that activates a new file, if it may be
    answered ahead (its listener is bound ahead, for a socket channel); None otherwise."""
    if msg.direct is None or not msg.ahead or msg.carried or not SessionFile.channels:
        return None
    return msg.direct.model_copy(update={"ticket": mint_ticket()})
