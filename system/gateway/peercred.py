"""Which local user is at the other end of an accepted connection, as the kernel reports it.

* A Unix socket: ``SO_PEERCRED`` (the peer's credentials when it connected).
* Loopback TCP: the owner of the *peer's* socket, the one whose local end is the peer's
  ``(host, port)`` and whose remote end is our accepted socket's local ``(host, port)``. This
  is what PostgreSQL's ident authentication does on loopback, without an identd. Linux
  answers it two ways: ``sock_diag`` netlink looks that one socket up (about 45 us, whatever
  the number of sockets), and ``/proc/net/tcp{,6}`` lists every TCP socket of the network
  namespace with its ``uid`` (8 ms per read with 2,200 sockets: only the fallback).

The answer is a uid, or ``None`` for "unknown": not Linux, no such socket (a connection from
another machine or another network namespace, or a peer that is gone), or a socket in
TIME_WAIT (the kernel reports uid 0 for those, which must never pass for root). Callers treat
unknown as "not the service's user".

The parsing is pure (``owner_in_table``, ``proc_address``, the netlink reply) and tested on
literal bytes; ``peer_uid`` is the function that touches the socket and the kernel.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import sys

from sessionlane.actors import procfs

__all__ = ["identifies_peers", "owner_in_table", "peer_uid", "proc_address", "tcp_peer_uid"]

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_OWNED_STATES = frozenset({1, 4, 5, 8, 9, 11})
"""TCP states of a peer socket whose reported uid is its owner's: ESTABLISHED, FIN_WAIT1,
FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING. Not TIME_WAIT (the kernel reports uid 0 for it,
whoever owned it), LISTEN or the handshake states (never the peer of an accepted socket)."""
_UID_INDEX = 6
"""Column of ``uid`` counted from the local address."""


def identifies_peers(platform: str = sys.platform) -> bool:
    """Whether ``peer_uid`` can tell who a peer is on ``platform`` (Linux only)."""
    return platform == "linux"


def peer_uid(sock: socket.socket) -> int | None:
    """The uid running the peer of the accepted ``sock``, or None when it cannot be told.

    Costs one ``getsockopt`` on a Unix socket; on TCP, one netlink request (or, without
    ``sock_diag``, a read of ``/proc/net/tcp{,6}``).
    """
    if not identifies_peers():
        return None
    try:
        if sock.family == socket.AF_UNIX:
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            uid: int = _PEERCRED.unpack(cred)[1]
            return uid
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            peer = sock.getpeername()
            local = sock.getsockname()
            return tcp_peer_uid((peer[0], peer[1]), (local[0], local[1]))
    except OSError:
        return None
    return None


def tcp_peer_uid(peer: tuple[str, int], local: tuple[str, int]) -> int | None:
    """The owner of the TCP socket bound to ``peer`` and connected to ``local``, or None.

    ``peer`` and ``local`` are as ``getpeername``/``getsockname`` give them on our accepted
    socket (an IPv4-mapped ``::ffff:a.b.c.d`` is looked for under both of its forms). Asks
    the kernel for that one socket over ``sock_diag`` netlink (constant cost); where that is
    unavailable, reads ``/proc/net/tcp{,6}`` (cost grows with the machine's TCP sockets).
    """
    candidates = _candidates(peer, local)
    answered = False
    for version, peer_ip, local_ip in candidates:
        found = _diag_lookup(version, peer_ip, peer[1], local_ip, local[1])
        if found is _NO_DIAG:
            break
        answered = True
        if isinstance(found, int):
            return found
    if answered:
        return None
    for version, peer_ip, local_ip in candidates:
        table = procfs.tcp_table(version)
        if table is None:
            continue
        uid = owner_in_table(
            table, proc_address(peer_ip, peer[1]), proc_address(local_ip, local[1])
        )
        if uid is not None:
            return uid
    return None


_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_NO_DIAG = object()
"""``_diag_lookup``'s answer when sock_diag itself is unavailable (fall back to /proc)."""
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 1
_NLMSG = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_DIAG_REQ = struct.Struct("=BBBxI")  # inet_diag_req_v2 head: family, protocol, ext, states
_SOCKID = struct.Struct(">HH16s16s")  # inet_diag_sockid head: sport, dport, src, dst
_SOCKID_TAIL = struct.Struct("=III")  # idiag_if, idiag_cookie[2]
_NOCOOKIE = 0xFFFFFFFF
_DIAG_MSG_UID = struct.Struct("=I")
_DIAG_MSG_UID_OFFSET = 4 + 48 + 12  # family..retrans, sockid, expires/rqueue/wqueue


def _diag_lookup(
    version: int, peer_ip: _IP, peer_port: int, local_ip: _IP, local_port: int
) -> object:
    """uid (int) of the one matching socket, None if there is none, or ``_NO_DIAG``.

    The kernel looks the socket up as it would for a packet from ``local`` to ``peer``
    (``inet_diag_find_one_icsk``): a TCP socket whose local end is the peer's.
    """
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    sockid = _SOCKID.pack(
        peer_port, local_port, peer_ip.packed.ljust(16, b"\0"), local_ip.packed.ljust(16, b"\0")
    ) + _SOCKID_TAIL.pack(0, _NOCOOKIE, _NOCOOKIE)
    body = _DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sockid
    request = _NLMSG.pack(_NLMSG.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0)
    try:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
    except (OSError, AttributeError):
        return _NO_DIAG
    try:
        nl.sendto(request + body, (0, 0))
        # The kernel answers inside sendto: the reply is queued already.
        reply = nl.recv(8192, socket.MSG_DONTWAIT)
    except OSError:
        return _NO_DIAG
    finally:
        nl.close()
    return _parse_diag_reply(reply, sockid[: _SOCKID.size])


def _parse_diag_reply(reply: bytes, sockid: bytes) -> object:
    if len(reply) < _NLMSG.size:
        return _NO_DIAG
    _, kind, _, _, _ = _NLMSG.unpack_from(reply)
    if kind == _NLMSG_ERROR:
        (error,) = struct.unpack_from("=i", reply, _NLMSG.size)
        # ENOENT: no such socket here. Anything else: the facility refused (fall back).
        return None if -error == errno.ENOENT else _NO_DIAG
    msg = reply[_NLMSG.size :]
    if kind != _SOCK_DIAG_BY_FAMILY or len(msg) < _DIAG_MSG_UID_OFFSET + 4:
        return _NO_DIAG
    state = msg[1]
    if msg[4 : 4 + _SOCKID.size] != sockid or state not in _OWNED_STATES:
        return None
    (uid,) = _DIAG_MSG_UID.unpack_from(msg, _DIAG_MSG_UID_OFFSET)
    return uid


def _candidates(peer: tuple[str, int], local: tuple[str, int]) -> list[tuple[int, _IP, _IP]]:
    """``(IP version, peer ip, local ip)`` forms to look the peer's socket up under."""
    peer_ip = _ip(peer[0])
    local_ip = _ip(local[0])
    peer_v4, local_v4 = _v4(peer_ip), _v4(local_ip)
    if peer_v4 is not None and local_v4 is not None:
        # An IPv4 client socket, or an IPv6 one connected to a mapped address.
        return [
            (4, peer_v4, local_v4),
            (6, _mapped(peer_v4), _mapped(local_v4)),
        ]
    if peer_ip.version == 6 and local_ip.version == 6:
        return [(6, peer_ip, local_ip)]
    return []


def _mapped(ip: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(f"::ffff:{ip}")


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(host.partition("%")[0])  # drop an IPv6 zone id


def _v4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    return ip.ipv4_mapped


def proc_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bytes:
    """``ip:port`` as ``/proc/net/tcp{,6}`` prints it: ``0100007F:1CFC`` for 127.0.0.1:7420.

    The kernel prints each 32-bit word of the address as a native-order integer (so on a
    little-endian machine the bytes of each word are reversed) and the port in hex.
    """
    return procfs.encode_address(ip, port)


def owner_in_table(table: bytes, local: bytes, remote: bytes) -> int | None:
    """The uid on the line of ``table`` whose addresses are ``local`` then ``remote``, or None.

    ``table`` is the text of ``/proc/net/tcp`` or ``/proc/net/tcp6``; the keys come from
    :func:`proc_address`. A line in another state than :data:`_OWNED_STATES` (TIME_WAIT's
    uid is printed as 0 whoever owned it) counts as not found.
    """
    needle = b" " + local + b" " + remote + b" "
    start = 0
    while (at := table.find(needle, start)) >= 0:
        start = at + len(needle)
        end = table.find(b"\n", at)
        line = table[at : end if end >= 0 else len(table)]
        cols = line.split()
        # cols: local, remote, st, tx:rx, tr:when, retrnsmt, uid, ...
        try:
            if len(cols) <= _UID_INDEX or int(cols[2], 16) not in _OWNED_STATES:
                continue
            return int(cols[_UID_INDEX])
        except ValueError:
            continue
    return None
