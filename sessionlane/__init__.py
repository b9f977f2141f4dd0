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

from sessionlane.system import client
from sessionlane.system._version import __version__
from sessionlane.system.client import *  # noqa: F403  (the client's public names are this package's)
from sessionlane.system.client._async import AsyncLane, AsyncLease, AsyncSessionLane

__all__ = ["AsyncLane", "AsyncLease", "AsyncSessionLane", "__version__"]
__all__ += client.__all__
