"""An agent that is itself a thespian actor, taking turns on a transcript through a Lane actor.

Socket clients (``sessionlane.system.client``, ``clients/node``) reach sessionlane through its
gateway. An agent that runs *inside* the service's actor system skips the socket: it creates a
``Lane`` actor, opens it with the Registry's address, and exchanges the wire messages of
``sessionlane.messages.wire`` (``Acquire``, ``Append``, ``Release``, ``Abandon``, ``Recover``...)
with it. Every reply and event comes back wrapped in a ``LaneOutput``.

    python examples/actor_agent.py            # two agents contend for one file, 3 turns each
    python examples/actor_agent.py --root DIR --turns 5

``main`` starts an embedded service on a temporary root (``--root`` to keep the files),
creates two ``Agent`` actors in its actor system, lets them take turns on one transcript,
prints what each saw, checks the transcript and stops everything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

from thespian.actors import (
    ActorExitRequest,
    ActorTypeDispatcher,
    ChildActorExited,
    WakeupMessage,
)

from sessionlane.actors.lane import Lane
from sessionlane.messages.internal import AgentGone, LaneOutput, Opened, OpenLane
from sessionlane.messages.wire import (
    AbortRequested,
    Acquire,
    Append,
    Appended,
    Error,
    ExternalChange,
    Granted,
    Queued,
    Release,
    Released,
    Revoked,
)
from sessionlane.system.runtime.service import embedded_service

# What main() and the agents tell each other (module-level classes: thespian pickles them).


@dataclass(frozen=True)
class Start:
    """From main to an agent: take ``turns`` turns of ``records`` records each on ``path``."""

    registry: Any
    """The service's Registry: every Lane call goes through it to the file's actor."""
    lane: str
    path: str
    turns: int = 3
    records: int = 3
    think_s: float = 0.2
    """The "model call" of each turn: the lease stays held while the agent waits."""


@dataclass(frozen=True)
class Go:
    """From main to an agent whose lane is open: start the turns (both agents at once)."""


@dataclass(frozen=True)
class Note:
    """From an agent to main: one thing that happened (printed as it arrives)."""

    lane: str
    text: str


@dataclass(frozen=True)
class Done:
    """From an agent to main: its lane has closed; nothing of it is held any more."""

    lane: str


class Agent(ActorTypeDispatcher):  # type: ignore[misc]  # thespian ships no type hints
    """One agent: one Lane actor, one turn at a time (acquire, think, append, release)."""

    def receiveMsg_Start(self, msg: Start, sender: Any) -> None:
        self.job, self.boss = msg, sender
        self.turn, self.ids = 0, 0
        self.acquire_id = self.append_id = self.release_id = 0  # our latest of each
        self.lease: str | None = None  # the lease this turn holds, None when it holds none
        self.fence = 0
        self.written = 0
        # The Lane is our child: we see it exit (ChildActorExited) once it has closed.
        self.lane = self.createActor(Lane)
        uid = f"{msg.lane}#{uuid.uuid4().hex[:8]}"  # unique per lane instance, never the name
        self.send(
            self.lane,
            OpenLane(name=msg.lane, priority="interactive", registry=msg.registry, uid=uid),
        )

    def receiveMsg_Opened(self, msg: Opened, sender: Any) -> None:
        self.note("lane open")

    def receiveMsg_Go(self, msg: Go, sender: Any) -> None:
        self.next_turn()

    def receiveMsg_LaneOutput(self, out: LaneOutput, sender: Any) -> None:
        """Every reply (carrying our request's ``id``) and every event (no ``id``)."""
        match out.message:
            case Queued(position=position):  # contention is a place in line, never an error
                self.note(f"turn {self.turn}: queued at position {position}")
            case Granted(lease=lease, fence=fence):
                self.lease, self.fence, self.written = lease, fence, 0
                self.note(f"turn {self.turn}: granted, fence {fence}")
                # The model call, with the lease held; its answer is a wakeup for this lease.
                self.wakeupAfter(self.job.think_s, payload=lease)
            case Appended():
                self.written += 1
                self.write_or_release()
            case Released():
                self.note(f"turn {self.turn}: released after {self.written} records")
                self.next_turn()
            case AbortRequested(lease=lease) if lease == self.lease:
                # A recovery wants the file: finish now, or be revoked after its grace_ms.
                self.note(f"turn {self.turn}: abort requested, releasing early")
                self.release()
            case Revoked(lease=lease, reason=reason) if lease == self.lease:
                # Gone (max_hold, recovery, actor_restart, shutdown): later writes would get
                # stale_fence and change nothing. What was acknowledged stays in the file.
                self.note(f"turn {self.turn}: lease revoked ({reason})")
                self.lease = None
                self.next_turn()
            case ExternalChange(kind=kind):
                self.note(f"turn {self.turn}: the file changed outside sessionlane ({kind})")
            case Error(id=rid, code=code, detail=detail):
                self.note(f"turn {self.turn}: {code}: {detail}")
                if rid in (self.acquire_id, self.release_id):  # no lease, or none left
                    self.next_turn()
                elif rid == self.append_id and code == "stale_fence" and self.lease:
                    self.lease = None  # the lease is gone: nothing was written
                    self.next_turn()
                elif rid == self.append_id:
                    self.release()  # a write refused (nothing written): end the turn

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        if msg.payload == self.lease:  # the model answered and the lease is still ours
            self.write_or_release()

    def receiveMsg_ChildActorExited(self, msg: ChildActorExited, sender: Any) -> None:
        self.send(self.boss, Done(self.job.lane))

    # One turn ------------------------------------------------------------------------------

    def next_turn(self) -> None:
        if self.turn == self.job.turns:
            # Done: the lane abandons whatever it still holds or waits for, then exits.
            self.send(self.lane, AgentGone(reason="the agent finished"))
            return
        self.turn += 1
        self.acquire_id = self.request(
            Acquire(
                lane=self.job.lane, path=self.job.path, purpose="prompt", wait_timeout_ms=30_000
            )
        )

    def write_or_release(self) -> None:
        if self.lease is None:
            return
        if self.written < self.job.records:
            record = {
                "agent": self.job.lane,
                "turn": self.turn,
                "seq": self.written,
                "fence": self.fence,
            }
            # Every write carries the lease's fence; a stale one writes nothing.
            self.append_id = self.request(
                Append(lease=self.lease, fence=self.fence, records=[record])
            )
        else:
            self.release()

    def release(self) -> None:
        if self.lease is not None:
            self.release_id = self.request(Release(lease=self.lease))
            self.lease = None  # a late Appended or wakeup must not write after this

    def request(self, req: Acquire | Append | Release) -> int:
        """Send ``req`` to our Lane with a fresh id (replies carry it); return the id."""
        self.ids += 1
        self.send(self.lane, req.model_copy(update={"id": self.ids}))
        return self.ids

    def note(self, text: str) -> None:
        self.send(self.boss, Note(self.job.lane, text))


# main: an embedded service, two agents, one file -----------------------------------------


def run(root: str, turns: int, timeout: float = 60.0) -> str:
    """Let two agents take ``turns`` turns each on ``root/session.jsonl``; return its path."""
    path = os.path.join(root, "session.jsonl")
    with embedded_service([root]) as service:  # stopped on exit, whatever happens
        assert service.running is not None
        asys, registry = service.running.system.asys, service.running.registry
        agents = [asys.createActor(Agent) for _ in range(2)]
        for name, agent in zip(("agent:alpha", "agent:beta"), agents, strict=True):
            asys.tell(agent, Start(registry=registry, lane=name, path=path, turns=turns))
        opening, waiting = {"agent:alpha", "agent:beta"}, {"agent:alpha", "agent:beta"}
        deadline = time.monotonic() + timeout
        while waiting and (left := deadline - time.monotonic()) > 0:
            msg = asys.listen(left)
            if isinstance(msg, Note):
                print(f"{msg.lane:12} {msg.text}")
                if msg.text == "lane open":
                    opening.discard(msg.lane)
                    if not opening:  # both ready: start them together, so they contend
                        for agent in agents:
                            asys.tell(agent, Go())
            elif isinstance(msg, Done):
                waiting.discard(msg.lane)
        for agent in agents:
            asys.tell(agent, ActorExitRequest())
        if waiting:
            raise RuntimeError(f"{sorted(waiting)} did not finish within {timeout:.0f} s")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="directory for the transcript (default: a temp dir)")
    parser.add_argument("--turns", type=int, default=3, help="turns per agent (default 3)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="actor-agent-") as scratch:
        path = run(args.root or scratch, args.turns)
        with open(path, encoding="utf-8") as fh:
            lines = [json.loads(line) for line in fh]
    turns = [(r["agent"], r["turn"]) for r in lines]
    runs = [t for i, t in enumerate(turns) if i == 0 or turns[i - 1] != t]
    print(f"{len(lines)} records in {len(runs)} turns, each turn one contiguous run: ", end="")
    contiguous = len(runs) == len(set(runs))
    print("yes" if contiguous else "NO")
    return 0 if contiguous else 1


if __name__ == "__main__":
    sys.exit(main())
