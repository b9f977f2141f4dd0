"""Which service a client may talk to: the owner of the socket it reached.

Checked on the connected socket before anything is sent (docs/security-clients.md): without a
token, the service's socket must belong to ``service_user`` (by default the client's own user);
with one, the service's proof of it decides. The sync and asyncio clients share these rules.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import struct
from typing import TYPE_CHECKING

from sessionlane.system.gateway import peercred

if TYPE_CHECKING:
    from sessionlane.system.client._core import Settings

__all__ = [
    "ANY_USER",
    "OWNER_LOOKUP_DELAYS",
    "owner_pending",
    "peer_gone",
    "refuse_self_connection",
    "resolve_user",
    "service_refusal",
]


OWNER_LOOKUP_DELAYS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
"""Seconds to wait before each new look at who owns the service's end of a TCP connection
that was not found yet. ``connect`` returns once the client's end is established; the
service's end is a request socket, which no table shows with its owner, until the kernel has
processed the client's last handshake packet: on a busy machine that can come a little later.
At most about 0.2 s in all, and only while the owner cannot be told."""


def owner_pending(sock: socket.socket, owner: int | None) -> bool:
    """Whether the owner of ``sock``'s service end is worth looking for again."""
    return owner is None and sock.family != socket.AF_UNIX and peercred.identifies_peers()


_GONE_STATES = frozenset({7, 8})  # the kernel's TCP_CLOSE (reset) and TCP_CLOSE_WAIT (FIN)


def peer_gone(sock: object) -> bool:
    """Whether the service already closed (or reset) a TCP connection whose owner could not be
    told: a service killed or restarting as the client connected, whose end is gone, so nobody
    is left to identify. That is an unreachable service (retried with ``reconnect_for``), not
    an untrusted one. False where the kernel does not say (not Linux, not TCP)."""
    option = getattr(socket, "TCP_INFO", None)
    if option is None:
        return False
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, option, 1)  # type: ignore[attr-defined]
    except (OSError, AttributeError):
        return False
    return bool(state) and state[0] in _GONE_STATES


def refuse_self_connection(sock: socket.socket) -> None:
    """Raise ``ConnectionRefusedError`` (retried like any refusal) if a TCP connect to a
    loopback port nobody listens on met itself: the kernel picked that same port for the
    client's end (TCP's simultaneous open). Kept, such a socket's "service" is the client's
    own user, and it holds the port the restarting service needs; it is reset, since a
    closed one would hold the port a minute longer in TIME_WAIT."""
    if sock.family == socket.AF_UNIX:
        return
    try:
        if sock.getsockname() != sock.getpeername():
            return
    except OSError:
        return  # not connected after all: the hello's send will say so
    with contextlib.suppress(OSError):  # refused all the same if it cannot be reset
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raise ConnectionRefusedError("connected to itself: nothing listens there")


ANY_USER = "*"
"""``service_user`` that trusts whoever listens at the address (no owner check)."""


def resolve_user(user: int | str | None) -> int | str | None:
    """``service_user`` as a uid (a name or a number), ``"*"``, or None (the default).

    Raises ``ValueError`` for a name this machine does not know.
    """
    if user is None or isinstance(user, int) or user == ANY_USER:
        return user
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ValueError(f"service_user {user!r}: no such user on this machine") from None


def service_refusal(settings: Settings, owner: int | None) -> str | None:
    """Why the service whose socket belongs to ``owner`` (None: cannot be told) must not be
    talked to, or None. Checked on the connected socket before anything is sent.

    Without a token, its owner must be ``service_user``, by default this process's user:
    anyone else listening at the address (another user who took the port while the service
    was stopped) is refused. With a token, the service's proof of it decides, and the owner
    is checked only if ``service_user`` names one.
    """
    wanted = settings.service_user
    if wanted == ANY_USER or (wanted is None and settings.token is not None):
        return None
    expected = os.geteuid() if wanted is None else int(wanted)
    where = f"the service at {settings.address}"
    if owner is None:
        if settings.token is not None:
            return None
        return (
            f"cannot tell which user runs {where} (not a local connection, or not Linux):"
            " nothing was sent; give the service a token_file and this client its token,"
            " or pass service_user='*' to trust whoever listens there"
        )
    if owner == expected:
        return None
    default = " (this client's user)" if wanted is None else ""
    return (
        f"{where} runs as uid {owner}, not uid {expected}{default}: nothing was sent (another"
        " user may hold the address while the service is stopped); if that user's service is"
        f" meant, pass service_user={owner}"
    )
