"""systemd's readiness protocol (``Type=notify``), spoken by ``sessionlane serve``.

``serve`` sends ``READY=1`` once its gateway listens (and its state file is written: a
``systemctl start`` that returns means ``status``, ``stop`` and clients all find it), and
``STOPPING=1`` when it begins to stop. Each message also carries a ``STATUS=`` line that
``systemctl status`` shows.

The protocol (sd_notify(3)): one datagram of newline-separated ``KEY=VALUE`` assignments to the
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``: a path, or ``@name`` for an abstract socket
(the ``@`` stands for the leading NUL byte). Without the variable (not under systemd, or
``Type=simple``) nothing is sent. A failure to send is logged and is not fatal: the service
runs either way, and systemd then reports the start as timed out. Written with the socket
module: no libsystemd binding is needed for one datagram.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["NOTIFY_SOCKET", "notify", "notify_address"]

log = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"


def notify_address(env: Mapping[str, str] | None = None) -> str | bytes | None:
    """Where to send: the path, the abstract name as bytes (leading NUL), or None (unset, or a
    kind of address this implementation does not speak, such as ``vsock:``)."""
    value = (os.environ if env is None else env).get(NOTIFY_SOCKET) or ""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    if value:
        log.warning("%s=%r is not a Unix socket path or @name: not notifying", NOTIFY_SOCKET, value)
    return None


def notify(*assignments: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``assignments`` (``"READY=1"``, ``"STATUS=..."``) as one datagram; whether it was
    sent (False: no ``$NOTIFY_SOCKET``, or the send failed, which is logged)."""
    address = notify_address(env)
    if address is None:
        return False
    message = "\n".join(a.replace("\n", " ") for a in assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as exc:
        log.warning("cannot notify the service manager at %r: %s", address, exc)
        return False
    return True
