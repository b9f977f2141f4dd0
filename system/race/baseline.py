"""The baseline the race measures: OpenClaw's lock file + stat-fingerprint fence, in Python.

Two layers, following OpenClaw's source (``src/agents/session-write-lock.ts`` and
``attempt.session-lock.ts`` in ``openclaw/openclaw``):

* ``sessionlane.system.race._lockfile`` (re-exported here): the cross-process ``<file>.lock``.
* This module: the per-attempt controller ``EmbeddedAttemptSessionLockController`` with
  the fingerprint fence, the takeover error and the in-process session-file owner
  registry that serializes whole attempts on one file *within one process*.

An attempt acquires the lock eagerly, writes its prompt, calls ``release_for_prompt()`` (which
snapshots ``(dev, ino, size, mtime_ns, ctime_ns)`` and drops the lock for the model call),
then ``reacquire_after_prompt()`` (which re-takes the lock and asserts the fence) before it
writes the reply through ``with_session_write_lock()``. Any unexplained change of the file
while the lock was released raises ``EmbeddedAttemptSessionTakeoverError`` and the attempt is
lost (upstream: "All models failed", the reply is dropped).

Where this port simplifies (the behaviour under measurement is unchanged):

* No AsyncLocalStorage: a nested ``with_session_write_lock`` on the same thread runs inline
  (a thread-local depth plays the ALS "active write" scope).
* No owned-write publication / trusted-state maps (1.10): those only help a second
  controller *in the same process* adopt another controller's writes. Within one process the
  owner registry below already serializes attempts on a file, and across processes upstream's
  maps are invisible too, so any foreign write trips the fence exactly as upstream.
* Benign advance (1.9 rule 3) is implemented, with the a50a6b21 byte-identical prefix
  requirement; the benign *rewrite* (legacy linear-transcript migration, rule 4) is not: it
  only concerns OpenClaw's old transcript format.
* No Pi event-queue drains, no drain-owner bookkeeping beyond waiting for retained writes:
  an attempt here is one thread running its steps in order.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sessionlane.system.race._lockfile import (
    DEFAULT_LOCK_POLICY,
    LockPolicy,
    SessionWriteLock,
    SessionWriteLockError,
    SessionWriteLockManager,
    SessionWriteLockStaleError,
    SessionWriteLockTimeoutError,
    default_manager,
    inspect_lock_payload,
    lock_path_for,
    normalize_session_file,
    register_cleanup_handlers,
)

__all__ = [
    "DEFAULT_LOCK_POLICY",
    "MAX_BENIGN_ADVANCE_BYTES",
    "MAX_FENCE_SNAPSHOT_BYTES",
    "NOOP_LOCK",
    "TRANSCRIPT_ONLY_ASSISTANT_MODELS",
    "EmbeddedAttemptSessionFileOwnerTimeoutError",
    "EmbeddedAttemptSessionLockController",
    "EmbeddedAttemptSessionTakeoverError",
    "FileFingerprint",
    "LockPolicy",
    "NoopLock",
    "SessionFileOwner",
    "SessionFileOwnerRegistry",
    "SessionWriteLock",
    "SessionWriteLockError",
    "SessionWriteLockManager",
    "SessionWriteLockStaleError",
    "SessionWriteLockTimeoutError",
    "advance_is_benign",
    "append_records",
    "default_manager",
    "default_owner_registry",
    "inspect_lock_payload",
    "is_transcript_only_assistant_line",
    "lock_path_for",
    "read_fingerprint",
    "register_cleanup_handlers",
]

MAX_BENIGN_ADVANCE_BYTES = 1024 * 1024
"""Upstream ``MAX_BENIGN_SESSION_FENCE_ADVANCE_BYTES``."""
MAX_FENCE_SNAPSHOT_BYTES = 8 * 1024 * 1024
"""The fence snapshot keeps the file's text only up to this size (upstream: 8 MiB)."""
TRANSCRIPT_ONLY_ASSISTANT_MODELS = frozenset({"delivery-mirror", "gateway-injected"})
"""Assistant lines OpenClaw writes for the transcript only; appending them is benign."""


class EmbeddedAttemptSessionTakeoverError(Exception):
    """The transcript changed while this attempt had released its lock for the model call.

    Also raised for every later write once detected (the flag is sticky), and stands for
    "lost the lock" when a reacquire or a write times out.
    """

    def __init__(self, session_file: str) -> None:
        super().__init__(
            f"session file changed while embedded prompt lock was released: {session_file}"
        )
        self.session_file = session_file

    def __reduce__(self) -> tuple[object, ...]:
        return (EmbeddedAttemptSessionTakeoverError, (self.session_file,))


class EmbeddedAttemptSessionFileOwnerTimeoutError(Exception):
    """Waiting for the in-process session-file owner (1.13) ran past its timeout."""

    def __init__(self, session_file: str, timeout_ms: float) -> None:
        super().__init__(
            f"timed out waiting for embedded session file owner after {round(timeout_ms)}ms: "
            f"{session_file}"
        )
        self.session_file = session_file
        self.timeout_ms = timeout_ms

    def __reduce__(self) -> tuple[object, ...]:
        return (EmbeddedAttemptSessionFileOwnerTimeoutError, (self.session_file, self.timeout_ms))


# ---------------------------------------------------------------------------------------------
# Fingerprints and the benign-advance rule


@dataclass(frozen=True)
class FileFingerprint:
    """``fs.stat(file, {bigint: true})`` reduced to the fields the fence compares.

    Two missing files are equal; otherwise all five fields must match.
    """

    exists: bool
    dev: int = 0
    ino: int = 0
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0


def read_fingerprint(path: str | os.PathLike[str]) -> FileFingerprint:
    """The file's fingerprint; ``exists=False`` when it is missing (other errors raise)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return FileFingerprint(exists=False)
    return FileFingerprint(True, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def is_transcript_only_assistant_line(line: bytes) -> bool:
    """An OpenClaw transcript-only assistant line (delivery mirror / gateway injection)."""
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return False
    message = value.get("message") if isinstance(value, dict) else None
    return (
        isinstance(message, dict)
        and message.get("role") == "assistant"
        and message.get("provider") == "openclaw"
        and message.get("model") in TRANSCRIPT_ONLY_ASSISTANT_MODELS
    )


def advance_is_benign(
    before: FileFingerprint, snapshot_text: bytes | None, after: FileFingerprint, data: bytes
) -> bool:
    """``sessionFenceAdvanceIsBenign``: the file only grew by transcript-only assistant lines.

    ``data`` is the file's current content. Same inode, growth of at most 1 MiB, the appended
    text ends with a newline, every appended line is transcript-only, and, when the fence kept
    a snapshot of the text, the old prefix is byte-identical (a50a6b21, #86572).
    """
    if not (before.exists and after.exists) or (before.dev, before.ino) != (after.dev, after.ino):
        return False
    growth = after.size - before.size
    if growth <= 0 or growth > MAX_BENIGN_ADVANCE_BYTES or len(data) < after.size:
        return False
    if snapshot_text is not None and data[: before.size] != snapshot_text:
        return False
    appended = data[before.size : after.size]
    if not appended.endswith(b"\n"):
        return False
    return all(is_transcript_only_assistant_line(line) for line in appended.splitlines())


def append_records(path: str | os.PathLike[str], records: list[dict[str, object]]) -> None:
    """Append JSONL records with one ``write`` on an ``O_APPEND`` descriptor.

    Like Node's ``appendFileSync``: no fsync (upstream does not sync transcript appends).
    """
    data = b"".join(
        json.dumps(record, separators=(",", ":")).encode() + b"\n" for record in records
    )
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# The in-process session-file owner registry (1.13, #87159)


class SessionFileOwner:
    """One attempt's ownership of a canonical file; ``release()`` is idempotent."""

    def __init__(self, registry: SessionFileOwnerRegistry, key: str, waited_ms: float) -> None:
        self._registry = registry
        self.key = key
        self.waited_ms = waited_ms
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._registry._release(self)


class SessionFileOwnerRegistry:
    """One owner per canonical file *per process*; waiters time out with a named error.

    Upstream acquires it with ``timeoutMs = maxHoldMs`` right before the controller and holds
    it for the whole attempt, so two lanes of one process never interleave prompt windows on
    one file. It is invisible to other processes.
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._owners: dict[str, SessionFileOwner] = {}
        self._cond = threading.Condition()
        self._monotonic = monotonic

    def acquire(self, session_file: str | os.PathLike[str], timeout_ms: float) -> SessionFileOwner:
        key = os.path.realpath(session_file)
        started = self._monotonic()
        deadline = started + timeout_ms / 1000.0
        with self._cond:
            while key in self._owners:
                remaining = deadline - self._monotonic()
                if remaining <= 0:
                    raise EmbeddedAttemptSessionFileOwnerTimeoutError(key, timeout_ms)
                self._cond.wait(remaining)
            owner = SessionFileOwner(self, key, (self._monotonic() - started) * 1000.0)
            self._owners[key] = owner
            return owner

    def is_owned(self, session_file: str | os.PathLike[str]) -> bool:
        with self._cond:
            return os.path.realpath(session_file) in self._owners

    def _release(self, owner: SessionFileOwner) -> None:
        with self._cond:
            if self._owners.get(owner.key) is owner:
                del self._owners[owner.key]
                self._cond.notify_all()


_OWNERS = SessionFileOwnerRegistry()


def default_owner_registry() -> SessionFileOwnerRegistry:
    """The process-global owner registry."""
    return _OWNERS


# ---------------------------------------------------------------------------------------------
# The per-attempt controller (1.8)


class NoopLock:
    """Upstream's ``noopLock``: what cleanup gets after a takeover."""

    def release(self) -> None:
        """Nothing to release."""


NOOP_LOCK = NoopLock()


class EmbeddedAttemptSessionLockController:
    """``createEmbeddedAttemptSessionLockController``: one attempt's lock and fence.

    The constructor acquires the file lock eagerly (``SessionWriteLockTimeoutError`` /
    ``SessionWriteLockStaleError`` propagate: the attempt cannot start). Thread-safe for one
    attempt whose writes may come from several threads; ``holds`` lists every acquisition this
    controller made (for the race's hand-off measurement) and ``wait_ms`` the total time spent
    waiting for the lock, failed waits included.
    """

    def __init__(
        self,
        session_file: str | os.PathLike[str],
        *,
        policy: LockPolicy = DEFAULT_LOCK_POLICY,
        manager: SessionWriteLockManager | None = None,
    ) -> None:
        self.session_file = normalize_session_file(session_file)
        self._policy = policy
        self._manager = manager or default_manager(policy.watchdog_interval_ms)
        self._cond = threading.Condition()
        self._scope = threading.local()
        self._retained_uses = 0
        self._fence: FileFingerprint | None = None
        self._fence_text: bytes | None = None
        self._fence_active = False
        self._takeover = False
        self._disposed = False
        self.holds: list[SessionWriteLock] = []
        self.wait_ms = 0.0
        self._held: SessionWriteLock | None = self._acquire()

    # -- public operations --------------------------------------------------------------------

    def has_session_takeover(self) -> bool:
        """The sticky takeover flag."""
        return self._takeover

    @property
    def holds_lock(self) -> bool:
        """Whether the coarse (eager / reacquired) lock is held right now."""
        held = self._held
        return held is not None and not held.released

    def release_for_prompt(self) -> None:
        """Snapshot the fence and release the coarse lock around the model call.

        A no-op without a held lock, and (as upstream) from inside an active write scope,
        where waiting for retained uses would self-deadlock.
        """
        with self._cond:
            if self._held is None or self._in_scope():
                return
            while self._retained_uses:
                self._cond.wait()
            handle, self._held = self._held, None
            self._snapshot_fence()
        handle.release()

    def reacquire_after_prompt(self) -> None:
        """Re-take the coarse lock after the model call and assert the fence.

        No-op after a takeover or while the lock is held. An acquire timeout/stale error marks
        the takeover (lost the lock) and propagates; a fence failure releases and raises
        ``EmbeddedAttemptSessionTakeoverError``.
        """
        with self._cond:
            if self._takeover or self._held is not None or self._disposed:
                return
        handle = self._acquire_or_mark_takeover()
        try:
            self._assert_fence()
        except BaseException:
            handle.release()
            raise
        with self._cond:
            self._held = handle

    @contextlib.contextmanager
    def with_session_write_lock(self) -> Iterator[None]:
        """Run a transcript write under the lock, checking the fence first.

        Reuses the coarse lock when held (a *retained use*), else takes a short lock. After the
        body (even if it raised) the fence is refreshed to the file's new state, so the
        attempt's own writes never trip its own fence.
        """
        if self._takeover:
            raise EmbeddedAttemptSessionTakeoverError(self.session_file)
        if self._in_scope():
            yield  # nested write: the outer scope holds the lock (upstream: ALS inline run)
            return
        short: SessionWriteLock | None = None
        with self._cond:
            retained = self._held is not None
            if retained:
                self._retained_uses += 1
        if not retained:
            short = self._acquire_or_mark_takeover()
        try:
            self._assert_fence()
            self._scope.depth = 1
            try:
                yield
            finally:
                self._scope.depth = 0
                self._refresh_fence()
        finally:
            if short is not None:
                short.release()
            else:
                with self._cond:
                    self._retained_uses -= 1
                    self._cond.notify_all()

    def refresh_after_owned_session_write(self) -> None:
        """``refreshAfterOwnedSessionWrite``: adopt the current state after an own write."""
        self._refresh_fence()

    def acquire_for_cleanup(self) -> SessionWriteLock | NoopLock:
        """``acquireForCleanup``: the lock for the attempt's final writes, or a no-op lock.

        After a takeover (or when the lock cannot be had, or the fence fails) this returns
        ``NOOP_LOCK`` so cleanup never releases anything twice (as upstream).
        """
        if self._takeover:
            return NOOP_LOCK
        with self._cond:
            while self._retained_uses:
                self._cond.wait()
            handle, self._held = self._held, None
        if handle is None:
            try:
                handle = self._acquire_or_mark_takeover()
            except SessionWriteLockError:
                return NOOP_LOCK
        try:
            self._assert_fence()
        except EmbeddedAttemptSessionTakeoverError:
            handle.release()
            return NOOP_LOCK
        return handle

    def dispose(self) -> None:
        """Release the coarse lock if still held, once retained writes are done. Idempotent."""
        with self._cond:
            if self._disposed:
                return
            self._disposed = True
            while self._retained_uses:
                self._cond.wait()
            handle, self._held = self._held, None
        if handle is not None:
            handle.release()

    # -- internals ----------------------------------------------------------------------------

    def _in_scope(self) -> bool:
        return bool(getattr(self._scope, "depth", 0))

    def _acquire(self) -> SessionWriteLock:
        started = time.monotonic()
        try:
            handle = self._manager.acquire(
                self.session_file,
                timeout_ms=self._policy.timeout_ms,
                stale_ms=self._policy.stale_ms,
                max_hold_ms=self._policy.max_hold_ms,
                retry_delay_ms=self._policy.retry_delay_ms,
                orphan_grace_ms=self._policy.orphan_payload_grace_ms,
            )
        except SessionWriteLockError:
            self.wait_ms += (time.monotonic() - started) * 1000.0
            raise
        self.wait_ms += handle.waited_ms
        self.holds.append(handle)
        return handle

    def _acquire_or_mark_takeover(self) -> SessionWriteLock:
        try:
            return self._acquire()
        except SessionWriteLockError:
            self._takeover = True  # "lost the lock" counts as a takeover (1.16)
            raise

    def _snapshot_fence(self) -> None:
        fingerprint = read_fingerprint(self.session_file)
        self._fence = fingerprint
        self._fence_text = self._read_text(fingerprint)
        self._fence_active = True

    def _read_text(self, fingerprint: FileFingerprint) -> bytes | None:
        if not fingerprint.exists or fingerprint.size > MAX_FENCE_SNAPSHOT_BYTES:
            return None
        try:
            return Path(self.session_file).read_bytes()
        except FileNotFoundError:
            return None

    def _refresh_fence(self) -> None:
        if self._fence_active and not self._takeover:
            self._snapshot_fence()

    def _assert_fence(self) -> None:
        """``assertSessionFileFence`` (1.9): equal, benign advance, or takeover."""
        if not self._fence_active or self._fence is None:
            return
        current = read_fingerprint(self.session_file)
        if current == self._fence:
            return
        if current.exists and (current.dev, current.ino) == (self._fence.dev, self._fence.ino):
            try:
                data = Path(self.session_file).read_bytes()
            except FileNotFoundError:
                data = b""
            if advance_is_benign(self._fence, self._fence_text, current, data):
                self._fence = current
                self._fence_text = data if current.size <= MAX_FENCE_SNAPSHOT_BYTES else None
                return
        self._takeover = True
        raise EmbeddedAttemptSessionTakeoverError(self.session_file)
