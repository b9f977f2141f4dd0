"""Who holds an address: the processes listening on a TCP port or a Unix socket path.

``doctor`` names them for the ports ``serve`` wants; ``status`` and ``stop`` use them to
explain a service that runs as another user (whose state file they cannot see). Read from
``/proc``: ``/proc/net/tcp{,6}`` and ``/proc/net/unix`` give a listening socket's inode (and,
for TCP, its owner's uid, readable by anyone); ``/proc/PID/fd`` maps the inode to the
processes that hold it, which only their own user (or root) may read. So another user's
listener is known by its uid even when its pid is not.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
from dataclasses import dataclass

from sessionlane.actors import procfs
from sessionlane.system.config import ConfigError, parse_listen

__all__ = [
    "Holder",
    "describe_holders",
    "holders",
    "listeners",
    "service_hint",
    "unit_of",
    "user_name",
]

_LISTEN = "0A"
_ACCEPTING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags: a listening socket


@dataclass(frozen=True)
class Holder:
    """A process (or, when its pid cannot be seen, a user) holding a listening socket."""

    uid: int | None
    pid: int | None = None
    command: str = ""
    unit: str | None = None
    """Its systemd unit (``sessionlane.service``), from its control group."""

    @property
    def user(self) -> str:
        return user_name(self.uid)

    def describe(self) -> str:
        who = f"user {self.user}" if self.uid is not None else "an unknown user"
        if self.pid is None:
            return f"a process of {who} (this user may not see which)"
        unit = f", unit {self.unit}" if self.unit else ""
        return f"pid {self.pid} ({who}{unit}): {self.command or '?'}"


def user_name(uid: int | None) -> str:
    """``uid``'s login name, or ``uid N`` when it has none."""
    if uid is None:
        return "?"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def unit_of(pid: int) -> str | None:
    """The systemd service ``pid`` runs in (its cgroup's last ``*.service``), if any."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    return unit_from_cgroup(text)


def unit_from_cgroup(text: str) -> str | None:
    """The ``*.service`` a ``/proc/PID/cgroup`` text places its process in (pure)."""
    for line in text.splitlines():
        parts = [p for p in line.rsplit(":", 1)[-1].split("/") if p.endswith(".service")]
        if parts:
            return parts[-1]
    return None


def listeners(address: str) -> dict[str, int | None]:
    """inode -> owner uid (``None`` for Unix sockets) of the sockets listening on ``address``
    (``tcp://HOST:PORT``: that port on that host or on a wildcard; ``unix:///path``)."""
    try:
        parsed = parse_listen(address)
    except ConfigError:
        return {}
    if parsed[0] == "unix":
        return {inode: None for inode in _unix_listeners(str(parsed[1]))}
    host, port = str(parsed[1]), int(parsed[2])
    if port == 0:
        return {}
    wanted = {host, "0.0.0.0", "::", "::ffff:" + host}
    found: dict[str, int | None] = {}
    for version, family in ((4, socket.AF_INET), (6, socket.AF_INET6)):
        table = procfs.tcp_table(version)
        for line in (table or b"").decode("ascii", "replace").splitlines()[1:]:
            cols = line.split()
            if len(cols) <= 9 or cols[3] != _LISTEN:
                continue
            hex_host, hex_port = cols[1].split(":")
            if int(hex_port, 16) == port and procfs.decode_host(hex_host, family) in wanted:
                found[cols[9]] = int(cols[7])
    return found


def _unix_listeners(path: str) -> list[str]:
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()[1:]
    except OSError:
        return []
    found = []
    for line in lines:
        cols = line.split(maxsplit=7)
        if len(cols) == 8 and cols[7] == path and int(cols[3], 16) & _ACCEPTING:
            found.append(cols[6])
    return found


def holders(address: str) -> list[Holder]:
    """Who listens on ``address``: each process holding such a socket (its pid, uid, command
    line and unit), and for a socket no visible process holds, its owner's uid alone."""
    sockets = listeners(address)
    if not sockets:
        return []
    found: list[Holder] = []
    seen: set[str] = set()
    for pid in sorted(procfs.all_stats()):
        with contextlib.suppress(OSError):
            held = procfs.socket_inodes(pid) & sockets.keys()
            if held:
                seen |= held
                found.append(
                    Holder(procfs.uid(pid), pid, procfs.command_line(pid)[:200], unit_of(pid))
                )
    for inode, uid in sockets.items():
        if inode not in seen and not any(h.pid is None and h.uid == uid for h in found):
            found.append(Holder(uid if uid is not None else _socket_uid(address)))
    return found


def _socket_uid(address: str) -> int | None:
    """The owner of a Unix socket file (what its listener made it), if it can be read."""
    with contextlib.suppress(ConfigError, OSError):
        parsed = parse_listen(address)
        if parsed[0] == "unix":
            return os.stat(str(parsed[1])).st_uid
    return None


def describe_holders(found: list[Holder]) -> str:
    return "; ".join(h.describe() for h in found)


def service_hint(address: str, command: str) -> str | None:
    """When ``address`` is held by another user's process: who, and, if it is recognisably a
    sessionlane service (its title, or a systemd unit named for it), how to reach it
    (``systemctl`` for a unit, else run ``command`` as that user); None otherwise.

    No advice for anything else: a process of another user on the address a client meant may
    be an impostor, and the client's own refusal (``sessionlane.system.client``) is the answer.
    """
    others = [h for h in holders(address) if h.uid is not None and h.uid != os.geteuid()]
    if not others:
        return None
    holder = others[0]
    said = f"{address} is held by {holder.describe()}, not by this user"
    run_as = f"run as {holder.user}: `sudo -u {holder.user} sessionlane {command}`"
    if holder.unit and "sessionlane" in holder.unit:
        verb = "stop" if command.startswith("stop") else "status"
        return f"{said}: use `systemctl {verb} {holder.unit}`, or {run_as}"
    if holder.pid is not None and not _is_sessionlane(holder.command):
        return said
    if holder.pid is None:
        return f"{said}: if it is the sessionlane service you meant, {run_as}"
    return f"{said}: {run_as}"


def _is_sessionlane(command: str) -> bool:
    """A ``serve`` by its title (``sessionlane: serve ...``) or its command line."""
    return command.startswith("sessionlane: ") or ("sessionlane" in command and " serve" in command)
