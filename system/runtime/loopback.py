"""Keep every thespian listener on one address: loopback, or the operator's ``bind_host``.

thespian 4.0.1's TCP (and UDP) transport binds the admin port and every actor port to all
interfaces (``IPActorAddress.__init__`` ends with ``self.bindname = ('', sa[1]) if external
else sa``) and unpickles whatever arrives on them: remote code execution for anyone who can
reach those ports. ``THESPIAN_BASE_IPADDR`` changes only the *advertised* address.

:func:`install` replaces ``IPActorAddress.bindArgs`` (the only thing the transports pass to
``socket.bind``) so that a wildcard host becomes ``bind_host``, and sets
``THESPIAN_BASE_IPADDR`` so the advertised address names the same interface. The default is
``127.0.0.1``; a convention member spanning machines pins its address on the members' network
instead, which ``sessionlane.system.config`` allows only with ``cluster_key_file`` (frames
authenticated, ``sessionlane.system.runtime.transport_auth``) or ``trusted_network = true``.

Contract:

* It must run in the process that creates the ``ActorSystem``, *before* it does: the admin
  is forked from that process and every actor from the admin, so they inherit the patched
  class and the environment. A system started before :func:`install` keeps its wildcard
  listeners.
* It is process-global and idempotent; asking for a second, different host in the same
  process is refused (the systems already started could not follow).
* It fails closed: a thespian other than the pinned 4.0.1, or one whose addresses no longer
  carry ``bindArgs``, raises instead of silently leaving the ports open.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
from importlib import metadata
from typing import Any

from sessionlane.actors.channel_loop import SUPPORTED_THESPIAN

__all__ = ["SUPPORTED_THESPIAN", "install", "installed_host", "require_supported_thespian"]

log = logging.getLogger(__name__)

# SUPPORTED_THESPIAN: the thespian release whose bind code this patch was written against and
# verified on. Kept once, in the lowest layer that reads thespian's internals (``actors/`` may
# not import this one): ``sessionlane.actors.channel_loop``.


def require_supported_thespian(patcher: str, patches: str, verify: str) -> None:
    """Fail closed before a patch touches a thespian other than :data:`SUPPORTED_THESPIAN`.

    Raises ``RuntimeError`` naming the ``patcher`` (a module name), what it ``patches`` in
    thespian and what to ``verify`` before trusting it on the installed release.
    """
    version = metadata.version("thespian")
    if version != SUPPORTED_THESPIAN:
        raise RuntimeError(
            f"{patcher} patches thespian {SUPPORTED_THESPIAN}'s {patches} but"
            f" thespian {version} is installed: re-verify {verify}"
        )


# Hosts that mean "every interface" to socket.bind: each is replaced by the patched host.
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "::0"})

_lock = threading.Lock()
_installed: str | None = None


def installed_host() -> str | None:
    """The host :func:`install` pinned listeners to in this process, or ``None``."""
    return _installed


def install(bind_host: str = "127.0.0.1") -> None:
    """Pin every thespian listener of this process (and of systems it starts) to ``bind_host``.

    ``bind_host`` must be an IPv4 literal (``127.0.0.1`` by default). Raises ``ValueError`` for
    anything else, ``RuntimeError`` if the patch cannot be applied to the installed thespian
    or if another host was installed earlier in this process.
    """
    global _installed
    host = _check_host(bind_host)
    with _lock:
        if _installed is not None:
            if _installed != host:
                raise RuntimeError(
                    f"thespian listeners are already pinned to {_installed} in this process;"
                    f" refusing to re-pin them to {host}"
                )
            return
        require_supported_thespian(__name__, "bind address", "IPBase.py before trusting it")
        from thespian.system.transport import IPBase

        original = IPBase.IPActorAddress.__dict__.get("bindArgs")
        if not isinstance(original, property):
            raise RuntimeError("thespian's IPActorAddress.bindArgs moved: the patch cannot apply")

        os.environ["THESPIAN_BASE_IPADDR"] = host
        # ThisSystem read THESPIAN_BASE_IPADDR when thespian was imported, which may have
        # been before now; without this the address would not count as local.
        IPBase.thisSystem.add_local_addr(host)
        IPBase.IPActorAddress.bindArgs = property(_pinned_bind_args(host))
        _self_check(IPBase, host)
        _installed = host
        log.info("thespian listeners pinned to %s", host)


def _check_host(bind_host: str) -> str:
    # thespian's TCP transport only builds AF_INET addresses (TCPv4ActorAddress), resolving
    # THESPIAN_BASE_IPADDR as IPv4: an IPv6 host would make every system fail to start.
    try:
        return str(ipaddress.IPv4Address(bind_host))
    except ValueError:
        raise ValueError(f"bind_host must be an IPv4 address literal, got {bind_host!r}") from None


def _pinned_bind_args(host: str) -> Any:
    """The replacement ``bindArgs`` getter: thespian's, with a wildcard host replaced."""
    v6_fallback = "::1" if ipaddress.IPv4Address(host).is_loopback else None

    def bind_args(self: Any) -> tuple[tuple[Any, ...]]:
        name = tuple(self.bindname)
        if name and name[0] in _WILDCARD_HOSTS:
            if self.af != socket.AF_INET6:
                name = (host, *name[1:])
            elif v6_fallback is not None:
                name = (v6_fallback, *name[1:])
            else:
                # Better no listener than one on every interface.
                raise OSError(f"no IPv6 counterpart of {host}: refusing a wildcard bind")
        return (name,)

    return bind_args


def _self_check(ipbase: Any, host: str) -> None:
    """Prove the patch took: an address built the way the transports build it binds ``host``."""
    probe = ipbase.TCPv4ActorAddress(None, 0, external=True)
    bound = probe.bindArgs[0][0]
    if bound != host:
        raise RuntimeError(f"thespian would still bind {bound!r}: the loopback patch failed")
