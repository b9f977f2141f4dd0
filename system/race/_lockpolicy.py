"""The terms of OpenClaw's lock acquirer (``sessionlane.system.race._lockfile``): its policy and
errors.

``LockPolicy`` holds upstream's budgets (scaled by the race's speed factor); the errors are
what ``SessionWriteLockManager.acquire`` raises, picklable so the race's worker processes can
report them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

__all__ = [
    "DEFAULT_LOCK_POLICY",
    "LockPolicy",
    "SessionWriteLockError",
    "SessionWriteLockStaleError",
    "SessionWriteLockTimeoutError",
    "orphan_payload_grace_ms",
]


@dataclass(frozen=True)
class LockPolicy:
    """The session write-lock policy, in milliseconds of wall time.

    The defaults are upstream's: acquire timeout 60 s, ``staleMs`` 30 min,
    ``maxHoldMs`` 5 min, watchdog every 60 s, retry every 50 ms. ``scaled(speed)`` divides
    every duration by the race's speed factor so the ratios between model time, lock budgets
    and retry delay stay those of the real system.
    """

    timeout_ms: float = 60_000.0
    """The one acquire budget shared by every retry of one acquisition."""
    stale_ms: float = 1_800_000.0
    """Age past which a lock is ``too-old`` (report-only while its holder lives)."""
    max_hold_ms: float = 300_000.0
    """The holder's own budget: written into the payload, enforced by its watchdog."""
    watchdog_interval_ms: float = 60_000.0
    """How often the in-process watchdog looks for entries held past ``max_hold_ms``."""
    retry_delay_ms: float = 50.0
    """Constant delay between two ``O_EXCL`` attempts (``factor: 1``)."""
    orphan_payload_grace_ms: float = 30_000.0
    """mtime grace for a lock whose payload is missing or malformed."""

    def scaled(self, speed: float) -> LockPolicy:
        """The same policy with every duration divided by ``speed`` (retry delay >= 1 ms)."""
        if speed <= 0:
            raise ValueError("speed must be positive")
        return replace(
            self,
            timeout_ms=self.timeout_ms / speed,
            stale_ms=self.stale_ms / speed,
            max_hold_ms=self.max_hold_ms / speed,
            watchdog_interval_ms=self.watchdog_interval_ms / speed,
            retry_delay_ms=max(1.0, self.retry_delay_ms / speed),
            orphan_payload_grace_ms=self.orphan_payload_grace_ms / speed,
        )


def orphan_payload_grace_ms(timeout_ms: float) -> float:
    """Upstream's ``orphanPayloadGraceMs``: 5 s for short acquire timeouts, else 30 s."""
    return 5_000.0 if timeout_ms < 30_000 else 30_000.0


DEFAULT_LOCK_POLICY = LockPolicy()


# ---------------------------------------------------------------------------------------------
# Errors


class SessionWriteLockError(Exception):
    """Base of the baseline's lock errors; fields survive pickling."""

    code = "OPENCLAW_SESSION_WRITE_LOCK"

    def __init__(self, message: str, *, lock_path: str, owner: str) -> None:
        super().__init__(message)
        self.lock_path = lock_path
        self.owner = owner


class SessionWriteLockTimeoutError(SessionWriteLockError):
    """The acquire budget ran out while another holder kept the lock."""

    code = "OPENCLAW_SESSION_WRITE_LOCK_TIMEOUT"

    def __init__(self, *, timeout_ms: float, lock_path: str, owner: str) -> None:
        super().__init__(
            f"session file locked (timeout {round(timeout_ms)}ms): {owner} {lock_path}",
            lock_path=lock_path,
            owner=owner,
        )
        self.timeout_ms = timeout_ms

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_timeout, (self.timeout_ms, self.lock_path, self.owner))


class SessionWriteLockStaleError(SessionWriteLockError):
    """The lock looks stale only for report-only reasons: its live holder is respected."""

    code = "OPENCLAW_SESSION_WRITE_LOCK_STALE"

    def __init__(self, *, lock_path: str, owner: str, reasons: Iterable[str]) -> None:
        self.reasons = tuple(reasons)
        super().__init__(
            f"session write lock is stale ({', '.join(self.reasons)}): {owner} {lock_path}",
            lock_path=lock_path,
            owner=owner,
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_stale, (self.lock_path, self.owner, self.reasons))


def _rebuild_timeout(timeout_ms: float, lock_path: str, owner: str) -> SessionWriteLockTimeoutError:
    return SessionWriteLockTimeoutError(timeout_ms=timeout_ms, lock_path=lock_path, owner=owner)


def _rebuild_stale(
    lock_path: str, owner: str, reasons: tuple[str, ...]
) -> SessionWriteLockStaleError:
    return SessionWriteLockStaleError(lock_path=lock_path, owner=owner, reasons=reasons)
