"""The gateway's listening sockets: TCP, and Unix sockets only the service's user may reach."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

from sessionlane.system.config import parse_listen

__all__ = ["BACKLOG", "Bound", "bind", "unlink"]

BACKLOG = 1024
"""Connections the kernel holds for us before we accept them (bounded again by somaxconn).

A burst beyond the backlog is not refused but stalls in SYN retransmits for seconds, then
arrives all at once: better that it waits here, where it is accepted (or refused) at once."""

Bound = tuple[socket.socket, str, str | None]
"""A listening socket, the address it listens on as shown, its Unix path (or None)."""


def bind(address: str) -> Bound:
    """Listen on ``address`` (``tcp://host:port`` or ``unix:///path``); ``OSError`` if not.

    A Unix socket is created mode 0600 (only our user may connect); a stale socket file in its
    place is replaced, anything else there is refused (``EEXIST``).
    """
    parsed = parse_listen(address)
    if parsed[0] == "unix":
        path = parsed[1]
        with contextlib.suppress(FileNotFoundError):
            if os.path.exists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: only our user may connect
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(BACKLOG)
        return sock, f"unix://{path}", path
    _, host, port = parsed
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    real_port = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    return sock, f"tcp://{shown}:{real_port}", None


def unlink(paths: list[str]) -> None:
    """Remove the Unix sockets' files (those still there)."""
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)
