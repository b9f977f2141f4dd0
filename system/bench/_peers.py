"""The contenders: sessionlane and the locks an agent runtime would use instead.

Each contender guards one transcript and does the same work per cycle: take the lock, append
the records durably (``os.write`` of the JSONL lines and one ``fdatasync``, which is what
sessionlane's default ``durability="fsync"`` does server-side), release.

* ``sessionlane``: a lane of the Python client; the service writes and syncs. Three requests
  per cycle: acquire, append, release.
* ``sessionlane_fused``: the same, with the turn's last append carrying its release
  (``Lease.append(..., release=True)``, append and release): two requests per cycle. Its
  ``append`` keeps the records and its ``release`` sends them with the release, so the bench's
  "releasing" stamp is taken before the append is sent: its hand-off includes the write and
  the ``fdatasync`` that the release waits for.
* ``flock``: ``fcntl.flock(LOCK_EX)`` blocking on ``<file>.flock``: the kernel wakes the
  next waiter; the practical floor for a hand-off between processes.
* ``filelock``: py-filelock's ``FileLock`` with its defaults (non-blocking ``flock`` polled
  every 50 ms).
* ``redis``: redis-py's ``Lock`` (``SET NX PX`` with a token, polled every 100 ms, its
  default) on a private ``redis-server`` on loopback; measured only where ``redis-server`` is
  on ``PATH`` and redis-py is installed (``sessionlane[bench]``), see ``_redis``.
* ``lockfile``: OpenClaw's ``<file>.lock`` (``O_EXCL`` create, JSON payload, retry every
  50 ms) from ``sessionlane.system.race.baseline``; if that module is missing or its API differs, a
  thin adapter with the same algorithm (see :func:`lockfile_source`).
"""

from __future__ import annotations

import fcntl
import inspect
import json
import os
import time
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

__all__ = [
    "PEERS",
    "Contender",
    "ContenderName",
    "encode",
    "lockfile_source",
    "open_contender",
]

ContenderName = Literal[
    "sessionlane", "sessionlane_fused", "filelock", "flock", "lockfile", "redis"
]
PEERS: tuple[ContenderName, ...] = ("filelock", "flock", "lockfile", "redis")
"""Every peer; ``redis`` is left out of a run where it cannot be measured (``_redis``)."""

_LOCKFILE_RETRY_MS = 50.0
_LONG_TIMEOUT_S = 600.0


class Contender(Protocol):
    """One process's handle on one guarded transcript."""

    def acquire(self) -> None: ...

    def append(self, records: list[dict[str, Any]]) -> None: ...

    def release(self) -> None: ...

    def close(self) -> None: ...


def encode(records: list[dict[str, Any]]) -> bytes:
    """JSONL bytes, encoded as the service encodes them."""
    return b"".join(
        json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for r in records
    )


def open_contender(name: ContenderName, path: str, *, address: str = "", lane: str = "") -> Any:
    """A :class:`Contender` for ``path``; ``address`` is the service's (sessionlane) or the
    Redis URL (redis), ``lane`` the sessionlane lane's name."""
    if name == "sessionlane":
        return _Sessionlane(address, lane, path)
    if name == "sessionlane_fused":
        return _SessionlaneFused(address, lane, path)
    if name == "redis":
        return _Redis(address, path)
    if name == "flock":
        return _Flock(path)
    if name == "filelock":
        return _FileLock(path)
    return _make_lockfile(path)


class _DirectWriter:
    """The peers' transcript writes: one ``write`` of the batch, one ``fdatasync``."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def append(self, records: list[dict[str, Any]]) -> None:
        os.write(self.fd, encode(records))
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class _Flock(_DirectWriter):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.lock_fd = os.open(path + ".flock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def acquire(self) -> None:
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)

    def release(self) -> None:
        fcntl.flock(self.lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.lock_fd)
        super().close()


class _FileLock(_DirectWriter):
    def __init__(self, path: str) -> None:
        from filelock import FileLock

        super().__init__(path)
        self.lock = FileLock(path + ".lock")  # defaults: no timeout, poll every 50 ms

    def acquire(self) -> None:
        self.lock.acquire()

    def release(self) -> None:
        self.lock.release()


class _Redis(_DirectWriter):
    def __init__(self, url: str, path: str) -> None:
        import redis

        super().__init__(path)
        self.client = redis.Redis.from_url(url)
        # redis-py's defaults: no expiry, blocking, poll every 0.1 s.
        self.lock = self.client.lock(f"sessionlane-bench:{path}")

    def acquire(self) -> None:
        self.lock.acquire()

    def release(self) -> None:
        self.lock.release()

    def close(self) -> None:
        self.client.close()
        super().close()


class _Sessionlane:
    def __init__(self, address: str, lane: str, path: str) -> None:
        from sessionlane.system.client import connect

        self.sl = connect(address)
        self.lane = self.sl.lane(lane)
        self.path = path
        self.lease: Any = None

    def acquire(self) -> None:
        self.lease = self.lane.acquire(self.path, purpose="write", wait_timeout=_LONG_TIMEOUT_S)

    def append(self, records: list[dict[str, Any]]) -> None:
        self.lease.append(*records)

    def release(self) -> None:
        self.lease.release()
        self.lease = None

    def close(self) -> None:
        self.sl.close()


class _SessionlaneFused(_Sessionlane):
    """The turn's last append carries the release (append and release)."""

    records: list[dict[str, Any]] = []

    def append(self, records: list[dict[str, Any]]) -> None:
        self.records = records  # sent with the release

    def release(self) -> None:
        self.lease.append(*self.records, release=True)
        self.lease = None


# The lock-file baseline -------------------------------------------------------------------


def lockfile_source() -> str:
    """Which implementation ``lockfile`` uses in this process, and why."""
    try:
        manager_class = _baseline_manager_class()
    except Exception as exc:  # not written yet, or renamed: say so in the report
        return f"bench adapter ({type(exc).__name__}: {exc})"
    return f"{manager_class.__module__}.{manager_class.__name__}"


def _baseline_manager_class() -> Any:
    from sessionlane.system.race.baseline import SessionWriteLockManager

    accepted = inspect.signature(SessionWriteLockManager.acquire).parameters
    missing = {"timeout_ms", "retry_delay_ms"} - set(accepted)
    if missing:
        raise TypeError(f"SessionWriteLockManager.acquire lacks {sorted(missing)}")
    return SessionWriteLockManager


def _make_lockfile(path: str) -> Any:
    try:
        manager_class = _baseline_manager_class()
    except Exception:
        return _AdapterLockfile(path)
    return _BaselineLockfile(path, manager_class(start_watchdog=False))


class _BaselineLockfile(_DirectWriter):
    def __init__(self, path: str, manager: Any) -> None:
        super().__init__(path)
        self.path = path
        self.manager = manager
        self.handle: Any = None

    def acquire(self) -> None:
        self.handle = self.manager.acquire(
            self.path,
            timeout_ms=_LONG_TIMEOUT_S * 1000.0,
            retry_delay_ms=_LOCKFILE_RETRY_MS,
        )

    def release(self) -> None:
        self.handle.release()
        self.handle = None

    def close(self) -> None:
        self.manager.close()
        super().close()


class _AdapterLockfile(_DirectWriter):
    """OpenClaw's algorithm without stale detection (every holder here is alive)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.lock_path = path + ".lock"

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                time.sleep(_LOCKFILE_RETRY_MS / 1000.0)
                continue
            created = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            payload = {"pid": os.getpid(), "createdAt": created}
            os.write(fd, (json.dumps(payload, indent=2) + "\n").encode())
            os.close(fd)
            return

    def release(self) -> None:
        os.unlink(self.lock_path)
