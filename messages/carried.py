"""The second carrier of a channel: its frames inside a thespian message.

A channel (``sessionlane.messages.channel``) has one protocol and two carriers. The abstract
Unix socket carries the frames between processes of one host that can watch sockets; these
messages carry the very same frame bytes where a socket cannot go: to a SessionFile on another
convention member (through thespian's authenticated transport, MAC'd with the cluster key) and
on a base that cannot watch sockets (``simpleSystemBase``). The SessionFile checks a carried
frame exactly as a socket frame (hello and token first, then calls), and answers with reply
frames carried back to the sender's actor.

``frames`` is one or more frames, each with the codec's length prefix, as they would be
written on the socket: a message never splits a frame.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CarriedCalls", "CarriedLost", "CarriedReplies"]


@dataclass(frozen=True, slots=True)
class CarriedCalls:
    """From a link's actor (a Lane, the gateway) to a SessionFile: hello and call frames."""

    path: str
    """The canonical path of the file (a check: a file ignores frames for another path)."""
    frames: bytes
    closing: bool = False
    """After ``frames``: the link closes this channel (as a socket's end of stream)."""


@dataclass(frozen=True, slots=True)
class CarriedReplies:
    """From a SessionFile to a link's actor: welcome and reply frames."""

    path: str
    incarnation: int
    frames: bytes
    closed: str = ""
    """After ``frames``: the file closed this channel, and why (as a socket closed on it)."""


@dataclass(frozen=True, slots=True)
class CarriedLost:
    """From the Registry to a SessionFile: the convention member of these peers (link actors)
    is lost; close their carried channels, abandoning what their lanes hold or wait for."""

    path: str
    peers: tuple[object, ...]
    reason: str
    keep_ms: int = 0
    """The owner's ``reclaim_grace_ms``: the leases those lanes hold are kept this long for
    their holders' reclaim through another lane (``sessionlane.actors.reclaim``); 0: none."""
