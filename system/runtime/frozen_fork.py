"""Start every forked actor with the heap it inherited frozen against the cyclic GC.

thespian 4.0.1's ``multiprocTCPBase`` makes each actor process by forking its parent actor
(``MultiProcReplicator._startChildActor`` runs ``multiprocessing.Process(target=startChild)``
with the ``fork`` start method): the Registry forks every SessionFile. The child shares the
parent's pages until it writes to them, and CPython's cyclic collector writes to every object
it traverses (the ``gc_refs`` in each object's header), so one full collection in the child
copies nearly every page of the inherited heap. :func:`sessionlane.system.runtime.launch`
already calls ``gc.freeze()`` before the first fork, which covers what the starting process
had loaded; it does not cover what the admin and the Registry allocate afterwards (the
Registry's table of files grows with every file it activates).

:func:`install` wraps ``multiprocCommon.startChild`` (the function the forked child runs, looked
up by name each time a child starts) so that, first thing in every forked actor, ``gc.freeze()``
moves everything inherited into the permanent generation: the child's collector only walks
what the child itself allocates. Nothing changes in the parent (its collector still frees
its own garbage); the child keeps its copy of the parent's objects either way, frozen or not.
``gc.freeze()`` only relinks the generation lists, so the cost per fork is a few microseconds;
counting what it froze (``gc.get_freeze_count()``) walks every inherited object and took 4 to
17 ms of each new file's first grant, so it is left to :func:`frozen_at_start`, on demand.

Like ``sessionlane.system.runtime.admin_fork`` it runs before the system is created, is
idempotent, and fails closed (``RuntimeError``) on another thespian or if ``startChild`` moved.
:func:`frozen_at_start` tells, inside an actor, whether this path was taken and how many
objects are frozen (tests read it through an actor message; ``docs/cost-model.md`` has the
measurements).
"""

from __future__ import annotations

import functools
import gc
import inspect
import multiprocessing
import os
import sys
import threading
from typing import Any

from thespian.actors import Actor, ChildActorExited

from sessionlane.actors import ahead
from sessionlane.system.runtime.loopback import require_supported_thespian

__all__ = ["ForkReport", "frozen_at_start", "install", "installed"]

_lock = threading.Lock()
_installed = False
_frozen_at_start = False


def installed() -> bool:
    return _installed


def frozen_at_start() -> int | None:
    """In an actor forked through the patched path: how many objects are frozen (what it
    inherited, and anything frozen since). ``None`` in any other process (the path was not
    taken here). Walks every frozen object: for tests and diagnosis, never on a hot path."""
    return gc.get_freeze_count() if _frozen_at_start else None


def install() -> None:
    """Make every actor forked from this process (and from its forked descendants) freeze its
    inherited heap first thing. Raises ``RuntimeError`` on a thespian other than the pinned one
    or if what it wraps moved."""
    global _installed
    with _lock:
        if _installed:
            return
        require_supported_thespian(__name__, "actor start", "multiprocCommon.py")
        from thespian.system import multiprocCommon

        start_child = getattr(multiprocCommon, "startChild", None)
        replicator = getattr(multiprocCommon, "MultiProcReplicator", None)
        starter = getattr(replicator, "_startChildActor", None)
        if not inspect.isfunction(start_child) or not inspect.isfunction(starter):
            raise RuntimeError("thespian's multiprocCommon.startChild moved: cannot patch it")
        if "target=startChild" not in inspect.getsource(starter):
            raise RuntimeError("thespian no longer forks its actors with target=startChild")

        @functools.wraps(start_child)
        def start_child_frozen(*args: Any, **kwargs: Any) -> Any:
            freeze_inherited()
            return start_child(*args, **kwargs)

        multiprocCommon.startChild = start_child_frozen
        _installed = True


def freeze_inherited() -> None:
    """Freeze every object this (freshly forked) process holds (O(1): no object is visited)."""
    global _frozen_at_start
    gc.freeze()
    _frozen_at_start = True


class ForkReport(Actor):  # type: ignore[misc]
    """A probe of how actor processes start, for tests and diagnosis.

    ``"report"`` answers ``{"pid", "ppid", "forked_by", "zygote", "frozen", "modules"}``: this
    process's pid, its parent's, the pid of the process that forked it (``multiprocessing``'s
    parent: not the parent when a zygote forked it), the pid of the zygote it started (or
    None), :func:`frozen_at_start` and the sorted names in ``sys.modules``. ``"spawn"`` creates
    a child ``ForkReport`` (forked from this actor, as the Registry forks each SessionFile) and
    has it send its report to the sender, who is also told ``"child exited"`` when thespian
    reports the child gone (``ChildActorExited``).
    """

    def receiveMessage(self, message: Any, sender: Any) -> None:
        if message == "report":
            self.send(sender, _report())
        elif message == "spawn":
            self.watcher = sender
            self.send(self.createActor(ForkReport), ("report to", sender))
            ahead.run_deferred()  # as the Registry does: the zygote parks the next child now
        elif isinstance(message, ChildActorExited):
            self.send(self.watcher, "child exited")
        elif isinstance(message, tuple) and message[:1] == ("report to",):
            self.send(message[1], _report())


def _report() -> dict[str, Any]:
    from sessionlane.system.runtime import zygote

    forked_by = multiprocessing.parent_process()
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "forked_by": forked_by.pid if forked_by is not None else None,
        "zygote": zygote.zygote_pid(),
        "frozen": frozen_at_start(),
        "modules": sorted(sys.modules),
    }
