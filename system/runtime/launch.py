"""Start and stop real thespian actor systems without leaking processes or open ports.

A ``multiprocTCPBase`` system outlives the process that started it: the admin ``setsid()``s,
double-forks, and forks the logger and every actor into its own process group, and none of
them exits unless told to (measured on thespian 4.0.1). So a started system is
tracked by that process group, and :meth:`TcpSystem.stop` ends with ``killpg(SIGKILL)`` and a
bounded wait until no member is left, whatever state the admin is in.

Every listener is pinned to ``bind_host`` (loopback unless the operator says otherwise) by
:func:`sessionlane.system.runtime.loopback.install`, every frame is authenticated by
:func:`sessionlane.system.runtime.transport_auth.install`, and the admin is forked without this
process's sockets (:func:`sessionlane.system.runtime.admin_fork.install`), all before the system is
created. Linux only: the process bookkeeping reads ``/proc``.

Every system also has a lifeline (``sessionlane.system.runtime.lifeline``): a watchdog that kills
its process group if the process that started it dies without stopping it (``kill -9`` of
``serve``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thespian.actors import Actor, ActorSystem, InvalidActorAddress

from sessionlane.actors import procfs
from sessionlane.actors._shell import protect_environ
from sessionlane.system.ops import logs
from sessionlane.system.runtime import (
    admin_fork,
    frozen_fork,
    idle_sockets,
    limits,
    loopback,
    poll_loop,
    transport_auth,
    zygote,
)
from sessionlane.system.runtime.lifeline import Lifeline

__all__ = [
    "LOGGER_PACKAGES",
    "PingActor",
    "TcpSystem",
    "free_port",
    "group_members",
    "log_config",
    "secure_transport",
    "simple_system",
    "start_tcp_system",
    "tcp_system",
]

log = logging.getLogger(__name__)

LOGGER_PACKAGES = ("sessionlane",)
"""Top-level packages whose module loggers are sessionlane's own (set to ``log_level``)."""

_STOP_WAIT_S = 5.0  # bound on waiting for killed members to disappear
_GRACE_S = 1.0  # after a clean shutdown, how long members may take to exit on their own


_PICKS = 3
"""How many free ports are tried for an admin whose port was not given."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the kernel reports free on ``host`` right now (another process may take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def simple_system() -> Any:
    """An in-process ``simpleSystemBase`` system for tests (no processes, no sockets).

    ``logDefs=False`` keeps thespian from reconfiguring the root logger under pytest; it is
    only safe on this base (on multiproc bases it hangs every ``createActor``).
    """
    return ActorSystem("simpleSystemBase", logDefs=False, transientUnique=True)


def log_config(log_file: str | Path | None, log_level: str = "INFO") -> dict[str, Any]:
    """The ``logDefs`` dictConfig for a multiproc system: everything into ``log_file``.

    ``log_file`` ``None`` or ``"-"`` means stderr; a file is rotated
    (:mod:`sessionlane.system.ops.logs`). sessionlane's loggers (:data:`LOGGER_PACKAGES`) log at
    ``log_level``; everything else (thespian included) at WARNING. Levels are explicit because
    thespian forwards every record at or above the lowest level named here from each actor to the
    logger process, which hands it to the handler without looking at logger levels: the handler's
    filter decides.
    """
    level = log_level.upper()
    target = None if log_file is None or str(log_file) == logs.STDERR else Path(log_file)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {
                "format": "%(asctime)s p%(process)d %(levelname)s %(name)s: %(message)s",
            },
        },
        "filters": {"levels": logs.filter_config(level)},
        "handlers": {"file": {**logs.handler_config(target, level), "level": level}},
        "loggers": {name: {"level": level} for name in LOGGER_PACKAGES},
        "root": {"level": "WARNING", "handlers": ["file"]},
    }


@dataclass
class TcpSystem:
    """A running ``multiprocTCPBase`` system and the process group that holds it.

    ``pgid`` is the admin's process group: the admin, its logger and every actor. ``stop()``
    must be called (or use :func:`tcp_system`); nothing else ends these processes.
    """

    asys: Any
    admin_port: int
    admin_pid: int
    pgid: int
    log_file: Path | None
    """The actors' log file; ``None``: they log to stderr."""
    _admin_start: int = field(default=0, repr=False)
    _stopped: bool = field(default=False, repr=False)
    _endpoint_closed: bool = field(default=False, repr=False)
    lifeline: Lifeline | None = field(default=None, repr=False)
    """Kills the group if this process dies first; disarmed by ``stop()``."""

    def members(self) -> list[int]:
        """Pids of the live (non-zombie) processes in the system's process group."""
        return group_members(self.pgid)

    def alive(self) -> bool:
        """Whether the admin process is still running (a recycled pid does not count)."""
        stat = procfs.stat(self.admin_pid)
        if stat is None or not stat.live:
            return False
        return not self._admin_start or stat.start == self._admin_start

    def listening_addresses(self) -> list[tuple[str, int, int]]:
        """``(host, port, pid)`` of every LISTEN TCP socket held by a member of the group.

        Forked children inherit their parent's listening sockets (thespian closes none), so
        a socket held by several members is reported once, for the member whose parent does
        not hold it: the one that opened it or the first to inherit it.
        """
        sockets = procfs.listening_tcp()
        holders: dict[str, list[int]] = {}
        for pid in self.members():
            for inode in procfs.socket_inodes(pid) & sockets.keys():
                holders.setdefault(inode, []).append(pid)
        found = []
        for inode, pids in holders.items():
            parents = {pid: _ppid(pid) for pid in pids}
            owner = min((p for p in pids if parents[p] not in pids), default=min(pids))
            host, port = sockets[inode]
            found.append((host, port, owner))
        return sorted(found)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the system and make sure no process of its group is left. Idempotent.

        A clean ``shutdown()`` is tried first (in a daemon thread, abandoned after
        ``timeout`` s: thespian's can hang 10 s on a stuck handler or a dead admin); then the
        group is SIGKILLed and waited for (at most ~5 s). Raises ``RuntimeError`` if members
        still remain after that.
        """
        if self._stopped:
            return
        self._stopped = True
        if self.alive():
            done = threading.Thread(
                target=self._shutdown_quietly, name="sessionlane-shutdown", daemon=True
            )
            done.start()
            done.join(timeout)
            hung = done.is_alive()
            if hung:
                log.warning("actor system on port %d: shutdown() hung, killing", self.admin_port)
            else:
                # Give the members a moment to exit on their own (and flush their logs).
                self._wait_for_no_members(_GRACE_S)
        else:
            hung = True  # nothing to wait for: the endpoint is closed below
            log.warning("actor system on port %d: admin already dead", self.admin_port)
        if self.members():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGKILL)
        left = self._wait_for_no_members(_STOP_WAIT_S)
        if hung:
            # The abandoned shutdown() (or a dead admin) leaves this process's own endpoint
            # listening: close it, or the dead system's port stays held here.
            self._endpoint_closed = True
            _close_external_endpoint(self.asys)
        _release_lifeline(self.lifeline, gone=not left)
        if left:
            raise RuntimeError(f"actor system processes survived SIGKILL: {left}")
        log.info("actor system on port %d stopped", self.admin_port)

    def _shutdown_quietly(self) -> None:
        try:
            self.asys.shutdown()
        except Exception:
            if not self._endpoint_closed:  # else: abandoned, its endpoint closed under it
                log.exception("actor system on port %d: shutdown() failed", self.admin_port)

    def _wait_for_no_members(self, seconds: float) -> list[int]:
        deadline = time.monotonic() + seconds
        while (left := self.members()) and time.monotonic() < deadline:
            time.sleep(0.01)
        return left


def start_tcp_system(
    admin_port: int | None = None,
    *,
    log_file: str | Path,
    bind_host: str = "127.0.0.1",
    capabilities: dict[str, Any] | None = None,
    log_level: str = "INFO",
    secret: bytes | None = None,
    authenticate: bool = True,
) -> TcpSystem:
    """Start a fresh ``multiprocTCPBase`` system whose every port listens on ``bind_host``.

    ``admin_port`` ``None`` picks a free port. A port something already listens on is refused
    (``RuntimeError``) rather than attached to: an old admin would run old code. Logs go to
    ``log_file`` (see :func:`log_config`; ``"-"``: stderr), thespian's internal log beside it
    (``<stem>.thespian.log``; for stderr, ``thespian.log`` in
    :func:`sessionlane.system.ops.logs.log_dir`). ``capabilities`` are added to the system's;
    ``"Admin Port"`` is set here and may not be passed in them. This process's soft open-file limit
    is raised to its hard limit first
    (:func:`sessionlane.system.runtime.limits.raise_open_file_limit`). ``secret``,
    ``authenticate``: see
    :func:`secure_transport`.

    The caller owns the result and must :meth:`~TcpSystem.stop` it.
    """
    caps = dict(capabilities or {})
    if "Admin Port" in caps:
        raise ValueError("pass admin_port, not an 'Admin Port' capability")
    secure_transport(bind_host, secret=secret, authenticate=authenticate)
    poll_loop.install()
    idle_sockets.install()  # a pass of thespian's loop that does not grow with live files
    limits.raise_open_file_limit()  # inherited by the admin and every actor forked from it
    protect_environ()  # before thespian titles the processes it forks
    log_path = _prepare_logs(log_file)
    # A port we picked may be taken by another process before the admin binds it (a free port
    # is only free when it is looked at): then another one is picked. A port we were given is
    # tried once.
    for attempt in range(_PICKS if admin_port is None else 1):
        port = free_port(bind_host) if admin_port is None else admin_port
        if _listener_inode(port) is not None:
            if admin_port is None:
                continue
            raise RuntimeError(f"port {port} is already in use: refusing to attach to it")
        # Every actor is a fork of the admin, itself a fork of this process. Freezing what is
        # loaded by now keeps the cyclic GC from writing to those objects in each child, so
        # their pages stay shared instead of being copied into every actor process.
        gc.freeze()
        lifeline = Lifeline.spawn(log_path)
        try:
            with _no_inherited_log_handlers():
                asys = ActorSystem(
                    "multiprocTCPBase",
                    {"Admin Port": port, **caps},
                    logDefs=log_config(log_path, log_level),
                    transientUnique=True,
                )
        except BaseException as exc:
            # The admin may have been forked before the failure: nobody else would stop it.
            _kill_admin_group(port)
            lifeline.close()
            retry = admin_port is None and attempt + 1 < _PICKS
            if retry and isinstance(exc, InvalidActorAddress):
                log.warning("admin port %d was taken before the admin bound it", port)
                continue
            raise
        return _adopt(asys, port, lifeline, log_path)
    raise RuntimeError(f"no free port for the actor system's admin in {_PICKS} tries")


def _prepare_logs(log_file: str | Path) -> Path | None:
    """The actors' log file (None: stderr), its directory made, thespian's log set beside it."""
    log_path = None if str(log_file) == logs.STDERR else Path(log_file).resolve()
    if log_path is None:
        _set_thespian_log(logs.log_dir() / "thespian.log")
    else:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        _set_thespian_log(log_path.with_name(log_path.stem + ".thespian.log"))
    return log_path


def _adopt(asys: Any, port: int, lifeline: Lifeline, log_path: Path | None) -> TcpSystem:
    """Track the system whose admin just started on ``port``: find the admin and its group,
    arm the lifeline on that group. Closes our endpoint and the lifeline if it is not found."""
    admin_pid = _admin_pid(port)
    if admin_pid is None:
        _close_external_endpoint(asys)
        lifeline.close()
        raise RuntimeError(f"actor system admin on port {port} not found after start")
    stat = procfs.stat(admin_pid)
    pgid = stat.pgrp if stat is not None else 0
    lifeline.arm(pgid)
    _reap_intermediate(pgid)
    system = TcpSystem(
        asys=asys,
        admin_port=port,
        admin_pid=admin_pid,
        pgid=pgid,
        log_file=log_path,
        _admin_start=stat.start if stat is not None else 0,
        lifeline=lifeline,
    )
    log.info("actor system up: admin port %d, pid %d, pgid %d", port, admin_pid, pgid)
    return system


def secure_transport(
    bind_host: str, *, secret: bytes | None = None, authenticate: bool = True
) -> None:
    """Patch thespian in this process before it forks a system: listeners on ``bind_host``,
    frames authenticated with ``secret`` (``None``: this process's random secret), the admin
    forked without our sockets, every actor started with its inherited heap frozen, every
    SessionFile forked from a frozen zygote.

    ``authenticate=False`` (``trusted_network`` without a key) leaves frames unauthenticated,
    unless an earlier system of this process installed the authentication: it is process-wide
    and stays. Raises ``RuntimeError`` (fail closed) if a patch does not apply.
    """
    loopback.install(bind_host)
    if authenticate:
        transport_auth.install(secret)
    elif transport_auth.installed():
        log.info("thespian frames stay authenticated: an earlier system of this process uses it")
    admin_fork.install()
    frozen_fork.install()
    zygote.install()


@contextlib.contextmanager
def tcp_system(
    admin_port: int | None = None,
    *,
    log_file: str | Path,
    bind_host: str = "127.0.0.1",
    capabilities: dict[str, Any] | None = None,
    log_level: str = "INFO",
    secret: bytes | None = None,
) -> Iterator[TcpSystem]:
    """:func:`start_tcp_system` as a context manager that always stops the system."""
    system = start_tcp_system(
        admin_port,
        log_file=log_file,
        bind_host=bind_host,
        capabilities=capabilities,
        log_level=log_level,
        secret=secret,
    )
    try:
        yield system
    finally:
        system.stop()


class PingActor(Actor):  # type: ignore[misc]
    """Answers any message with ``("pong", message, pid)``: a liveness probe and test actor."""

    def receiveMessage(self, message: Any, sender: Any) -> None:
        if isinstance(message, str | int | tuple):
            self.send(sender, ("pong", message, os.getpid()))


# ---- thespian and /proc plumbing -----------------------------------------------------------


def _release_lifeline(lifeline: Lifeline | None, *, gone: bool) -> None:
    """Let the system's watchdog go; still armed if members survived (it tries again)."""
    if lifeline is not None:
        try:
            lifeline.close(disarm=gone)
        except OSError as exc:
            log.warning("closing the lifeline failed: %s", exc)


@contextlib.contextmanager
def _no_inherited_log_handlers() -> Iterator[None]:
    """Fork the admin without the caller's root log handlers.

    The admin and every actor are forked while ``ActorSystem()`` runs; a handler the caller
    installed (a CLI's stderr handler, pytest's capture) would be inherited and print the
    actors' log lines on the caller's terminal besides sending them to the log file.
    """
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    try:
        yield
    finally:
        root.handlers[:] = saved


def _set_thespian_log(path: Path) -> None:
    os.environ["THESPLOG_FILE"] = str(path)
    # thesplog caches the file name on first use in a process, and forks inherit the cache:
    # reset it so the admin forked next reads the variable just set.
    from thespian.system import utilis

    utilis._thesplog_file = None
    utilis._thesplog_old_file = None
    # thesplog appends with the builtin ``open`` (0644 under the usual umask), looked up in its
    # module's globals first: there it finds the private one.
    utilis.open = logs.open_private
    _pin_tempdir(path.parent)


def _pin_tempdir(fallback: Path) -> None:
    """Decide the temporary directory now, before the system forks, so no actor looks for one.

    thesplog evaluates ``tempfile.gettempdir()`` on its first call in a process even with
    ``THESPLOG_FILE`` set (a default argument), and that probes each candidate directory by
    creating a file: out of descriptors, or with a full or unusable ``/tmp``, it raises
    ``FileNotFoundError("No usable temporary directory")`` inside thespian's transport loop,
    which kills the actor. Found once here, the answer is cached and inherited by every fork.
    """
    try:
        tempfile.gettempdir()
    except FileNotFoundError:
        tempfile.tempdir = str(fallback)
        log.warning("no usable temporary directory: thespian uses %s", fallback)


def _close_external_endpoint(asys: Any) -> None:
    """Close this process's thespian endpoint without asking a (dead) admin anything."""
    transport = getattr(getattr(asys, "_systemBase", None), "transport", None)
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.close()


def group_members(pgid: int) -> list[int]:
    """Pids of the live (non-zombie) processes in process group ``pgid``."""
    return [pid for pid, stat in procfs.all_stats().items() if stat.pgrp == pgid and stat.live]


def _ppid(pid: int) -> int:
    """``pid``'s parent, or 0 when it is gone."""
    stat = procfs.stat(pid)
    return stat.ppid if stat is not None else 0


def _listener_inode(port: int) -> str | None:
    return next((inode for inode, (_, p) in procfs.listening_tcp().items() if p == port), None)


def _admin_pid(port: int) -> int | None:
    """The pid of the admin listening on ``port``.

    The logger and every actor inherit the admin's listening socket, so several processes
    hold it: the admin is the holder whose parent does not hold it.
    """
    inode = _listener_inode(port)
    if inode is None:
        return None
    stats = procfs.all_stats()
    holders = {pid for pid, st in stats.items() if st.live and inode in procfs.socket_inodes(pid)}
    roots = [pid for pid in holders if _ppid(pid) not in holders]
    return min(roots) if roots else None


def _reap_intermediate(pgid: int) -> None:
    """Reap thespian's daemonising process, so no ``<defunct>`` child stays beside the system.

    ``startAdmin`` runs in a child of ours that ``setsid()``s (so its pid is the system's
    pgid), forks the admin and exits; thespian detaches it from multiprocessing, so nobody
    waits for it and it stays a zombie for as long as this process lives. Reaping it does not
    free the pgid for reuse while a member of the group lives (Linux keeps a pid allocated
    while it names a group), so ``killpg(pgid)`` stays aimed at the system.
    """
    stat = procfs.stat(pgid)
    if stat is None or stat.ppid != os.getpid():
        return  # not our child (someone else started this system)
    deadline = time.monotonic() + _STOP_WAIT_S
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pgid, os.WNOHANG)
        except ChildProcessError:
            return  # already reaped (or SIGCHLD is ignored here)
        if done:
            return
        time.sleep(0.01)  # it exits right after forking the admin: a bounded poll
    log.warning("thespian's intermediate process %d did not exit; left unreaped", pgid)


def _kill_admin_group(port: int) -> None:
    """Kill the group of an admin on ``port`` that this process started (and no other)."""
    admin = _admin_pid(port)
    if admin is None:
        return
    with contextlib.suppress(OSError):
        pgid = os.getpgid(admin)
        # thespian's group leader is the intermediate process forked from us (the admin is
        # its child): a group led by anyone else on that port is not ours to kill.
        if _ppid(pgid) == os.getpid():
            os.killpg(pgid, signal.SIGKILL)
