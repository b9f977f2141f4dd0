"""sessionlane: coordination of AI-agent session transcripts, one mailbox per file.

The public Python API::

    import sessionlane

    with sessionlane.connect("127.0.0.1:7420") as sl:
        with sl.lane("agent:main").lease("/data/sessions/a.jsonl") as lease:
            lease.append({"type": "message", "text": "hi"})

    async with sessionlane.connect_async() as sl:  # or: sl = await sessionlane.connect_async()
        ...

``connect`` / ``connect_async`` take ``HOST:PORT``, ``tcp://HOST:PORT`` or ``unix:///path``
(default ``$SESSIONLANE_LISTEN``, else ``tcp://127.0.0.1:7420``). Every failure raised is a
``SessionLaneError``; its subclasses name the kind (``error.code`` is the wire error code).
The implementation lives in the ``sessionlane.system.client`` package; this package is the
stable import path. ``python -m sessionlane`` runs the command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sessionlane.system._version import __version__ as __version__

if TYPE_CHECKING:
    from sessionlane.system import client as client
    from sessionlane.system.client import *  # noqa: F403
    from sessionlane.system.client._async import AsyncLane as AsyncLane
    from sessionlane.system.client._async import AsyncLease as AsyncLease
    from sessionlane.system.client._async import AsyncSessionLane as AsyncSessionLane

# The client is loaded on first use, not with the package: every module of the service is a
# submodule of this package, and every actor process is forked from the service, so an eager
# import here would put the client, asyncio, ssl and tenacity in each file actor's process
# (docs/cost-model.md).
_ASYNC = ("AsyncLane", "AsyncLease", "AsyncSessionLane")


if not TYPE_CHECKING:  # at run time only: type checkers see the imports above

    def __getattr__(name: str) -> Any:
        if name.startswith("__") and name != "__all__":  # probes of module attributes
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from sessionlane.system import client

        if name == "__all__":
            value: Any = [*_ASYNC, "__version__", *client.__all__]
        elif name == "client":
            value = client
        elif name in _ASYNC:
            from sessionlane.system.client import _async

            value = getattr(_async, name)
        elif name in client.__all__:
            value = getattr(client, name)
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        globals()[name] = value
        return value
