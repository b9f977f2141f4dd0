"""LaneState: what one lane knows, shared by the Lane actor and the gateway. No I/O.

A lane forwards its agent's requests to the files (as ``LaneCall``) and hands replies and
events back to its agent. It keeps no map of the leases it holds: a request that names only
a lease is routed by the lease id itself (``sessionlane.actors.paths.lease_route``), and the
file checks that the lane holds it. What a lane waits for (its unanswered requests) it does
keep, so a loss answers them. When its agent is gone it abandons every path it used, then
reports itself closed. Who carries the calls and the replies is the host's business
(``LaneHost``): the Lane actor and the gateway both send them over the files' channels
(``sessionlane.actors.links``), which also know which lease a lost channel took with it.

Ordering: the host must deliver a lane's calls for one file in the order they are made, so an
abandon always reaches a file after the lane's earlier requests for it: a request still in
flight when the agent vanished is granted and then dropped, never leaked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from sessionlane.actors.holder_reclaim import HolderReclaims, Reclaiming
from sessionlane.messages.internal import FileReply, FileRestarted, LaneCall, LaneRef, LaneRequest
from sessionlane.messages.wire import (
    Abandon,
    Abandoned,
    Acquire,
    Append,
    Appended,
    Direct,
    Error,
    Granted,
    Queued,
    Recover,
    Release,
    Released,
    Reply,
    Revoked,
    Rewrite,
)

__all__ = ["CLOSE_TIMEOUT_S", "ChannelLost", "LaneHost", "LaneState"]

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 3.0
"""How long a closing lane waits for its abandons to be answered before it closes anyway."""


@dataclass(frozen=True, slots=True)
class ChannelLost:
    """The gateway's channel to ``path``'s SessionFile broke (never a thespian message).

    Not a restart of the file's actor (it may be alive), but the same loss for a lane: what was
    in flight on the channel went unanswered, and the file abandoned the channel's lanes."""

    path: str
    """The canonical path."""
    aliases: list[str]
    """The spellings of ``path`` lanes used (a lane's first request names no canonical path)."""
    incarnation: int
    """The file's incarnation the channel reached."""
    reason: str
    """Why it broke, for the log and the ``unavailable`` answers."""
    holder: tuple[str, str] | None = None
    """(lane uid, lease) of the lease on ``path`` granted over the channel, if one was held."""


class LaneHost(Protocol):
    def call(self, call: LaneCall) -> None:
        """Deliver ``call`` to the file of ``call.path`` (in order, per lane and file)."""

    def route_of(self, lease: str) -> str | None:
        """The canonical path of the file that granted ``lease`` (from the lease id), or None
        when no file this host reaches has such a lease route."""

    def to_agent(self, lane: LaneState, message: Reply) -> None:
        """Hand a reply or event to the lane's agent."""

    def closed(self, lane: LaneState) -> None:
        """The lane finished closing: forget it."""


@dataclass
class _Pending:
    request: LaneRequest
    path: str | None
    """The canonical path, once known."""
    raw: str = ""
    """The path as the agent wrote it."""
    unknown_if_refused: bool = False
    """Sent again though its lease was not reclaimed (an append that releases it, which the
    owner answers as written if it released the lease before the loss): a refusal then means
    its outcome is unknown, not that it was not written."""


@dataclass
class _Fanout:
    """An abandon sent to several files, answered once all have answered.

    Each file gets the abandon under an id of its own (``pending`` then knows which file each
    one went to), so a file whose actor died before answering is counted as answered."""

    remaining: int
    reply_id: Any
    """The agent's request id (None when it sent none), for the one ``abandoned`` reply."""
    leases: list[str] = field(default_factory=list)


class LaneState:
    def __init__(
        self, ref: LaneRef, host: LaneHost, reclaims: HolderReclaims | None = None
    ) -> None:
        self.ref = ref
        self.host = host
        self.pending: dict[Any, _Pending] = {}
        self.fanouts: dict[Any, _Fanout] = {}
        self.paths: dict[str, bool] = {}  # every path this lane used -> is it canonical
        self.internal_ids = 0
        self.closing: str | None = None
        self.finished = False
        self.reclaims = HolderReclaims() if reclaims is None else reclaims
        """Its leases' reclaim secrets, for when their file's member is lost (issue #22);
        shared by the lanes of one client connection."""

    @property
    def uid(self) -> str:
        return self.ref.uid

    @property
    def name(self) -> str:
        return self.ref.name

    # From the agent ------------------------------------------------------------------------

    def request(self, req: LaneRequest) -> None:
        if self.closing is not None:
            self.to_agent(Error(id=req.id, code="unavailable", detail="the lane is closed"))
            return
        match req:
            case Acquire():
                if req.priority is None:
                    default = "recovery" if req.purpose == "recovery" else self.ref.priority
                    req = req.model_copy(update={"priority": default})
                self.call(req, req.path, canonical=False)
            case Recover() | Direct():
                self.call(req, req.path, canonical=False)
            case Append() if req.lease is None:
                assert req.path is not None
                self.call(req, req.path, canonical=False)
            case Release() | Append() | Rewrite():
                assert req.lease is not None
                if (reclaiming := self.reclaims.holding_back(req.lease)) is not None:
                    reclaiming.held.append((self, req))  # sent once the lease is back (or not)
                    return
                path = self.host.route_of(req.lease)
                if path is not None:
                    self.call(req, path, canonical=True)
                elif isinstance(req, Release):
                    detail = f"lease {req.lease} is not held by this lane"
                    self.to_agent(Error(id=req.id, code="not_holder", detail=detail))
                else:
                    detail = f"lease {req.lease} is not (or no longer) held by this lane"
                    self.to_agent(Error(id=req.id, code="stale_fence", detail=detail))
            case Abandon():
                self.abandon(req)

    def path_of(self, req: LaneRequest) -> str | None:
        """The path ``req`` is for: the one it names, or its lease's; None if unknown."""
        lease = getattr(req, "lease", None)
        if lease is not None:
            return self.host.route_of(lease)
        path: str | None = getattr(req, "path", None)
        return path

    def call(self, req: LaneRequest, path: str, *, canonical: bool) -> None:
        self.paths.setdefault(path, canonical)
        if req.id is not None:
            self.pending[req.id] = _Pending(req, path if canonical else None, raw=path)
        self.host.call(LaneCall(lane=self.ref, path=path, canonical=canonical, request=req))

    def abandon(self, req: Abandon) -> None:
        targets = [req.path] if req.path is not None else list(self.paths)
        if not targets:
            self.to_agent(Abandoned(id=req.id, leases=[]))
            return
        fan = _Fanout(remaining=len(targets), reply_id=req.id)
        self.internal_ids += 1
        for i, path in enumerate(targets):
            sub = f"_abandon{self.internal_ids}.{i}"
            self.fanouts[sub] = fan
            canonical = self.paths.get(path, False)
            self.call(req.model_copy(update={"id": sub, "path": path}), path, canonical=canonical)

    # From the files ------------------------------------------------------------------------

    def file_reply(self, msg: FileReply) -> None:
        reply = msg.message
        if isinstance(reply, Granted):
            self.paths[msg.path] = True  # abandoned by its canonical path when the agent goes
        rid = reply.id
        if rid is None:  # an event
            events = self.events(msg.path, reply)
            for event in events:
                if (
                    isinstance(event, Revoked)
                    and (ended := self.reclaims.gone(event.lease)) is not None
                ):
                    ended.lost()  # the owner told the holder itself: not twice
            if self.closing is None:
                for event in events:
                    self.to_agent(event)
            return
        if self.reclaims.is_reclaim_id(rid):
            self.pending.pop(rid, None)
            self.reclaim_answered(msg)
            return
        if (fan := self.fanouts.pop(rid, None)) is not None:
            self.pending.pop(rid, None)
            self.fan_in(fan, reply)
            return
        pending = self.pending.get(rid)
        if pending is not None:
            if isinstance(reply, Granted):
                self.reclaims.granted(self, self.name, msg.path, reply, pending.request)
            elif isinstance(reply, Released):
                self.reclaims.released(reply.lease)
            elif (
                isinstance(reply, Appended)
                and reply.released  # append and release
                and isinstance(pending.request, Append)
                and pending.request.lease is not None
            ):
                self.reclaims.released(pending.request.lease)
            elif isinstance(reply, Abandoned):
                for lease in reply.leases:
                    self.reclaims.gone(lease)
            elif isinstance(reply, Error) and pending.unknown_if_refused:
                detail = (
                    f"the lease could not be reclaimed after its member was lost: "
                    f"the write may be in the file, read it to know ({reply.detail})"
                )
                reply = Error(id=rid, code="unknown_outcome", detail=detail, path=msg.path)
            if isinstance(reply, Queued):
                pending.path = msg.path
            else:
                del self.pending[rid]
        if self.closing is None:
            self.to_agent(reply)

    @staticmethod
    def events(path: str, reply: Reply) -> list[Reply]:
        """What the agent is told of an event from ``path``'s file.

        An ``abandoned`` without id is the owner of a path in a convention dropping this lane's
        leases because it stopped hearing this lane's member (``member_timeout_ms``): to the
        agent, each of those leases was revoked (``member_lost``); ``abandoned`` is only ever
        the answer to the agent's own ``abandon``.
        """
        if isinstance(reply, Abandoned):
            return [Revoked(lease=lease, path=path, reason="member_lost") for lease in reply.leases]
        return [reply]

    def fan_in(self, fan: _Fanout, reply: Reply) -> None:
        fan.remaining -= 1
        if isinstance(reply, Abandoned):
            fan.leases += reply.leases
        if fan.remaining > 0:
            return
        if self.closing is None:
            self.to_agent(Abandoned(id=fan.reply_id, leases=sorted(set(fan.leases))))
        elif not self.fanouts:
            self.finish_close()

    def file_restarted(self, msg: FileRestarted, holder: tuple[str, str] | None = None) -> None:
        """The file's actor died: what it held for this lane, or had not answered, is lost.

        ``holder``: (lane uid, lease) of the lease on the file the host saw granted, if any."""
        detail = "the file's actor restarted before answering; the outcome is unknown"
        self.file_lost(msg.path, msg.aliases, detail, holder, reclaim=msg.owner_lost)

    def channel_lost(self, msg: ChannelLost) -> None:
        """The channel to the file broke: what was in flight on it is lost, and the file
        abandons this lane's leases there (it saw the channel close)."""
        detail = (
            f"the channel to the file broke before it answered ({msg.reason});"
            " the outcome is unknown"
        )
        self.file_lost(msg.path, msg.aliases, detail, msg.holder)

    def file_lost(
        self,
        path: str,
        aliases: list[str],
        detail: str,
        holder: tuple[str, str] | None,
        *,
        reclaim: bool = False,
    ) -> None:
        """This lane's lease on ``path`` (``holder``, if it is this lane's) is revoked
        (``actor_restart``: the agent's remedy is the same), waiting acquires are sent again,
        unanswered writes are answered ``unknown_outcome`` and other unanswered requests
        ``unavailable``, with ``detail``; ``aliases``: the spellings of ``path`` used.

        ``reclaim``: the file's member was lost, not only its actor: a lease whose secret the
        lane knows is asked back instead (``sessionlane.actors.holder_reclaim``), and the
        appends it had in flight wait for the answer."""
        reclaiming: Reclaiming | None = None
        if holder is not None and reclaim:
            reclaiming = self.reclaims.start(holder[1])
        if holder is not None and holder[0] == self.uid and reclaiming is None:
            self.reclaims.gone(holder[1])
            self.to_agent(Revoked(lease=holder[1], path=path, reason="actor_restart"))
        for rid, pending in list(self.pending.items()):
            unanswered_here = pending.path is None and pending.raw in aliases
            if pending.path != path and not unanswered_here:
                continue
            request = pending.request
            # An append with an aid may be written, and a release must not be lost (answered
            # ``unavailable``, its client moves on while the lease comes back: a leak): both
            # are sent again once the lease is reclaimed.
            resend = isinstance(request, Release) or (
                isinstance(request, Append) and request.aid is not None
            )
            if resend and isinstance(request, Append | Release):
                waits = self.reclaims.holding_back(request.lease)
                if waits is not None:
                    waits.wait(self, rid)
                    continue
            if rid in self.fanouts:
                # An abandon the dead actor never answered: it held nothing there any more.
                self.file_reply(
                    FileReply(path=path, message=Abandoned(id=rid, leases=[]), lane=self.uid)
                )
            elif isinstance(request, Acquire | Recover):
                self.call(request, path, canonical=True)  # queue again (a reclaim: ask again)
            elif isinstance(request, Append | Rewrite):
                del self.pending[rid]
                wrote = f"{detail}: the write may be in the file, read it to know"
                self.to_agent(Error(id=rid, code="unknown_outcome", detail=wrote, path=path))
            else:
                del self.pending[rid]
                self.to_agent(Error(id=rid, code="unavailable", detail=detail, path=path))
        if reclaiming is not None and reclaiming.holder == self.uid and not reclaiming.sent:
            reclaiming.sent = True
            log.info(
                "lane %s: the member of %s was lost; reclaiming lease %s",
                self.name,
                path,
                reclaiming.lease,
            )
            self.call(reclaiming.acquire, path, canonical=True)

    def reclaim_answered(self, msg: FileReply) -> None:
        """The answer to a reclaim of the lane's own (see ``holder_reclaim``)."""
        reclaiming = self.reclaims.answered(msg.message.id)
        reply = msg.message
        if reclaiming is None:
            if isinstance(reply, Granted):
                # Given up on meanwhile (its holder was told): let it go, never leak it.
                release = Release(id=self.reclaims.next_id(), lease=reply.lease)
                self.call(release, msg.path, canonical=True)
            return  # decided already (the lease ended meanwhile), or the answer to that
        if isinstance(reply, Granted):
            log.info("lane %s: lease %s reclaimed from %s", self.name, reply.lease, msg.path)
            reclaiming.back()
            if self.closing is not None:
                # The agent went while its lease was being reclaimed: let it go again.
                self.internal_ids += 1
                gone = Abandon(id=f"_gone{self.internal_ids}", lane=self.name, path=msg.path)
                self.call(gone, msg.path, canonical=True)
            return
        why = getattr(reply, "detail", type(reply).__name__)
        log.warning("lane %s: lease %s not reclaimed: %s", self.name, reclaiming.lease, why)
        self.reclaims.gone(reclaiming.lease)
        self.to_agent(Revoked(lease=reclaiming.lease, path=msg.path, reason="actor_restart"))
        reclaiming.lost()

    def resend(self, rid: Any, path: str) -> None:
        """Send the pending request ``rid`` again: its lease was reclaimed."""
        pending = self.pending.get(rid)
        if pending is not None:
            call = LaneCall(lane=self.ref, path=path, canonical=True, request=pending.request)
            self.host.call(call)

    def unknown(self, rid: Any, lease: str, path: str) -> None:
        """The pending write ``rid`` may be in the file: its lease could not be reclaimed
        (a pending release: the lease is not held here any more, so it is released)."""
        pending = self.pending.get(rid)
        request = None if pending is None else pending.request
        if pending is not None and isinstance(request, Append) and request.release:
            # It may have released the lease itself before the loss: the owner's lease record
            # answers it as written if so (``docs/fused-release.md``).
            pending.unknown_if_refused = True
            self.resend(rid, path)
            return
        pending = self.pending.pop(rid, None)
        if pending is not None and isinstance(pending.request, Release):
            self.to_agent(Released(id=rid, lease=lease))
        elif pending is not None:
            detail = (
                f"lease {lease} could not be reclaimed after its member was lost:"
                " the write may be in the file, read it to know"
            )
            self.to_agent(Error(id=rid, code="unknown_outcome", detail=detail, path=path))

    def uses(self, path: str) -> bool:
        """Whether this lane waits for an answer from ``path`` (held leases: the links know)."""
        return any(p.path == path or p.path is None for p in self.pending.values())

    # Closing -------------------------------------------------------------------------------

    def agent_gone(self, reason: str) -> bool:
        """Abandon everything; True when the host must call ``close_timeout`` later."""
        if self.closing is not None:
            return False
        self.closing = reason
        if self.paths:
            # The files log one diagnostic line per lease they abandon (path, lane, lease).
            log.debug(
                "lane %s: agent gone (%s), abandoning %d paths", self.name, reason, len(self.paths)
            )
        if not self.paths:
            self.finish_close()
            return False
        self.internal_ids += 1
        self.abandon(Abandon(id=f"_gone{self.internal_ids}", lane=self.name, reason=reason))
        return not self.finished

    def close_timeout(self) -> None:
        if self.closing is not None:
            self.finish_close()

    def finish_close(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.host.closed(self)

    def to_agent(self, message: Reply) -> None:
        self.host.to_agent(self, message)
