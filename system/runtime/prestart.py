"""Do thespian's start of a file's actor in the parked child, before the child is asked for.

thespian 4.0.1's ``multiprocCommon.startChild`` makes an actor process in this order: close the
parent's descriptors, build the TCP transport (it binds the actor's port: its address), replace
the root logger by a forwarder to the logger actor, build the ``MultiProcManager``, send
``EndpointConnected`` to the creator, title the process, set its signal handlers, then run the
manager, which creates the actor instance on its first turn. On a first grant that was about
2.5 ms of the new file's CPU between the Registry handing the parked child its arguments and
the file's ``FileInit`` (``docs/activation.md``), on a path where every process waits for a
core.

None of it depends on which file the child becomes: only on its parent (the Registry), the
admin, the logger, the system's capabilities and log settings, and the actor's class. So the
Registry passes, with each request to park a child, a *template*: the arguments it just gave
the child it started (:func:`template`). The zygote forks the next parked child holding those
bytes (it never unpickles them: its frozen pages stay untouched), and the child builds the
transport, the log forwarder, the manager and the actor instance at once
(:meth:`Prestarted.build`), then waits for its arguments. When they come, and they match the
template in everything the build used (:meth:`Prestarted.fits`), only what names this child
is left (:meth:`Prestarted.start`): ``EndpointConnected`` with its local address, its title,
its signal handlers (set only now: a parked child still dies of ``SIGTERM``), and the run.
If they do not match (the system's capabilities changed since), the prebuilt parts are
dropped and ``startChild`` runs as before.

Nothing is served earlier than before: the actor's port is bound ahead, as its channel
listener is (``sessionlane.actors.ahead``), but nobody knows it until ``EndpointConnected``
names it, and its transport authenticates every connection as any actor's does
(``sessionlane.system.runtime.connection_auth``). The file still opens, checks and locks its
transcript in ``FileInit``, its first message, before its listener is watched.

The first child of a service has no template (nothing was started before it): it starts the
ordinary way. Like the other patches of ``sessionlane.system.runtime`` this applies to
thespian 4.0.1 only: :func:`supported` checks that ``startChild`` still reads as replicated
here, and the zygote sends no template otherwise.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import inspect
import logging
import multiprocessing.process
import pickle
import signal
from typing import Any

__all__ = ["PRESTART", "Prestarted", "supported", "template"]

log = logging.getLogger(__name__)

PRESTART = True
"""Whether parked children build thespian's start ahead (read in the Registry's process: set
it before the system starts; ``False`` for a before/after measurement)."""

# startChild's positional parameters (thespian 4.0.1), by name.
_CLASS, _GLOBAL, _ENDPOINT, _TRANSPORT, _HASH, _SOURCE = 0, 1, 2, 3, 4, 5
_PARENT, _ADMIN, _NOTIFY, _LOGGER, _REQUIREMENTS, _CAPABILITIES = 6, 7, 8, 9, 10, 11
_CLOSE, _CONTEXT, _LOGDEFS = 12, 13, 14
_BUILT_FROM = (_CLASS, _GLOBAL, _HASH, _SOURCE, _PARENT, _ADMIN, _LOGGER, _REQUIREMENTS)
"""The arguments the build uses as they are (compared with ``==``); the endpoint, the
capabilities, the concurrency context and the log settings are compared on their own."""

_REPLICATED = (
    "closeFileNums(fileNumsToClose)",
    "transport = transportClass(endpoint)",
    "lowestLevel = get_min_log_level(logDefs)",
    "logging.root = ThespianLogForwarder(loggerAddr, transport, logLevel=lowestLevel)",
    "logging.Logger.root = logging.root",
    "logging.Logger.manager = logging.Manager(logging.Logger.root)",
    "am = MultiProcManager(childClass, globalName, transport,",
    "am.asLogger = loggerAddr",
    "EndpointConnected(endpoint.addrInst))",
    ".addCallback(onFailure=actorStartupFailed))",
    "setProcName(getattr(childClass, '__name__',",
    "if each in child_exit_signals:",
    "set_signal_handler(each, am.signalChildDied)",
    "sigexithandler if each in exit_signals",
    "am.run()",
)
"""What ``startChild`` must still say for its steps to be done here instead."""

_INSTANCE_REPLICATED = (
    "actorInst = withPossibleInitArgs(capabilities=self.capabilities,",
    "requirements=self._childReqs)",
    ".create(aClass)",
    "self._sCBStats.inc('Actor.Instance Created')",
    "self.actorInst = actorInst",
    "self.actorInst._myRef = self",
)
"""What ``ActorManager._createInstance`` must still say for :func:`_create_instance` to make the
actor instance as it would."""


@functools.cache
def supported() -> bool:
    """Whether thespian's ``startChild`` and ``_createInstance`` read as this module replicates
    them."""
    from thespian.system import multiprocCommon
    from thespian.system.actorManager import ActorManager

    return _reads_as(multiprocCommon.startChild, _REPLICATED) and _reads_as(
        ActorManager._createInstance, _INSTANCE_REPLICATED
    )


def _reads_as(function: Any, lines: tuple[str, ...]) -> bool:
    """Whether ``function``'s source says each of ``lines`` (whitespace aside)."""
    try:
        source = inspect.getsource(inspect.unwrap(function))
    except (OSError, TypeError):
        return False
    flat = " ".join(source.split())
    return all(" ".join(line.split()) in flat for line in lines)


def template(args: list[Any] | tuple[Any, ...]) -> bytes:
    """In the Registry: what the next parked child may build ahead, from the arguments of the
    child just started (pickled); ``b""`` if nothing can be (then it starts as before)."""
    if not PRESTART or len(args) != _LOGDEFS + 1 or not supported():
        return b""
    kept = list(args)
    kept[_NOTIFY], kept[_CLOSE] = None, []  # this child's own: never read ahead
    try:
        return pickle.dumps(kept)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        log.debug("no template for the next parked child: %s", exc)
        return b""


class Prestarted:
    """In a parked child: thespian's start of its actor, built from a template, waiting for
    the arguments that name the child."""

    def __init__(self, built_from: list[Any], manager: Any, handlers: Any) -> None:
        self.built_from, self.manager, self.handlers = built_from, manager, handlers

    @classmethod
    def build(cls, data: bytes) -> Prestarted | None:
        """Build the transport, the log forwarder, the manager and the actor instance from
        ``data`` (:func:`template`); None (the child starts as before) if there is no template
        or the build failed."""
        if not data:
            return None
        try:
            return cls._build(pickle.loads(data))
        except Exception as exc:  # a failed build costs the ahead start, never the child
            log.debug("cannot start ahead: %s", exc)
            return None

    @classmethod
    def _build(cls, args: list[Any]) -> Prestarted:
        from thespian.system import multiprocCommon as mc

        current = multiprocessing.process._current_process  # type: ignore[attr-defined]
        if hasattr(current, "daemon"):  # as startChild: this actor may make actors of its own
            current.daemon = False
        transport = args[_TRANSPORT](args[_ENDPOINT])
        level = mc.get_min_log_level(args[_LOGDEFS])
        logging.root = mc.ThespianLogForwarder(args[_LOGGER], transport, logLevel=level)
        logging.Logger.root = logging.root
        logging.Logger.manager = logging.Manager(logging.Logger.root)
        am = mc.MultiProcManager(
            args[_CLASS], args[_GLOBAL], transport, args[_HASH], args[_SOURCE],
            args[_PARENT], args[_ADMIN], args[_REQUIREMENTS], args[_CAPABILITIES],
            args[_CONTEXT], args[_LOGDEFS],
        )  # fmt: skip
        am.asLogger = args[_LOGGER]
        _create_instance(am)
        name = getattr(args[_CLASS], "__name__", str(args[_CLASS]))
        handlers = (
            mc.signal_detector(name, transport.myAddress, am),
            mc.shutdown_signal_detector(name, transport.myAddress, am),
        )
        return cls(args, am, handlers)

    def fits(self, args: list[Any]) -> bool:
        """Whether ``args`` (the child's own) start the same actor the build made."""
        built = self.built_from
        if len(args) != len(built) or args[_TRANSPORT] is not built[_TRANSPORT]:
            return False
        try:
            return (
                all(args[i] == built[i] for i in _BUILT_FROM)
                and args[_CAPABILITIES] == built[_CAPABILITIES]
                and args[_LOGDEFS] == built[_LOGDEFS]
                and type(args[_CONTEXT]) is type(built[_CONTEXT])
                and _endpoint_fits(args[_ENDPOINT], built[_ENDPOINT])
            )
        except Exception:  # an argument that cannot be compared: start as before
            return False

    def start(self, args: list[Any]) -> None:
        """Become the actor ``args`` name: what ``startChild`` does after its manager is
        built, then run it (returns when the actor has exited)."""
        from thespian.system import multiprocCommon as mc

        mc.closeFileNums(args[_CLOSE])
        am = self.manager
        am.transport.scheduleTransmit(
            None,
            mc.TransmitIntent(args[_NOTIFY], mc.EndpointConnected(args[_ENDPOINT].addrInst))
            .addCallback(onFailure=mc.actorStartupFailed),
        )  # fmt: skip
        name = getattr(args[_CLASS], "__name__", str(args[_CLASS]))
        mc.setProcName(name.rpartition(".")[-1], am.transport.myAddress)
        detected, shutdown = self.handlers
        for each in range(1, signal.NSIG):
            if each in mc.uncatchable_signals:
                continue
            if each in mc.child_exit_signals:
                mc.set_signal_handler(each, am.signalChildDied)
                continue
            with contextlib.suppress(RuntimeError, ValueError, OSError):
                mc.set_signal_handler(each, shutdown if each in mc.exit_signals else detected)
        am.run()

    def discard(self) -> None:
        """Drop what was built (its port closes); the child then starts as before."""
        with contextlib.suppress(Exception):
            atexit.unregister(self.manager._shutdownActor)
        with contextlib.suppress(Exception):
            self.manager.transport.close()


def _create_instance(am: Any) -> None:
    """Create ``am``'s actor instance now, as its first turn would; on failure leave it to
    that turn, which reports it to the parent as thespian does."""
    from thespian.system.utilis import actualActorClass, withPossibleInitArgs

    if am._sourceHash:
        return  # loaded from a source the parent sends: left to thespian
    try:
        actor_class = actualActorClass(am._actorClass, None)
        instance = withPossibleInitArgs(
            capabilities=am.capabilities, requirements=am._childReqs
        ).create(actor_class)
    except Exception as exc:
        log.debug("the actor instance is left to its first turn: %s", exc)
        return
    am._sCBStats.inc("Actor.Instance Created")
    am.actorInst = instance
    instance._myRef = am


def _endpoint_fits(mine: Any, built: Any) -> bool:
    """Two ``TCPEndpoint``s that differ at most by the child's local address number."""
    one, other = getattr(mine, "args", None), getattr(built, "args", None)
    return (
        type(mine) is type(built)
        and isinstance(one, tuple)
        and isinstance(other, tuple)
        and len(one) == len(other)
        and one[1:] == other[1:]
    )
