"""The Python client of the gateway: ``connect`` (sync) and ``connect_async`` (asyncio).

This package's names are the public import path (also re-exported by ``sessionlane``); its
modules are private: ``_core`` holds the I/O-free logic both surfaces share (addresses, frames,
replies to results and errors), ``_sync`` the blocking client, ``_async`` the asyncio one.
"""

from __future__ import annotations

from system.client._sync import (
    AppendResult,
    BadFrame,
    Contended,
    InvalidRecord,
    Lane,
    Lease,
    LeaseRevoked,
    LeaseTimeout,
    NotHolder,
    PathNotAllowed,
    QueueFull,
    SessionLane,
    SessionLaneError,
    ShuttingDown,
    StaleFence,
    TooLarge,
    TooManyFiles,
    Unauthorized,
    Unavailable,
    connect,
    connect_async,
)

__all__ = [
    "AppendResult",
    "BadFrame",
    "Contended",
    "InvalidRecord",
    "Lane",
    "Lease",
    "LeaseRevoked",
    "LeaseTimeout",
    "NotHolder",
    "PathNotAllowed",
    "QueueFull",
    "SessionLane",
    "SessionLaneError",
    "ShuttingDown",
    "StaleFence",
    "TooLarge",
    "TooManyFiles",
    "Unauthorized",
    "Unavailable",
    "connect",
    "connect_async",
]
