"""Links: how lanes reach the SessionFiles (the gateway's and the Lane actor's). One link per
canonical path.

The gateway never resolves a path itself: the Registry does, once, in answer to the link's
``OpenChannel``, and the link is keyed by that answer (see ``Links``).

A link starts ``opening``: the gateway asks the Registry for a channel (``OpenChannel``; the
Registry resolves, confines and activates the file, or has the convention member that owns
the path do so) and queues the path's calls meanwhile. The SessionFile answers with a
``ChannelOffer``; the gateway connects to it, says hello with the offer's token, and once
welcomed sends the queued calls and every later one straight over the channel
(``sessionlane.messages.channel``): one socket hop each way instead of five thespian messages.
The offer names a socket, or the file's actor for a *carried* channel (the same frames in
thespian messages, ``sessionlane.actors.carried``): from another convention member's host, and
on a base that cannot watch sockets (``simpleSystemBase``). Either way the link is the same
state machine, and no call goes through the Registry. A path the Registry refuses (outside the
roots, no capacity, the service draining, its member lost) or whose file could not activate
is answered from the refusal itself (the offer's ``code`` and ``reason``), and the next call
for it asks again: a refused path has no route of its own.

Order per lane and file holds because a path's calls use one route at a time: queued while
opening, then all on the channel. A link changes route only when
nothing of it is in flight: a channel the gateway closes is idle (no lane holds a lease on
the path or waits for an answer from it), and a channel that breaks has lost whatever was in
flight: the lanes are told so (``sessionlane.actors.lane_state.ChannelLost``, its own event):
leases on it are revoked, waiting acquires are queued again, other unanswered requests are answered
``unavailable``.

Each death of a SessionFile is handled once: the channel breaking and the Registry's
``FileRestarted`` both name the incarnation, and the later of the two is ignored. A
connection refused before the welcome (a file being passivated, or already gone) lost
nothing: the link just asks again.

Routing is stateless. A request names its path, or a lease whose id names its file's route:
``route_of`` maps a route to the canonical path of a file these links reach, and the file
itself checks that the lane holds the lease. What the links keep of the leases granted through
them (the routes, and per file the one lease still held: what a lost channel or a restarted
file takes with it, and why a channel whose lease is held is not closed as idle) is
``sessionlane.actors.link_leases.LinkLeases``, ``Links.leases``.

One state machine for both carriers (the carried end itself is
``sessionlane.actors.carried``) and for a reclaim's first contact.

The channel's socket is an ``sessionlane.actors.endpoint.FramedSocket``; nothing here blocks: the
connect is non-blocking (an ``AF_UNIX`` connect completes at once or fails, a full backlog
included, and is then asked for again), and output is queued and written by ``flush``.

A new channel's acquires (and a client's ``direct``) are written right after the hello, before
the welcome (``send_early``): a new file's listener is offered before the file has started
(``sessionlane.actors.ahead``), and they wait in its backlog with the hello.

About 650 lines: one state machine, its two carriers and its timers (and the answer to a
client's `direct` that the Registry gave with a new file's offer).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from sessionlane.actors.carried import CarriedEnd, split_frames
from sessionlane.actors.endpoint import OUT_OF_DESCRIPTORS, FramedSocket, connect_unix
from sessionlane.actors.lane_state import ChannelLost
from sessionlane.actors.link_leases import LinkLeases
from sessionlane.messages.carried import CarriedCalls, CarriedReplies
from sessionlane.messages.channel import (
    ChannelReply,
    ChannelWelcome,
    call_frame,
    decode_from_file,
    hello_frame,
)
from sessionlane.messages.codec import FrameDecodeError
from sessionlane.messages.internal import (
    ChannelOffer,
    DirectAhead,
    FileReply,
    FileRestarted,
    LaneCall,
    OpenChannel,
)
from sessionlane.messages.wire import (
    Abandon,
    Abandoned,
    Acquire,
    Direct,
    DirectOffer,
    Error,
)

__all__ = ["LinkHost", "Links"]

log = logging.getLogger(__name__)

_RECV_BYTES = 256 * 1024
_MAX_CHANNEL_FRAME = 64 * 1024 * 1024
_RETRY_MS = 20.0
"""Ask the Registry again this long after a refused connection (the file was retiring)."""
_OPEN_TIMEOUT_MS = 2_000.0
"""Ask again if no offer came in this long (the request went to an actor that died)."""
_MAX_SPELLINGS = 4096
"""Spellings remembered (with their links); past it those of resolved links are forgotten
(asked again when used again), and with that many still unresolved a new one is refused."""


class LinkHost(Protocol):
    """What links need from the gateway actor."""

    registry: Any

    def send(self, target: Any, message: Any) -> None: ...

    def deliver(self, reply: FileReply) -> None:
        """Hand a file's reply to the lane ``reply.lane``."""

    def restarted(self, msg: FileRestarted, holder: tuple[str, str] | None) -> None:
        """Tell every lane that the file's actor died: what was in flight to it is lost, and
        ``holder`` ((lane uid, lease), if one was held) lost its lease."""

    def channel_lost(self, msg: ChannelLost) -> None:
        """Tell every lane that the channel to a file broke: what was in flight is lost."""

    def in_use(self, path: str) -> bool:
        """Whether any lane waits for an answer from ``path`` (held leases: ``Links.leases``)."""


Mode = Literal["opening", "connecting", "channel"]


@dataclass(eq=False)
class _Link:
    path: str
    """The canonical path, the Registry's answer (until ``resolved``: the spelling asked)."""
    mode: Mode
    resolved: bool = True
    """Whether the Registry answered with the canonical path."""
    nonce: int = 0
    asked_at: float = 0.0
    retry_at: float | None = None
    queue: list[LaneCall] = field(default_factory=list)
    early: int = 0
    """How many calls at the head of ``queue`` were written after the hello on this socket,
    before its welcome (``_may_go_early``); they are sent again if the hello is refused."""
    end: FramedSocket | CarriedEnd | None = None
    incarnation: int = 0
    handled: int = 0
    """The latest incarnation whose death the lanes were told of."""
    raws: set[str] = field(default_factory=set)
    last_used: float = 0.0
    ahead: bool = True
    """Whether the next ask may be answered with a listener bound ahead (``OpenChannel.ahead``):
    not after one closed before its welcome, until a welcome comes."""
    asked_reclaim: bool = False
    """Whether the last ``OpenChannel`` said a reclaim waits (``OpenChannel.reclaim``)."""
    asked_direct: LaneCall | None = None
    """The client's ``direct`` the last ``OpenChannel`` carried (``OpenChannel.direct``)."""
    idle_ms: float | None = None
    """Close the channel after this long unused: half the file's own idle time, from its
    offer (None: the links' default)."""


class Links:
    """Every link of the gateway, by the Registry's canonical path and by the spellings used.

    A path is resolved once, by the Registry: a call naming a spelling not seen before opens
    a link keyed by that spelling, and the ``ChannelOffer`` names the canonical path (two
    spellings of one file then share one link). Until then the lanes whose calls wait on it
    are held back (their later calls wait behind, whatever the path), so a lane's calls to
    one file keep their order even when it names the file two ways.
    """

    def __init__(self, host: LinkHost, idle_ms: float, clock: Callable[[], float]) -> None:
        self.host = host
        self.idle_ms = idle_ms
        self.clock = clock
        self.links: dict[str, _Link] = {}
        """Resolved links, by canonical path."""
        self.spellings: dict[str, _Link] = {}
        """Every spelling lanes used (bounded), to its link, resolved or not."""
        self.held: dict[str, list[LaneCall]] = {}
        """Lanes with a call on a link not yet resolved: their later calls, in order."""
        self.by_fd: dict[int, _Link] = {}
        self.carried: dict[int, _Link] = {}
        """Links whose channel is carried by messages (``sessionlane.actors.carried``), by id."""
        self.by_nonce: dict[int, _Link] = {}
        self.nonces = itertools.count(1)
        self.leases = LinkLeases()
        """The lease routes, and the lease held on each file, granted through these links."""

    def route_of(self, lease: str) -> str | None:
        """The canonical path of the file that granted ``lease``, if these links reach it."""
        return self.leases.route_of(lease)

    # Calls from lanes ----------------------------------------------------------------------

    def call(self, call: LaneCall) -> None:
        """Route ``call`` (in order per lane and file)."""
        held = self.held.get(call.lane.uid)
        if held is not None:
            held.append(call)
        else:
            self.route(call)

    def route(self, call: LaneCall) -> None:
        link = self.links.get(call.path) if call.canonical else self.spellings.get(call.path)
        if link is None and isinstance(call.request, Abandon):
            # No link: this lane holds nothing there and has nothing in flight to it (a link
            # is kept while its path is in use), so nothing is opened or started for this.
            done = Abandoned(id=call.request.id, leases=[])
            self.host.deliver(FileReply(path=call.path, message=done, lane=call.lane.uid))
            return
        if link is None:
            link = self.open(call)
            if link is None:
                detail = f"{_MAX_SPELLINGS} paths wait for their first answer: retry in a moment"
                error = Error(id=call.request.id, code="unavailable", detail=detail, path=call.path)
                self.host.deliver(FileReply(path=call.path, message=error, lane=call.lane.uid))
                return
        link.last_used = self.clock()
        if not link.resolved:
            link.queue.append(call)
            self.held.setdefault(call.lane.uid, [])
            return
        if isinstance(call.request, Abandon) and link.mode == "opening":
            self.abandon_reclaims(link, call)
        self.send_on(link, call)
        if link.mode == "opening" and _is_reclaim(call) and not link.asked_reclaim:
            self.ask(link)  # asked before the reclaim came: a lost member would refuse it

    def abandon_reclaims(self, link: _Link, abandon: LaneCall) -> None:
        """``abandon``'s lane lets the path go while its reclaim waits for the link (for a lost
        member): the reclaim is refused here, and the Registry asked again without it (which
        ends the wait there)."""
        mine = [c for c in link.queue if _is_reclaim(c) and c.lane.uid == abandon.lane.uid]
        if not mine:
            return
        link.queue = [c for c in link.queue if c not in mine]
        why = "the lane abandoned the path while its lease was being reclaimed"
        for call in mine:
            error = Error(id=call.request.id, code="unavailable", detail=why, path=call.path)
            self.host.deliver(FileReply(path=call.path, message=error, lane=call.lane.uid))
        if not any(_is_reclaim(c) for c in link.queue):
            self.ask(link)

    def open(self, call: LaneCall) -> _Link | None:
        """A new link for ``call``'s path, asking the Registry for a channel."""
        if call.canonical:
            link = self.links[call.path] = _Link(path=call.path, mode="opening")
        elif len(self.spellings) >= _MAX_SPELLINGS and not self.prune_spellings():
            return None
        else:
            link = _Link(path=call.path, mode="opening", resolved=False, raws={call.path})
            self.spellings[call.path] = link
        self.ask(link, call)
        return link

    def prune_spellings(self) -> bool:
        """Forget the spellings of resolved links (a spelling used again is asked again and
        joins its link); whether any was forgotten."""
        known = [raw for raw, link in self.spellings.items() if link.resolved]
        for raw in known:
            del self.spellings[raw]
        return bool(known)

    def send_on(self, link: _Link, call: LaneCall) -> None:
        if link.mode == "channel":
            self.send_call(link, call)
            return
        link.queue.append(call)
        self.send_early(link)

    def send_early(self, link: _Link) -> None:
        """On a socket whose welcome has not come yet, write the calls at the head of the
        queue that may go before it (``_may_go_early``), in order: a new file's hello waits
        in its listener's backlog while the file starts (``sessionlane.actors.ahead``), and
        they wait there with it instead of a round trip after the welcome."""
        if link.mode != "connecting" or not isinstance(link.end, FramedSocket):
            return
        while link.early < len(link.queue) and _may_go_early(link.queue[link.early]):
            self.send_call(link, link.queue[link.early])
            link.early += 1

    def release(self, calls: list[LaneCall]) -> None:
        """A link was resolved: ``calls`` went on; their lanes' held-back calls follow."""
        for uid in dict.fromkeys(call.lane.uid for call in calls):
            for later in self.held.pop(uid, []):
                self.call(later)

    def send_call(self, link: _Link, call: LaneCall) -> None:
        lane = call.lane
        assert link.end is not None
        self.leases.sent(link.path, lane.uid, call.request)
        link.end.queue(call_frame(lane.uid, lane.name, lane.priority, call.request))

    def ask(self, link: _Link, first: LaneCall | None = None) -> None:
        """Ask the Registry for a channel to ``link``'s file (again); ``first``: a call about to
        be queued on it. Whether a queued call is a reclaim is said (``OpenChannel.reclaim``)."""
        self.by_nonce.pop(link.nonce, None)
        link.mode, link.retry_at = "opening", None
        link.nonce = next(self.nonces)
        link.asked_at = self.clock()
        self.by_nonce[link.nonce] = link
        reclaim = any(_is_reclaim(call) for call in (*link.queue, *([first] if first else [])))
        link.asked_reclaim = reclaim
        direct = _direct_ahead(first) if first is not None else None
        link.asked_direct = first if direct is not None else None
        ask = OpenChannel(
            path=link.path, nonce=link.nonce, reclaim=reclaim, ahead=link.ahead, direct=direct
        )
        self.host.send(self.host.registry, ask)

    # From the Registry and the files -------------------------------------------------------

    def on_offer(self, offer: ChannelOffer) -> None:
        link = self.by_nonce.pop(offer.nonce, None)
        if link is None or link.mode != "opening":
            return  # an answer to a request given up on
        asked_direct, link.asked_direct = link.asked_direct, None
        if offer.code is not None:
            self.refused(link, offer)
            return
        if offer.canonical is not None and offer.address is not None:
            self.leases.learn_route(offer.canonical)
        if not link.resolved and offer.canonical is not None:
            link = self.resolve(link, offer.canonical)
            if link.mode != "opening":
                return  # merged into a link that is past this
        channel = offer.address is not None or offer.file is not None
        if not channel or offer.canonical != link.path:
            log.error("an offer for %s names no channel to it: %s", link.path, offer)
            detail = "the file's actor offered no usable channel: retry in a moment"
            self.refused(link, offer.model_copy(update={"code": "unavailable", "reason": detail}))
            return
        if offer.direct_ticket and asked_direct is not None:
            self.answer_direct(link, asked_direct, offer)
        self.connect(link, offer)

    def answer_direct(self, link: _Link, asked: LaneCall, offer: ChannelOffer) -> None:
        """The Registry activated ``link``'s file for a client's ``direct`` (``asked``) and
        minted its ticket, which the file took with its ``FileInit``: answered here, from the
        offer, instead of by the file after its welcome (one hop less on a first grant). The
        client's hello with it waits in the listener's backlog behind ours."""
        found = next((i for i, call in enumerate(link.queue) if call is asked), None)
        if found is None or offer.address is None:
            return  # answered, refused or moved since: the file answers it as any other
        del link.queue[found]
        reply = DirectOffer(
            id=asked.request.id, address=offer.address, ticket=offer.direct_ticket, path=link.path
        )
        self.host.deliver(FileReply(path=link.path, message=reply, lane=asked.lane.uid))

    def resolve(self, link: _Link, canonical: str) -> _Link:
        """The Registry named ``link``'s canonical path: the link it is (maybe another one's,
        reached by another spelling, into which it merges); its waiting calls go on."""
        queued, link.queue = link.queue, []
        into = self.links.get(canonical)
        if into is None:
            link.path, link.resolved = canonical, True
            self.links[canonical] = into = link
        else:
            into.raws |= link.raws
            for raw in link.raws:
                self.spellings[raw] = into
        for call in queued:
            self.send_on(into, call)
        self.release(queued)
        return into

    def connect(self, link: _Link, offer: ChannelOffer) -> None:
        """Connect to the offered channel (without blocking) and queue the hello."""
        if offer.file is not None:
            end = CarriedEnd(offer.file, link.path, self.host.send)
            self.carried[id(link)] = link
            self.greet(link, end, offer)
            return
        assert offer.address is not None
        try:
            sock = connect_unix(offer.address)
        except OSError as exc:
            if exc.errno in OUT_OF_DESCRIPTORS:
                log.warning("no channel to %s: %s", link.path, exc)
                detail = f"the gateway is out of file descriptors ({exc}): retry in a moment"
                self.refused(
                    link, offer.model_copy(update={"code": "unavailable", "reason": detail})
                )
                return
            log.debug("channel to %s refused (%s): asking again", link.path, exc)
            link.retry_at, link.ahead = self.clock() + _RETRY_MS, False
            return
        socket_end = FramedSocket(sock, _MAX_CHANNEL_FRAME, read_budget=_RECV_BYTES)
        self.by_fd[socket_end.fd] = link
        self.greet(link, socket_end, offer)

    def greet(self, link: _Link, end: FramedSocket | CarriedEnd, offer: ChannelOffer) -> None:
        """Queue the hello on ``link``'s new channel end; the welcome opens it."""
        link.end = end
        end.queue(hello_frame(offer.token))
        link.incarnation = offer.incarnation
        link.idle_ms = offer.idle_ms / 2 if offer.idle_ms else None
        link.mode = "connecting"
        link.early = 0
        self.send_early(link)

    def refused(self, link: _Link, offer: ChannelOffer) -> None:
        """The Registry refused the path, or its file's actor could not activate (another
        owner, an unusable file): answer the calls waiting for it with the offer's error and
        drop the link, so the next call asks again."""
        assert offer.code is not None
        queued, link.queue = link.queue, []
        self.forget(link)
        for call in queued:
            error = Error(id=call.request.id, code=offer.code, detail=offer.reason, path=call.path)
            self.host.deliver(FileReply(path=call.path, message=error, lane=call.lane.uid))
        self.release(queued)

    def on_restarted(self, msg: FileRestarted) -> None:
        """The Registry restarted ``msg.path``'s actor (or lost its convention member)."""
        link = self.links.get(msg.path)
        if link is None:  # maybe one still waiting for its offer, by a spelling
            link = next((self.spellings[a] for a in msg.aliases if a in self.spellings), None)
        if link is None:
            self.host.restarted(msg, self.leases.lost_holder(msg.path))
            return
        if link.mode == "opening":
            if msg.incarnation > link.handled:
                link.handled = msg.incarnation
            self.ask(link)  # our request may have gone to the actor that died
            return
        if msg.incarnation and msg.incarnation < link.incarnation:
            return  # an older death, handled when it happened
        self.lost(link, "the registry reports its actor restarted", msg)

    def fds(self) -> list[int]:
        return list(self.by_fd)

    def owns(self, fd: int) -> bool:
        return fd in self.by_fd

    def on_carried(self, msg: CarriedReplies) -> None:
        """Frames a file's actor carried to us: handled exactly as a socket's."""
        link = self.links.get(msg.path)
        if link is None or not isinstance(link.end, CarriedEnd):
            return  # a channel given up on (its frames answer nothing any more)
        if msg.incarnation != link.incarnation:
            return  # from an earlier actor of the file, whose death was handled
        end = link.end
        try:
            for body in split_frames(msg.frames, _MAX_CHANNEL_FRAME):
                if link.end is not end:
                    return  # lost while handling an earlier frame
                self.on_frame(link, decode_from_file(body))
        except FrameDecodeError as exc:
            log.error("bad frame on the carried channel to %s: %s", link.path, exc)
            self.lost(link, "bad frame")
            return
        if msg.closed and link.end is end:
            self.lost(link, f"channel closed by the file's actor: {msg.closed}")

    def undeliverable(self, msg: CarriedCalls) -> None:
        """thespian could not deliver frames we carried: that channel is lost (the lanes learn
        what was in flight, as for a socket that broke)."""
        link = self.links.get(msg.path)
        if link is not None and isinstance(link.end, CarriedEnd):
            self.lost(link, "frames to the file's actor could not be delivered")

    def on_ready(self, fd: int) -> None:
        link = self.by_fd.get(fd)
        if link is None or not isinstance(link.end, FramedSocket):
            return
        end = link.end
        got = end.read()
        try:
            for body in got.bodies:
                if link.end is not end:
                    return  # lost while handling an earlier frame
                self.on_frame(link, decode_from_file(body))
        except FrameDecodeError as exc:
            log.error("bad frame on the channel to %s: %s", link.path, exc)
            self.lost(link, "bad frame")
            return
        if got.too_large is not None:
            log.error("bad frame on the channel to %s: %s", link.path, got.too_large)
            self.lost(link, "bad frame")
        elif got.error is not None:
            self.lost(link, f"channel error: {got.error}")
        elif got.ended is not None:
            self.lost(link, "channel closed by the file's actor")

    def on_frame(self, link: _Link, frame: ChannelWelcome | ChannelReply) -> None:
        if isinstance(frame, ChannelWelcome):
            if link.mode != "connecting" or frame.incarnation != link.incarnation:
                raise FrameDecodeError("unexpected welcome")
            link.mode, link.ahead = "channel", True
            queued, link.queue = link.queue[link.early :], []
            link.early = 0
            for call in queued:
                self.send_call(link, call)
            return
        if link.mode != "channel":
            raise FrameDecodeError("a reply before the welcome")
        link.last_used = self.clock()
        reply = FileReply(path=link.path, message=frame.message, lane=frame.uid)
        self.leases.observe(reply)
        self.host.deliver(reply)

    def lost(self, link: _Link, reason: str, restarted: FileRestarted | None = None) -> None:
        """The channel broke (or was refused, or ``restarted`` says its file's actor or member
        is gone): close it; the lanes learn what was lost, then it is asked for again."""
        was = link.mode
        self.close_socket(link)
        link.early = 0  # written on the end just closed: the next one sends them again
        if was == "connecting":
            # Refused before the welcome (a retiring file): nothing was served, ask again.
            log.debug("channel to %s refused before the welcome: asking again", link.path)
            link.mode, link.ahead = "opening", False  # the file's own answer says why
            link.retry_at = self.clock() + _RETRY_MS
            return
        incarnation = link.incarnation
        log.warning("channel to %s (incarnation %d) lost: %s", link.path, incarnation, reason)
        link.handled = max(link.handled, incarnation)
        link.mode = "opening"  # what the lanes send now (a reclaim, say) waits for the new one
        holder = self.leases.lost_holder(link.path)
        if restarted is not None:  # the Registry's word: its file's actor (or member) is gone
            names = {"path": link.path, "aliases": sorted(link.raws)}
            self.host.restarted(restarted.model_copy(update=names), holder)
        else:
            lost = ChannelLost(
                path=link.path,
                aliases=sorted(link.raws),
                incarnation=incarnation,
                reason=reason,
                holder=holder,
            )
            self.host.channel_lost(lost)
        self.ask(link)

    def close_socket(self, link: _Link) -> None:
        """Close ``link``'s channel end, whichever carries it."""
        if isinstance(link.end, FramedSocket):
            self.by_fd.pop(link.end.fd, None)
        self.carried.pop(id(link), None)
        if link.end is not None:
            link.end.close()
        link.end = None

    # Output and timers ---------------------------------------------------------------------

    def flush(self) -> bool:
        """Write what the channels have queued; True when some output is left."""
        left = False
        for link in list(self.carried.values()):
            if isinstance(link.end, CarriedEnd):
                link.end.flush()
        for link in list(self.by_fd.values()):
            if not isinstance(link.end, FramedSocket):
                continue
            error = link.end.flush()
            if error is not None:
                self.lost(link, f"channel error: {error}")
            elif link.end.out:
                left = True
        return left

    def tick(self) -> None:
        """Retry what is due; close channels nobody used for ``idle_ms`` (so files can retire)."""
        now = self.clock()
        for link in self.every():
            if link.mode == "opening":
                due = link.retry_at is not None and now >= link.retry_at
                if due or now - link.asked_at > _OPEN_TIMEOUT_MS:
                    self.ask(link)
            elif link.mode == "connecting":
                if now - link.asked_at > _OPEN_TIMEOUT_MS:
                    self.lost(link, "no welcome")
            elif now - link.last_used > self.idle_of(link):
                if self.leases.holds(link.path) or self.host.in_use(link.path) or link.queue:
                    link.last_used = now  # still in use: look again in idle_ms, not at once
                else:
                    self.forget(link)

    def idle_of(self, link: _Link) -> float:
        return self.idle_ms if link.idle_ms is None else link.idle_ms

    def every(self) -> list[_Link]:
        """Every link, resolved or not, once each."""
        return list(
            {id(link): link for link in (*self.links.values(), *self.spellings.values())}.values()
        )

    def forget(self, link: _Link) -> None:
        log.debug("closing the idle %s link to %s", link.mode, link.path)
        self.close_socket(link)
        self.by_nonce.pop(link.nonce, None)
        if self.links.get(link.path) is link:
            del self.links[link.path]
            self.leases.forget_route(link.path)
        for raw in link.raws:
            if self.spellings.get(raw) is link:
                del self.spellings[raw]

    def next_due(self) -> float | None:
        """When ``tick`` has something to do next (monotonic ms), or None."""
        dues: list[float] = []
        for link in self.every():
            if link.mode == "opening":
                dues.append(link.retry_at or link.asked_at + _OPEN_TIMEOUT_MS)
            elif link.mode == "connecting":
                dues.append(link.asked_at + _OPEN_TIMEOUT_MS)
            else:
                dues.append(link.last_used + self.idle_of(link))
        return min(dues) if dues else None

    def close(self) -> None:
        for link in self.every():
            self.close_socket(link)
        self.links.clear()
        self.spellings.clear()
        self.by_nonce.clear()

    def __iter__(self) -> Iterator[_Link]:
        return iter(self.every())


def _may_go_early(call: LaneCall) -> bool:
    """Whether ``call`` may be written before its channel's welcome: an acquire (not a
    reclaim) or a client's ``direct``. Served or not, it can be sent again on the next channel
    if the welcome never comes: a file that welcomed a connection and then lost it abandons
    what the connection's lanes held or were offered there (its grant, its ticket), and one
    that refused the hello read nothing after it."""
    request = call.request
    if isinstance(request, Acquire):
        return request.reclaim is None
    return isinstance(request, Direct)


def _direct_ahead(call: LaneCall) -> DirectAhead | None:
    """A client's ``direct`` the Registry may answer with a new file's offer: one the gateway
    filled in (its uid and frame limit), for the ask that opens its link."""
    request = call.request
    if not isinstance(request, Direct) or request.peer_uid is None:
        return None
    if request.max_frame_bytes is None:
        return None
    return DirectAhead(gateway_lane=call.lane.uid, priority=call.lane.priority, request=request)


def _is_reclaim(call: LaneCall) -> bool:
    return isinstance(call.request, Acquire) and call.request.reclaim is not None
