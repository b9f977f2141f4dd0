"""Fork every SessionFile from a quiet, frozen copy of the Registry instead of the Registry.

A forked child shares its parent's pages until one of the two writes to them. The Registry
forks every SessionFile (thespian 4.0.1's ``MultiProcReplicator._startChildActor`` runs
``multiprocessing.Process(target=startChild)``), and the Registry keeps working after each
fork: every page it writes afterwards (its collector, its refcounts, its allocator reusing
freed blocks) is copied into the Registry, and the child is left the only holder of the old
page, which then counts in that child's private memory (USS). The more files the Registry
holds, the more of its heap moves between two forks (``docs/cost-model.md``).

:func:`install` makes the Registry fork, as its process starts, a
*zygote*: a copy of itself that drops its sockets, freezes its heap (``gc.freeze``) and from
then on only forks. Each SessionFile is then forked from the zygote (through a short-lived
intermediate, so that it is re-parented to the Registry, which is made a child subreaper with
``prctl(PR_SET_CHILD_SUBREAPER)``): the Registry is still the SessionFile's parent, receives
its ``SIGCHLD`` and reaps it, so thespian still sends ``ChildActorExited`` when a file's process
dies. Every SessionFile shares the zygote's unchanging pages with all the others: the file
actor is still one process per file, and only what it writes itself is its own.

To take the forks off a new file's path, the zygote keeps one child forked ahead, *parked*:
a process already forked the same way (so already the Registry's child), past
``multiprocessing``'s start, that waits on a pipe for its ``startChild`` arguments. A request
writes them to the parked child and answers its pid at once; only then is the next child
parked. The parked child costs 1.4 to 1.9 MB, once per Registry, and takes two forks and a
process start off every first grant (``docs/cost-model.md``). If the parked child is gone
(killed while it waited: a zombie of the Registry until the Registry exits, as thespian only
reaps the children it started), the request forks one the ordinary way.

Before it freezes, the zygote rehearses a file actor's life (``sessionlane.system.runtime.warmup``:
a SessionFile, outside any actor system, through leases on a throwaway file), so that the code
every file runs is already quickened and the caches it fills are already built, in pages all the
files share (``docs/cost-model.md``, "Warming the zygote").

The zygote reads requests from a pipe the Registry holds: when the Registry dies, the pipe
closes and the zygote exits, and so does its parked child (its pipe closes).
If the zygote is gone or a request fails, the child is forked the ordinary way (and a warning
is logged). Like ``sessionlane.system.runtime.admin_fork`` it runs before the system is
created, is idempotent, and fails closed on another thespian or if what it relies on moved.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import inspect
import logging
import multiprocessing
import multiprocessing.process
import os
import pickle
import signal
import socket
import struct
import threading
from typing import Any

from sessionlane.actors import ahead
from sessionlane.actors.ahead import BOUND_NAME_BYTES, BOUND_TOKEN_BYTES, BoundAhead
from sessionlane.system.runtime.admin_fork import release_inherited_sockets
from sessionlane.system.runtime.loopback import require_supported_thespian

__all__ = ["FORKED_FROM_ZYGOTE", "PARKED_TITLE", "PARK_AHEAD", "install", "installed", "zygote_pid"]

log = logging.getLogger(__name__)

FORKED_FROM_ZYGOTE = frozenset({"sessionlane.actors.session_file.SessionFile"})
"""Actor classes (``module.Class``) forked from the zygote; any other actor forks as before."""

PARKED_TITLE = "parked (the next file's actor, forked ahead)"
"""How a parked child is titled (``sessionlane: <title>``) until it becomes a file's actor."""

PARK_AHEAD = True
"""Whether the zygote keeps a child forked ahead (read in the zygote: set it before the system
starts; ``False`` forks each child on request, for a before/after measurement)."""

ZYGOTE_PARENTS = frozenset({"sessionlane.actors.registry.Registry"})
"""Actor classes whose process forks its zygote as it starts (before its actor exists: the
zygote is then as small as it can be, and the service's process count does not change when the
first file opens). Any other process forks one when it first creates such a child."""

_PR_SET_CHILD_SUBREAPER = 36
_ARGS = 15  # startChild's positional parameters in thespian 4.0.1
_CONTEXT_ARG = 13  # concurrency_context
_CLOSE_ARG = 12  # fileNumsToClose
_PARENT_ARG = 6  # parentAddr
_HEADER = struct.Struct("!I")
_PID = struct.Struct("!q")
_SPAWNED = struct.Struct(f"!q?{BOUND_NAME_BYTES}s{BOUND_TOKEN_BYTES}s")
"""The zygote's answer: the child's pid, whether a listener was bound ahead for it, its name's
and token's bytes (``sessionlane.actors.ahead``)."""
_READY = b"R"

_lock = threading.Lock()
_installed = False
_zygote: _Zygote | None = None


def installed() -> bool:
    return _installed


def zygote_pid() -> int | None:
    """The pid of this process's zygote, if it started one and it is usable."""
    return _zygote.pid if _zygote is not None and not _zygote.broken else None


def install() -> None:
    """Fork the actors named in :data:`FORKED_FROM_ZYGOTE` from a zygote. Raises
    ``RuntimeError`` on a thespian other than the pinned one or if what it wraps moved."""
    global _installed
    with _lock:
        if _installed:
            return
        require_supported_thespian(__name__, "actor start", "multiprocCommon.py")
        from thespian.system import multiprocCommon

        replicator = getattr(multiprocCommon, "MultiProcReplicator", None)
        start_actor = getattr(replicator, "_startChildActor", None)
        start_child = getattr(multiprocCommon, "startChild", None)
        if not inspect.isfunction(start_actor) or not inspect.isfunction(start_child):
            raise RuntimeError("thespian's multiprocCommon._startChildActor moved: cannot patch it")
        source = inspect.getsource(start_actor)
        params = list(inspect.signature(start_child).parameters)
        if (
            "mp = self.mpcontext if self.mpcontext else multiprocessing" not in source
            or "mp.Process(target=startChild" not in source
            or len(params) != _ARGS
            or params[_CONTEXT_ARG] != "concurrency_context"
            or params[_CLOSE_ARG] != "fileNumsToClose"
            or params[_PARENT_ARG] != "parentAddr"
            or not _first_deliverable(multiprocCommon)
        ):
            raise RuntimeError("thespian no longer starts actors as this module expects")

        @functools.wraps(start_actor)
        def start_child_actor(self: Any, addr: Any, child_class: Any, *a: Any, **k: Any) -> Any:
            if _class_name(child_class) not in FORKED_FROM_ZYGOTE:
                return start_actor(self, addr, child_class, *a, **k)
            saved = self.mpcontext
            self.mpcontext = _ZygoteContext(saved or multiprocessing.get_context("fork"))
            try:
                return start_actor(self, addr, child_class, *a, **k)
            finally:
                self.mpcontext = saved

        @functools.wraps(start_child)
        def start_child_with_zygote(*args: Any, **kwargs: Any) -> Any:
            if args and _class_name(args[0]) in ZYGOTE_PARENTS:
                _zygote_for_this_process()
            return start_child(*args, **kwargs)

        replicator._startChildActor = start_child_actor  # type: ignore[union-attr]
        multiprocCommon.startChild = start_child_with_zygote
        _installed = True


def _first_deliverable(multiprocCommon: Any) -> bool:
    """Whether a parked child can hand its actor a first message (``_deliver_first``): the
    manager runs its transport's loop, which takes its ``_incomingEnvelopes`` first."""
    from thespian.system.transport import TCPTransport

    manager = getattr(multiprocCommon, "MultiProcManager", None)
    init = inspect.getsource(TCPTransport.TCPTransport.__init__)
    loop = inspect.getsource(TCPTransport.TCPTransport._runWithExpiry)
    return (
        inspect.isfunction(getattr(manager, "run", None))
        and "self._incomingEnvelopes = []" in init
        and "rEnv = self._incomingEnvelopes.pop(0)" in loop
    )


def _class_name(child_class: Any) -> str:
    if isinstance(child_class, str):
        return child_class
    return f"{getattr(child_class, '__module__', '')}.{getattr(child_class, '__name__', '')}"


class _ZygoteContext:
    """What ``_startChildActor`` takes for a multiprocessing context: ``.Process`` only."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def Process(self, *, target: Any, args: tuple[Any, ...], name: str) -> Any:
        return _ZygoteProcess(self.real, target, args, name)


class _ZygoteProcess:
    """A child forked by the zygote, re-parented to this process; quacks like the
    ``multiprocessing.Process`` thespian keeps (``start``, ``is_alive``, ``join``)."""

    def __init__(self, real: Any, target: Any, args: tuple[Any, ...], name: str) -> None:
        fixed = list(args)
        fixed[_CONTEXT_ARG] = real  # the child's own children fork the ordinary way
        self._real, self._target, self._args, self.name = real, target, fixed, name
        self.pid: int | None = None
        self.exitcode: int | None = None
        self._fallback: Any = None

    def start(self) -> None:
        from thespian.system import multiprocCommon

        ahead.spawned(None)
        first = ahead.take_first()
        zygote = _zygote_for_this_process()
        if zygote is not None and self._target is multiprocCommon.startChild:
            pid = zygote.spawn(self._args, self.name, first)
            if pid is not None:
                self.pid = pid
                multiprocessing.process._children.add(self)  # type: ignore[attr-defined]
                return
        log.warning("forking %s the ordinary way: no zygote", self.name)
        self._fallback = self._real.Process(target=self._target, args=tuple(self._args))
        self._fallback.start()
        self.pid = self._fallback.pid
        multiprocessing.process._children.add(self)  # type: ignore[attr-defined]
        with contextlib.suppress(KeyError):
            multiprocessing.process._children.remove(self._fallback)  # type: ignore[attr-defined]

    def is_alive(self) -> bool:
        if self._fallback is not None:
            return bool(self._fallback.is_alive())
        if self.exitcode is not None or self.pid is None:
            return False
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Not (or no longer) our child: reaped elsewhere, or never re-parented to us.
            self.exitcode = -1
            return False
        if pid == 0:
            return True
        self.exitcode = os.waitstatus_to_exitcode(status)
        return False

    def join(self, timeout: float | None = None) -> None:
        if self._fallback is not None:
            self._fallback.join(timeout)
        # thespian joins only a child is_alive() reported dead (already reaped)

    def __str__(self) -> str:
        return f"<zygote child {self.name} pid {self.pid}>"


def _zygote_for_this_process() -> _Zygote | None:
    """This process's zygote, started on first use (a forked child inherits its parent's
    ``_zygote`` object, which is not its own: a new one is started for it)."""
    global _zygote
    if _zygote is not None and _zygote.owner == os.getpid():
        return None if _zygote.broken else _zygote
    try:
        _zygote = _Zygote.start()
    except OSError as exc:
        log.warning("cannot start a zygote: %s", exc)
        return None
    return _zygote


class _Zygote:
    def __init__(self, pid: int, requests: int, replies: int) -> None:
        self.owner = os.getpid()
        self.pid, self.requests, self.replies = pid, requests, replies
        self.broken = False

    @classmethod
    def start(cls) -> _Zygote:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the zygote
            code = 1
            try:
                os.close(req_w)
                os.close(rep_r)
                _serve(req_r, rep_w)
                code = 0
            finally:
                os._exit(code)
        os.close(req_r)
        os.close(rep_w)
        zygote = cls(pid, req_w, rep_r)
        # The zygote says it is ready once its first child is parked: the service's processes
        # are then all there when it reports itself started.
        if _read_exact(rep_r, 1) != _READY:
            zygote.close()
            raise OSError(f"zygote {pid} exited before it was ready")
        return zygote

    def spawn(self, args: list[Any], name: str, first: Any = None) -> int | None:
        """Have the zygote fork a child running ``startChild(*args)``; its pid, or None (and the
        zygote is given up) if that failed. The listener bound ahead for the child, if any, is
        handed to ``ahead.spawned``. A parked child delivers ``first`` (if not None) to its
        actor as its first message, from its parent; a child forked on request ignores it."""
        try:
            payload = pickle.dumps((args, name, first))
            os.write(self.requests, _HEADER.pack(len(payload)) + payload)
            reply = _read_exact(self.replies, _SPAWNED.size)
        except (OSError, pickle.PicklingError) as exc:
            reply, detail = b"", str(exc)
        else:
            detail = "the zygote exited"
        pid, bound, bound_name, token = (
            _SPAWNED.unpack(reply) if len(reply) == _SPAWNED.size else (-1, False, b"", b"")
        )
        if pid > 0:
            ahead.spawned(BoundAhead.from_bytes(bound_name, token) if bound else None)
            return int(pid)
        log.warning("zygote %d failed to fork %s (%s): giving it up", self.pid, name, detail)
        self.close()
        return None

    def close(self) -> None:
        """Give the zygote up: it exits when it reads the end of its request pipe."""
        self.broken = True
        for fd in (self.requests, self.replies):
            with contextlib.suppress(OSError):
                os.close(fd)


def _serve(requests: int, replies: int) -> None:
    """The zygote's loop: hand each request to the parked child (or fork one), park the next,
    until the request pipe closes."""
    from sessionlane.actors._shell import follow_every_root, set_title
    from sessionlane.system.runtime import warmup

    set_title("zygote (forks the file actors)")
    for signum in range(1, signal.NSIG):
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a parked child gone: EPIPE, not death
    release_inherited_sockets()
    if warmup.WARM_UP:
        warmup.warm_up()  # a file's code run once here: its caches are then shared, frozen
        gc.collect()  # the rehearsal's garbage, before it would be frozen with the rest
    follow_every_root()  # each child's loggers reach its own root without being rewritten
    gc.freeze()
    parked = _Parked.park(requests, replies) if PARK_AHEAD else None
    os.write(replies, _READY)
    while True:
        header = _read_exact(requests, _HEADER.size)
        if len(header) < _HEADER.size:
            return  # the Registry closed the pipe: it is gone (the parked child sees its close)
        payload = _read_exact(requests, _HEADER.unpack(header)[0])
        pid = parked.assign(payload) if parked is not None else -1
        if pid > 0 and parked is not None and parked.bound is not None:
            os.write(replies, _SPAWNED.pack(pid, True, *parked.bound))
        else:
            if pid <= 0:
                args, name, _ = pickle.loads(payload)
                args[_CLOSE_ARG] = [requests, replies]  # the child closes what it inherits
                pid = _fork_through_intermediate(args, name)
            os.write(replies, _SPAWNED.pack(pid, False, b"", b""))
        parked = _Parked.park(requests, replies) if PARK_AHEAD else None


class _Parked:
    """A child forked ahead (through an intermediate that exited: it is already the Registry's
    child) that waits for ``startChild``'s arguments on a pipe the zygote holds, with the
    channel listener bound ahead for it (``bound``: its name's and token's bytes; None if none
    could be bound)."""

    def __init__(self, pid: int, args_w: int, bound: tuple[bytes, bytes] | None) -> None:
        self.pid, self.args_w, self.bound = pid, args_w, bound

    @classmethod
    def park(cls, requests: int, replies: int) -> _Parked | None:
        """Fork the next child ahead; None (each request then forks its own) if that failed."""
        bound, name_bytes, token_bytes = BoundAhead.fresh()
        try:
            listener: socket.socket | None = ahead.bind(bound)
        except OSError as exc:
            log.warning("cannot bind a channel listener ahead: %s", exc)
            listener = None
        try:
            parked = cls.fork(requests, replies, listener, bound)
        finally:
            if listener is not None:
                listener.close()  # the parked child holds it now
        if parked is not None and listener is not None:
            parked.bound = (name_bytes, token_bytes)
        return parked

    @classmethod
    def fork(
        cls, requests: int, replies: int, listener: socket.socket | None, bound: BoundAhead
    ) -> _Parked | None:
        args_r, args_w = os.pipe()
        pid_r, pid_w = os.pipe()
        middle = os.fork()
        if middle == 0:
            code = 1
            try:
                for fd in (requests, replies, args_w, pid_r):
                    os.close(fd)
                child = multiprocessing.get_context("fork").Process(
                    target=_parked_child,
                    args=(args_r, pid_w, listener, bound),
                    name="parked file actor",
                )
                child.start()
                os.write(pid_w, _PID.pack(child.pid or -1))
                code = 0
            finally:
                os._exit(code)
        for fd in (args_r, pid_w):
            os.close(fd)
        try:
            reply = _read_exact(pid_r, _PID.size)
        finally:
            os.close(pid_r)
        _, status = os.waitpid(middle, 0)
        pid = _PID.unpack(reply)[0] if len(reply) == _PID.size else -1
        if os.waitstatus_to_exitcode(status) != 0 or pid <= 0:
            os.close(args_w)
            return None
        return cls(pid, args_w, None)

    def assign(self, payload: bytes) -> int:
        """Hand the request (``startChild``'s arguments and the process's name, pickled) to the
        parked child; its pid, or -1 if it is gone (it died while parked: no reader)."""
        try:
            os.write(self.args_w, _HEADER.pack(len(payload)) + payload)
        except OSError:
            return -1
        finally:
            os.close(self.args_w)
        return self.pid


def _parked_child(
    args_r: int, pid_w: int, listener: socket.socket | None, bound: BoundAhead
) -> None:
    """A parked child: wait for ``startChild``'s arguments, then become that actor, serving
    ``listener`` once it has opened its file (exit if the zygote closed the pipe instead)."""
    from thespian.system import multiprocCommon

    from sessionlane.actors._shell import set_title

    os.close(pid_w)
    set_title(PARKED_TITLE)
    header = _read_exact(args_r, _HEADER.size)
    if len(header) < _HEADER.size:
        return
    args, name, first = pickle.loads(_read_exact(args_r, _HEADER.unpack(header)[0]))
    os.close(args_r)
    args[_CLOSE_ARG] = []  # its intermediate closed what it inherited from the zygote
    multiprocessing.current_process().name = name
    if listener is not None:
        ahead.inherit(listener, bound)
    if first is not None:
        _deliver_first(first, args[_PARENT_ARG])
    multiprocCommon.startChild(*args)


def _deliver_first(message: Any, sender: Any) -> None:
    """Have this process's actor receive ``message`` from ``sender`` before anything else,
    without waiting for thespian to connect it (in the process that is about to run
    ``startChild`` only: its manager's ``run`` is wrapped once)."""
    from thespian.system import multiprocCommon
    from thespian.system.transport import ReceiveEnvelope

    manager = multiprocCommon.MultiProcManager
    run = manager.run

    @functools.wraps(run)
    def run_first(self: Any) -> Any:
        manager.run = run
        self.transport._incomingEnvelopes.insert(0, ReceiveEnvelope(sender, message))
        return run(self)

    manager.run = run_first


def _fork_through_intermediate(args: list[Any], name: str) -> int:
    """Fork a child running ``startChild(*args)`` from an intermediate that exits at once; the
    child's pid (or -1) once the intermediate is gone, so the child has been re-parented to the
    nearest subreaper, the Registry, before the Registry knows its pid."""
    from thespian.system import multiprocCommon

    pid_r, pid_w = os.pipe()
    middle = os.fork()
    if middle == 0:
        code = 1
        try:
            os.close(pid_r)
            args[_CLOSE_ARG] = [*args[_CLOSE_ARG], pid_w]
            child = multiprocessing.get_context("fork").Process(
                target=multiprocCommon.startChild, args=tuple(args), name=name
            )
            child.start()
            os.write(pid_w, _PID.pack(child.pid or -1))
            code = 0
        finally:
            os._exit(code)
    os.close(pid_w)
    try:
        reply = _read_exact(pid_r, _PID.size)
    finally:
        os.close(pid_r)
    _, status = os.waitpid(middle, 0)
    if os.waitstatus_to_exitcode(status) != 0 or len(reply) != _PID.size:
        return -1
    return int(_PID.unpack(reply)[0])


def _read_exact(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            break
        data += chunk
    return data
