"""The Python client of the gateway: ``connect`` (sync) and ``connect_async`` (asyncio).

This package's names are the public import path (also re-exported by ``sessionlane``); its
modules are private. What both surfaces share is written once and does no I/O: ``_core`` (the
``ClientCore`` state machine: settings, connections, request ids, replies and events, leases,
keepalives, reconnect policy), ``_ops`` (each public method as a generator that yields the
calls it makes and returns its result), ``_pipeline`` (pipelined appends: the same, with
batches of calls in flight) and ``_records`` (what is refused before sending).
``_sync`` (a reader thread, blocking calls) and ``_async`` (a reader task, awaited calls) only
move bytes and drive the operations.
"""

from __future__ import annotations

from sessionlane.messages.errors import (
    BadFrame,
    Contended,
    DiskError,
    DiskFull,
    FileMoved,
    InvalidRecord,
    IOFailure,
    LeaseRevoked,
    LeaseTimeout,
    NotHolder,
    PathNotAllowed,
    PipelineBroken,
    QueueFull,
    ReadOnly,
    SessionLaneError,
    ShuttingDown,
    StaleFence,
    TooLarge,
    TooManyFiles,
    Unauthorized,
    Unavailable,
    UnknownOutcome,
)
from sessionlane.system.client._core import AppendResult
from sessionlane.system.client._sync import Lane, Lease, SessionLane, connect, connect_async

__all__ = [
    "AppendResult",
    "BadFrame",
    "Contended",
    "DiskError",
    "DiskFull",
    "FileMoved",
    "IOFailure",
    "InvalidRecord",
    "Lane",
    "Lease",
    "LeaseRevoked",
    "LeaseTimeout",
    "NotHolder",
    "PathNotAllowed",
    "PipelineBroken",
    "QueueFull",
    "ReadOnly",
    "SessionLane",
    "SessionLaneError",
    "ShuttingDown",
    "StaleFence",
    "TooLarge",
    "TooManyFiles",
    "Unauthorized",
    "Unavailable",
    "UnknownOutcome",
    "connect",
    "connect_async",
]
