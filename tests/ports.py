"""A loopback port for a service a test starts (or restarts) on an address it names.

A port picked with ``bind(0)`` comes from the kernel's ephemeral range, which is also where
the kernel takes the local port of every outgoing connection: between the pick and the
service's bind, or between a service's ``kill -9`` and its restart, any process on the machine
(another test's client, a thespian member connecting to its admin) can be given that very
port, and the service fails with "Address already in use" (seen in CI for both). A user's
configured port sits outside that range; so does this one.
"""

from __future__ import annotations

import random
import socket

__all__ = ["listen_port"]

_FLOOR = 10_000


def _ephemeral_floor() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def listen_port(host: str = "127.0.0.1", tries: int = 200) -> int:
    """A port below the ephemeral range that nothing listens on or is bound to right now."""
    top = _ephemeral_floor()
    if top - _FLOOR < 1_000:
        raise RuntimeError(f"no room below the ephemeral range (it starts at {top})")
    for _ in range(tries):
        port = random.randrange(_FLOOR, top)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_FLOOR}-{top} after {tries} tries")
