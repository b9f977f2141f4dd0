"""Process and socket facts, read from Linux ``/proc``: the one place that parses it.

Everything here reads the kernel's view at the moment of the call and answers "unknown"
(None, an empty collection) for a process that is gone or not ours to read, so callers race
nothing but the facts themselves. It lives in ``actors/`` because the actor layer needs it
(the lock-file interop records its owner's start time; the Registry counts its descriptors)
and ``actors`` may import nothing of ``system``.

Not used by ``system/runtime/_watchdog.py`` (it runs under ``python -I -S`` and imports
nothing of ours) nor by ``tests/leftovers.py`` (it runs from a clean checkout, without the
package installed); each says so.

The ``/proc/net/tcp{,6}`` codec: the kernel prints each 32-bit word of an address as a
native-order integer in hex (on a little-endian machine the bytes of each word are reversed)
and the port in hex, ``0100007F:1CFC`` for 127.0.0.1:7420.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "TCP_TABLES",
    "ProcStat",
    "all_stats",
    "cmdline",
    "command_line",
    "cpu_seconds",
    "decode_host",
    "encode_address",
    "fd_numbers",
    "fd_targets",
    "listening_tcp",
    "memory_kb",
    "socket_inodes",
    "start_time",
    "stat",
    "tcp_table",
    "uid",
]

TCP_TABLES = {4: "/proc/net/tcp", 6: "/proc/net/tcp6"}
"""The kernel's TCP socket tables by IP version."""
_TCP_LISTEN = "0A"  # st column of /proc/net/tcp{,6} for a LISTEN socket


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` that the service relies on."""

    pid: int
    state: str
    """One letter: ``R``, ``S``, ``D``, ``Z`` (zombie), ``X`` (dead)..."""
    ppid: int
    pgrp: int
    session: int
    start: int
    """Start time in clock ticks since boot (field 22): tells a recycled pid apart."""

    @property
    def live(self) -> bool:
        """Whether the process runs (neither a zombie nor dead)."""
        return self.state not in ("Z", "X")


def stat(pid: int) -> ProcStat | None:
    """``pid``'s stat line parsed, or None when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read().decode("utf-8", "replace")
        # comm (field 2) is parenthesised and may hold spaces or parentheses: split after the
        # last ")".
        fields = text[text.rindex(")") + 2 :].split()
        return ProcStat(
            pid=pid,
            state=fields[0],
            ppid=int(fields[1]),
            pgrp=int(fields[2]),
            session=int(fields[3]),
            start=int(fields[19]),
        )
    except (OSError, ValueError, IndexError):
        return None


def all_stats() -> dict[int, ProcStat]:
    """pid -> stat of every process visible now (zombies included: filter on ``live``)."""
    found: dict[int, ProcStat] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parsed = stat(int(entry))
            if parsed is not None:
                found[parsed.pid] = parsed
    return found


def start_time(pid: int) -> int | None:
    """``pid``'s start time in clock ticks since boot, or None when it is gone."""
    parsed = stat(pid)
    return parsed.start if parsed is not None else None


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of ``pids`` so far (those still there), in seconds."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def cmdline(pid: int) -> list[str] | None:
    """``pid``'s argv, or None when it is gone or unreadable (a kernel thread's is empty)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    args = raw.decode(errors="replace").split("\0")
    return args[:-1] if args and args[-1] == "" else args


def command_line(pid: int) -> str:
    """``pid``'s argv joined by spaces, for display; empty when unknown."""
    return " ".join(cmdline(pid) or []).strip()


def uid(pid: int) -> int | None:
    """The uid owning ``pid``, or None when it is gone."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def fd_numbers(pid: int | None = None) -> list[int]:
    """The descriptor numbers ``pid`` (default: this process) has open.

    Raises ``OSError`` when they cannot be listed (no ``/proc``, a gone process, or this
    process out of descriptors): the callers' answers to that differ. For this process the
    list includes the descriptor the listing itself used, which is closed by the time it
    returns.
    """
    return [int(name) for name in os.listdir(f"/proc/{'self' if pid is None else pid}/fd")]


def fd_targets(pid: int) -> list[str]:
    """What each descriptor of ``pid`` points at (a path, ``socket:[inode]``, ...); empty
    when unreadable. Descriptors closed during the walk are skipped."""
    try:
        fds = fd_numbers(pid)
    except OSError:
        return []
    targets = []
    for fd in fds:
        with contextlib.suppress(OSError):
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return targets


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets ``pid`` holds (the keys of ``listening_tcp``)."""
    prefix = "socket:["
    return {t[len(prefix) : -1] for t in fd_targets(pid) if t.startswith(prefix)}


def memory_kb(pid: int) -> dict[str, int] | None:
    """``pid``'s ``/proc/<pid>/smaps_rollup`` (``Rss``, ``Pss``, ``Private_Dirty``...) in
    KiB, or None when it is gone or unreadable."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if rest.strip().endswith("kB"):
                    fields[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return fields


def tcp_table(version: int) -> bytes | None:
    """The raw text of ``/proc/net/tcp`` (``version`` 4) or ``tcp6`` (6); None if absent."""
    try:
        with open(TCP_TABLES[version], "rb") as fh:
            return fh.read()
    except OSError:
        return None


def listening_tcp() -> dict[str, tuple[str, int]]:
    """inode -> (host, port) of every LISTEN TCP socket on this machine (IPv4 and IPv6)."""
    found: dict[str, tuple[str, int]] = {}
    for version, family in ((4, socket.AF_INET), (6, socket.AF_INET6)):
        table = tcp_table(version)
        if table is None:
            continue
        for line in table.decode("ascii", "replace").splitlines()[1:]:
            cols = line.split()
            if len(cols) > 9 and cols[3] == _TCP_LISTEN:
                hex_host, hex_port = cols[1].split(":")
                found[cols[9]] = (decode_host(hex_host, family), int(hex_port, 16))
    return found


def decode_host(hex_host: str, family: int) -> str:
    """The address of a ``/proc/net/tcp{,6}`` column (``0100007F`` -> ``127.0.0.1``)."""
    raw = b"".join(
        int(hex_host[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(hex_host), 8)
    )
    return socket.inet_ntop(family, raw)


def encode_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bytes:
    """``ip:port`` as ``/proc/net/tcp{,6}`` prints it: ``0100007F:1CFC`` for 127.0.0.1:7420."""
    raw = ip.packed
    words = b"".join(
        b"%08X" % int.from_bytes(raw[i : i + 4], sys.byteorder) for i in range(0, len(raw), 4)
    )
    return words + b":%04X" % port
