"""The hot path's small parts, each against the real thing it stands in for.

``gateway.readable_now``: the gateway's look, after serving a ``WatchMessage``, for sockets that
became readable meanwhile (it serves them before going back to thespian's loop).
"""

from __future__ import annotations

import socket

from sessionlane.system.gateway.gateway import readable_now


def test_readable_now_names_the_readable_and_hung_up_sockets_and_never_waits() -> None:
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        (idle, _), (readable, readable_peer), (hung_up, hung_up_peer) = pairs
        readable_peer.send(b"x")
        hung_up_peer.close()

        ready = readable_now([idle.fileno(), readable.fileno(), hung_up.fileno()])

        assert sorted(ready) == sorted([readable.fileno(), hung_up.fileno()])
        assert readable_now([idle.fileno()]) == []
        assert readable_now([]) == []
    finally:
        for a, b in pairs:
            a.close()
            b.close()
