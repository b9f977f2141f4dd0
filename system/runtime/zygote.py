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
``multiprocessing``'s start, that waits on a pipe for its ``startChild`` arguments. The zygote
sends the Registry the write end of that pipe (``SCM_RIGHTS``) with the child's pid, so a new
file's actor is started by the Registry writing its arguments there itself, with no round
trip through the zygote; the Registry then asks for the next child to be parked, and reads
that notice only when it starts the next file. The parked child costs 1.4 to 1.9 MB, once per
Registry, and takes two forks and a process start off every first grant
(``docs/cost-model.md``). If the parked child is gone (killed while it waited: a zombie of the
Registry until the Registry exits, as thespian only reaps the children it started), the
zygote forks one on request.

Each parked child is also given what takes the other hops off a first contact
(``sessionlane.actors.ahead``): its channel listener, bound by the zygote before it forks it,
whose name and token the Registry offers the asker at once; and its ``FileInit``, handed with
its arguments, which it delivers to its actor as its first message (not to a child whose
listener could not be bound: the ``FileInit`` carries the direct-channel tickets minted for
the offer of that listener, and nobody is offered it; the Registry sends it one without them).
And once the Registry has started a child, each request to park the next one carries the
arguments it gave that child, as a template (kept as bytes here): the parked child does
thespian's start of its actor from it before it is asked for
(``sessionlane.system.runtime.prestart``).

Before it freezes, the zygote rehearses a file actor's life (``sessionlane.system.runtime.warmup``:
a SessionFile, outside any actor system, through leases on a throwaway file), so that the code
every file runs is already quickened and the caches it fills are already built, in pages all the
files share (``docs/cost-model.md``, "Warming the zygote").

The zygote reads requests from a pipe the Registry holds: when the Registry dies, the pipe
closes and the zygote exits, and so does its parked child (the Registry held the only write
end of its pipe).
If the zygote is gone or a request fails, the child is forked the ordinary way (and a warning
is logged). Like ``sessionlane.system.runtime.admin_fork`` it runs before the system is
created, is idempotent, and fails closed on another thespian or if what it relies on moved.

About 700 lines: the patch of thespian's actor start, the Registry's end of the zygote and the
zygote's own loop speak one protocol (the pipes, the notices, the parked child's arguments) and
are read together.
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

from sessionlane.actors import ahead, page_merge
from sessionlane.actors.ahead import BOUND_NAME_BYTES, BOUND_TOKEN_BYTES, BoundAhead
from sessionlane.system.runtime import frozen_fork, prestart
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

MEMORY_MERGE = False
"""Whether the zygote opts in to the kernel's samepage merging before it warms up and freezes
(``memory_merge``; ``sessionlane.actors.page_merge``), so a file's copies of its pages can be
merged back with the zygote's own. Read in the zygote: set before the system starts (the
service sets it at every start from its settings)."""

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
_MESSAGE = struct.Struct(f"!cq?{BOUND_NAME_BYTES}s{BOUND_TOKEN_BYTES}s")
"""The zygote's message: its tag (``_PARK``: a child parked, pid 0 if none; ``_FORK``: a child
forked on request, pid -1 if it failed), the child's pid, whether a listener was bound ahead
for it, its name's and token's bytes (``sessionlane.actors.ahead``)."""
_PARK = b"P"
"""Request: park the next child, with the template it may start ahead from
(``sessionlane.system.runtime.prestart``: its length, then its bytes; answered by its notice,
with its argument pipe)."""
_FORK = b"F"
"""Request: fork a child with these arguments now (answered with its pid)."""

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
    """The Registry's end of its zygote: requests go down a pipe (``_PARK``, ``_FORK``), and
    the zygote answers on a ``SOCK_SEQPACKET`` socket, one message per request; a parked
    child's notice carries the write end of that child's argument pipe, so the Registry hands
    a child its arguments itself, without a round trip through the zygote."""

    def __init__(self, pid: int, requests: int, replies: socket.socket) -> None:
        self.owner = os.getpid()
        self.pid, self.requests, self.replies = pid, requests, replies
        self.broken = False
        self.awaiting = False
        """A ``_PARK`` was asked and its notice not read yet."""
        self.parked: _Handed | None = None
        self.park_wanted = False
        """The next child is to be parked once the Registry has answered the first contact
        (``ahead.defer``), or at the next spawn at the latest."""
        self.last_args: list[Any] | None = None
        """The arguments of the child started last: the next parked child's template."""

    @classmethod
    def start(cls) -> _Zygote:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
        req_r, req_w = os.pipe()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the zygote
            code = 1
            try:
                os.close(req_w)
                mine.close()
                _serve(req_r, theirs)
                code = 0
            finally:
                os._exit(code)
        os.close(req_r)
        theirs.close()
        zygote = cls(pid, req_w, mine)
        # The zygote says it is ready with its first notice, once its first child is parked:
        # the service's processes are then all there when it reports itself started.
        zygote.awaiting = True
        zygote.parked = zygote.take_parked()  # None if none could be parked, or it is gone
        if zygote.broken:
            raise OSError(f"zygote {pid} exited before it was ready")
        return zygote

    def receive(self) -> tuple[bytes, int, int, bool, bytes, bytes]:
        """The zygote's next message: its tag, pid, the fd it carries (-1), and the listener
        bound ahead (whether, its name's and token's bytes). ``OSError`` if it is gone."""
        data, fds, _, _ = socket.recv_fds(self.replies, _MESSAGE.size, 1)
        if len(data) != _MESSAGE.size:
            for fd in fds:
                os.close(fd)
            raise OSError("the zygote exited")
        tag, pid, bound, name, token = _MESSAGE.unpack(data)
        return tag, int(pid), fds[0] if fds else -1, bool(bound), name, token

    def take_parked(self) -> _Handed | None:
        """The child parked ahead, reading the zygote's notice if it has not been read yet;
        None if none could be parked (or the zygote is gone: given up)."""
        if self.parked is None and not self.awaiting and self.park_wanted:
            self.ask_park()  # deferred, and not asked since: ask now, and wait for it
        if self.parked is None and self.awaiting:
            self.awaiting = False
            try:
                tag, pid, fd, bound, name, token = self.receive()
            except OSError as exc:
                log.warning("zygote %d is gone (%s): giving it up", self.pid, exc)
                self.close()
                return None
            if tag != _PARK or (pid > 0) != (fd >= 0):
                if fd >= 0:
                    os.close(fd)
                log.warning("zygote %d answered out of turn: giving it up", self.pid)
                self.close()
                return None
            if pid > 0:
                listener = BoundAhead.from_bytes(name, token) if bound else None
                self.parked = _Handed(pid, fd, listener)
        parked, self.parked = self.parked, None
        return parked

    def park_later(self) -> None:
        """Have the next child parked once the Registry has answered the first contact it is
        starting a file for (``ahead.run_deferred``), not while it still has to."""
        if not self.park_wanted:
            self.park_wanted = True
            ahead.defer(self.park_if_wanted)

    def park_if_wanted(self) -> None:
        if self.park_wanted and not self.broken and self.owner == os.getpid():
            self.ask_park()

    def ask_park(self) -> None:
        """Have the zygote park the next child (its notice is read when it is needed)."""
        self.park_wanted = False
        built_from = prestart.template(self.last_args) if self.last_args is not None else b""
        try:
            _write_all(self.requests, _PARK + _HEADER.pack(len(built_from)) + built_from)
        except OSError as exc:
            log.warning("zygote %d is gone (%s): giving it up", self.pid, exc)
            self.close()
            return
        self.awaiting = True

    def spawn(self, args: list[Any], name: str, first: Any = None) -> int | None:
        """Start a child running ``startChild(*args)``: the parked one, handed its arguments
        here, or one the zygote forks on request. Its pid, or None (and the zygote is given up)
        if that failed. The listener bound ahead for the child, if any, is handed to
        ``ahead.spawned``. A parked child delivers ``first`` (if not None) to its actor as its
        first message, from its parent; a child forked on request ignores it, and so is a
        parked child whose listener could not be bound not handed it: nobody is offered that
        listener, so what was minted for the offer (``FileInit.tickets``) must not reach its
        actor, which gets the Registry's ``FileInit`` by thespian instead, as a child forked
        on request does (``Registry.start_file``)."""
        try:
            payload = pickle.dumps((args, name, first))
        except pickle.PicklingError as exc:
            log.warning("cannot hand %s to a zygote child: %s", name, exc)
            return None
        self.last_args = args
        parked = self.take_parked()
        if parked is not None:
            if parked.bound is None and first is not None:
                payload = pickle.dumps((args, name, None))  # pickled above: it pickles
            if parked.assign(payload):
                ahead.spawned(parked.bound)
                self.park_later()
                return parked.pid
            log.info("the parked child %d is gone: forking %s on request", parked.pid, name)
        if self.broken:
            return None
        try:
            _write_all(self.requests, _FORK + _HEADER.pack(len(payload)) + payload)
            tag, pid, fd, _, _, _ = self.receive()
        except OSError as exc:
            tag, pid, fd, detail = b"", -1, -1, str(exc)
        else:
            detail = "the zygote could not fork it"
        if fd >= 0:
            os.close(fd)
        if tag == _FORK and pid > 0:
            self.park_later()
            return pid
        log.warning("zygote %d failed to fork %s (%s): giving it up", self.pid, name, detail)
        self.close()
        return None

    def close(self) -> None:
        """Give the zygote up: it exits when it reads the end of its request pipe (and a child
        parked for us when it reads the end of its own)."""
        self.broken = True
        parked, self.parked = self.parked, None
        if parked is not None:
            with contextlib.suppress(OSError):
                os.close(parked.args_w)
        with contextlib.suppress(OSError):
            os.close(self.requests)
        self.replies.close()


class _Handed:
    """In the Registry: a child the zygote parked, by its pid, the write end of its argument
    pipe, and the listener bound ahead for it."""

    def __init__(self, pid: int, args_w: int, bound: BoundAhead | None) -> None:
        self.pid, self.args_w, self.bound = pid, args_w, bound

    def assign(self, payload: bytes) -> bool:
        """Hand ``startChild``'s arguments (and the process's name and first message, pickled)
        to the child; False if it is gone (it died while parked: no reader)."""
        try:
            _write_all(self.args_w, _HEADER.pack(len(payload)) + payload)
        except OSError:
            return False
        finally:
            os.close(self.args_w)
        return True


def _serve(requests: int, replies: socket.socket) -> None:
    """The zygote's loop: park a child (and send its notice) or fork one on request, until the
    request pipe closes."""
    from sessionlane.actors._shell import follow_every_root, set_title
    from sessionlane.system.runtime import warmup

    set_title("zygote (forks the file actors)")
    for signum in range(1, signal.NSIG):
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # the Registry gone: EPIPE, not death
    release_inherited_sockets(keep={replies.fileno()})
    if MEMORY_MERGE and (why := page_merge.opt_in()) is not None:
        log.warning("memory_merge: the zygote's pages will not be merged: %s", why)
    if warmup.WARM_UP:
        warmup.warm_up()  # a file's code run once here: its caches are then shared, frozen
        gc.collect()  # the rehearsal's garbage, before it would be frozen with the rest
    follow_every_root()  # each child's loggers reach its own root without being rewritten
    gc.freeze()
    fds = (requests, replies.fileno())
    _tell_parked(replies, _Parked.park(fds, b"") if PARK_AHEAD else None)  # also says: ready
    while True:
        tag = os.read(requests, 1)
        header = _read_exact(requests, _HEADER.size) if tag in (_PARK, _FORK) else b""
        if len(header) < _HEADER.size:
            return  # the Registry closed the pipe: it is gone (or spoke out of turn)
        payload = _read_exact(requests, _HEADER.unpack(header)[0])
        if tag == _PARK:  # the template stays bytes here: only the child unpickles it
            _tell_parked(replies, _Parked.park(fds, payload) if PARK_AHEAD else None)
            continue
        args, name, _ = pickle.loads(payload)
        args[_CLOSE_ARG] = list(fds)  # the child closes what it inherits from us
        pid = _fork_through_intermediate(args, name)
        replies.send(_MESSAGE.pack(_FORK, pid, False, b"", b""))


def _tell_parked(replies: socket.socket, parked: _Parked | None) -> None:
    """Send the Registry the notice of ``parked`` (pid 0: none), with its argument pipe."""
    if parked is None:
        replies.send(_MESSAGE.pack(_PARK, 0, False, b"", b""))
        return
    try:
        bound = parked.bound is not None
        name, token = parked.bound if parked.bound is not None else (b"", b"")
        notice = _MESSAGE.pack(_PARK, parked.pid, bound, name, token)
        socket.send_fds(replies, [notice], [parked.args_w])
    finally:
        os.close(parked.args_w)  # the Registry holds it now: the child's only writer


class _Parked:
    """In the zygote: a child forked ahead (through an intermediate that exited: it is already
    the Registry's child) that waits for ``startChild``'s arguments on a pipe whose write end
    the zygote sends the Registry, with the channel listener bound ahead for it (``bound``: its
    name's and token's bytes; None if none could be bound)."""

    def __init__(self, pid: int, args_w: int, bound: tuple[bytes, bytes] | None) -> None:
        self.pid, self.args_w, self.bound = pid, args_w, bound

    @classmethod
    def park(cls, inherited: tuple[int, ...], built_from: bytes) -> _Parked | None:
        """Fork the next child ahead, to start ahead from the template ``built_from`` (if not
        empty); None (each request then forks its own) if that failed."""
        bound, name_bytes, token_bytes = BoundAhead.fresh()
        try:
            listener: socket.socket | None = ahead.bind(bound)
        except OSError as exc:
            log.warning("cannot bind a channel listener ahead: %s", exc)
            listener = None
        try:
            parked = cls.fork(inherited, listener, bound, built_from)
        finally:
            if listener is not None:
                listener.close()  # the parked child holds it now
        if parked is not None and listener is not None:
            parked.bound = (name_bytes, token_bytes)
        return parked

    @classmethod
    def fork(
        cls,
        inherited: tuple[int, ...],
        listener: socket.socket | None,
        bound: BoundAhead,
        built_from: bytes,
    ) -> _Parked | None:
        """Fork the child (through an intermediate); ``inherited``: the zygote's own pipes,
        which it closes."""
        args_r, args_w = os.pipe()
        pid_r, pid_w = os.pipe()
        middle = os.fork()
        if middle == 0:
            code = 1
            try:
                for fd in (*inherited, args_w, pid_r):
                    os.close(fd)
                child = multiprocessing.get_context("fork").Process(
                    target=_parked_child,
                    args=(args_r, pid_w, listener, bound, built_from),
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


def _parked_child(
    args_r: int, pid_w: int, listener: socket.socket | None, bound: BoundAhead, built_from: bytes
) -> None:
    """A parked child: start its actor ahead from the template ``built_from`` (if any), wait
    for ``startChild``'s arguments, then become that actor, serving ``listener`` once it has
    opened its file (exit if the zygote closed the pipe instead)."""
    from thespian.system import multiprocCommon

    from sessionlane.actors._shell import set_title

    os.close(pid_w)
    set_title(PARKED_TITLE)
    started = None
    if built_from:
        if frozen_fork.installed():
            frozen_fork.freeze_inherited()  # as startChild's wrapper would, before the build
        started = prestart.Prestarted.build(built_from)
    header = _read_exact(args_r, _HEADER.size)
    if len(header) < _HEADER.size:
        return
    args, name, first = pickle.loads(_read_exact(args_r, _HEADER.unpack(header)[0]))
    os.close(args_r)
    args[_CLOSE_ARG] = []  # its intermediate closed what it inherited from the zygote
    multiprocessing.current_process().name = name
    if started is not None and not started.fits(args):
        started.discard()
        started = None
    if listener is not None:
        ahead.inherit(listener, bound)
    if first is not None:
        _deliver_first(first, args[_PARENT_ARG])
    if started is not None:
        started.start(args)
    else:
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


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to the pipe ``fd``: a request longer than ``PIPE_BUF`` (a park
    request carries a template) may be written in parts, and the other end reads it whole."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            break
        data += chunk
    return data
