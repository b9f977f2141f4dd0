"""Error codes and the exception hierarchy shared by the service and its clients.

Between actors a failure travels as an ``Error`` message carrying one of the codes below; the
clients turn that message into the matching exception. Exceptions carry structured fields and
survive pickling (thespian pickles what crosses an actor boundary).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

__all__ = [
    "ERROR_CODES",
    "BadFrame",
    "Contended",
    "DiskError",
    "DiskFull",
    "ErrorCode",
    "FileMoved",
    "IOFailure",
    "InvalidRecord",
    "LeaseRevoked",
    "LeaseTimeout",
    "NotHolder",
    "PathNotAllowed",
    "PipelineBroken",
    "QueueFull",
    "ReadOnly",
    "SessionLaneError",
    "ShuttingDown",
    "StaleFence",
    "TooLarge",
    "TooManyFiles",
    "Unauthorized",
    "Unavailable",
    "UnknownOutcome",
    "error_for",
]

ErrorCode = Literal[
    "lease_timeout",
    "contended",
    "stale_fence",
    "revoked",
    "not_holder",
    "path_not_allowed",
    "invalid_record",
    "too_large",
    "unauthorized",
    "bad_frame",
    "queue_full",
    "unavailable",
    "shutting_down",
    "abandoned",
    "disk_full",
    "read_only",
    "io_error",
    "file_moved",
    "reclaim_refused",
    "too_many_files",
    "unknown_outcome",
    "pipeline_broken",
    "internal",
]
ERROR_CODES: frozenset[str] = frozenset(get_args(ErrorCode))


class SessionLaneError(Exception):
    """Base of every sessionlane failure.

    ``code`` is the wire error code, ``path`` the canonical path concerned (if any) and
    ``detail`` a human-readable explanation.
    """

    code: ErrorCode = "internal"

    def __init__(self, detail: str = "", *, path: str | None = None, code: str | None = None):
        super().__init__(detail)
        self.detail = detail
        self.path = path
        if code is not None:
            self.code = code  # type: ignore[assignment]

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.detail, self.path, self.code))

    def __str__(self) -> str:
        where = f" [{self.path}]" if self.path else ""
        return f"{self.code}: {self.detail}{where}"


def _rebuild(
    cls: type[SessionLaneError], detail: str, path: str | None, code: str
) -> SessionLaneError:
    return cls(detail, path=path, code=code)


class LeaseTimeout(SessionLaneError, TimeoutError):
    """A waiting acquire was not granted within its wait timeout (also a ``TimeoutError``)."""

    code = "lease_timeout"


class Contended(SessionLaneError):
    """``on_contention="fail"`` met a holder or a queue, or a recovery is already pending."""

    code = "contended"


class LeaseRevoked(SessionLaneError):
    """The lease ended without its holder's release; nothing more is written under it.

    ``reason`` says how (``max_hold``, ``recovery``, ``abandoned``, ``actor_restart``,
    ``shutdown``, ``connection_lost``, ``released``, ...), or is None where the client only
    learned that the lease is gone.
    """

    code: ErrorCode = "revoked"

    def __init__(
        self,
        detail: str = "",
        *,
        path: str | None = None,
        code: str | None = None,
        reason: str | None = None,
    ):
        super().__init__(detail, path=path, code=code)
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_revoked, (type(self), self.detail, self.path, self.code, self.reason))


def _rebuild_revoked(
    cls: type[LeaseRevoked], detail: str, path: str | None, code: str, reason: str | None
) -> LeaseRevoked:
    return cls(detail, path=path, code=code, reason=reason)


class UnknownOutcome(LeaseRevoked):
    """A write was sent and its answer can never come: the route to the file's member, the
    file's actor or the client's own connection was lost after it left. It may or may not be
    in the file: read the file to learn which (never assume it was not written, as
    ``stale_fence`` would say). The lease it used, if any, is gone too (``reason``)."""

    code: ErrorCode = "unknown_outcome"


class StaleFence(LeaseRevoked):
    """A write carried a fence that is no longer current; nothing was written."""

    code = "stale_fence"


class NotHolder(SessionLaneError):
    """A release came from a lane that does not hold the lease."""

    code = "not_holder"


class PathNotAllowed(SessionLaneError):
    """The path resolves outside the roots, is not a regular file, or has a wrong suffix."""

    code = "path_not_allowed"


class InvalidRecord(SessionLaneError):
    """A record is not a JSON object, not serialisable, or over ``max_record_bytes``."""

    code = "invalid_record"


class TooLarge(SessionLaneError):
    """A frame exceeded ``max_frame_bytes``."""

    code = "too_large"


class Unauthorized(SessionLaneError):
    """The service did not admit the connection (no proof of its token, another user, no hello
    in time), or the client did not trust the service (another user's socket, no proof of the
    token): then nothing was sent."""

    code = "unauthorized"


class BadFrame(SessionLaneError):
    """A frame could not be decoded or did not match the protocol."""

    code = "bad_frame"


class QueueFull(SessionLaneError):
    """The path's queue already holds ``max_queue`` waiters."""

    code = "queue_full"


class Unavailable(SessionLaneError, ConnectionError):
    """The service (or the member owning the path) cannot be reached."""

    code = "unavailable"


class ShuttingDown(SessionLaneError):
    """The service is stopping; queued requests are answered with this."""

    code = "shutting_down"


class TooManyFiles(SessionLaneError):
    """The service already keeps ``max_files`` transcripts live; files already live still work.

    Retry later (idle files are passivated after ``idle_ms``) or raise ``max_files``.
    """

    code = "too_many_files"


class DiskError(SessionLaneError):
    """The file system refused a write or a sync; nothing was acknowledged.

    One of ``DiskFull``, ``ReadOnly`` or ``IOFailure``. What the failed write had already put
    in the file is cut off again where possible; it is never counted as written.
    """

    code: ErrorCode = "io_error"


class DiskFull(DiskError):
    """No space left on the file system, or the user's quota is used up (ENOSPC, EDQUOT)."""

    code = "disk_full"


class ReadOnly(DiskError):
    """The file system is mounted read-only (EROFS)."""

    code = "read_only"


class IOFailure(DiskError):
    """The storage failed to read, write or sync (EIO and other I/O errors)."""

    code = "io_error"


class FileMoved(SessionLaneError):
    """The transcript (or a directory above it) was moved or replaced while a write was on its
    way: the records went to the moved file, not to the one now at the path, and nothing was
    acknowledged. The next write goes to the file at the path (or is refused if there is none).
    """

    code = "file_moved"


class PipelineBroken(SessionLaneError):
    """A pipelined append was not written because the one before it in its pipeline was not.

    The service refuses such an append with this code (nothing written). The clients raise it
    for a whole pipeline (``Lease.append_pipelined``) that stopped: ``written`` holds the
    results of its first ``len(written)`` appends, in order; append ``failed`` (that index)
    failed with ``cause``; of the appends after ``written``, the first ``unknown`` may or may
    not be in the file (their answers were lost: read the file), and every later one was not
    written. ``failed`` is None on a bare refusal from the service.
    """

    code: ErrorCode = "pipeline_broken"

    def __init__(
        self,
        detail: str = "",
        *,
        path: str | None = None,
        code: str | None = None,
        written: tuple[Any, ...] = (),
        failed: int | None = None,
        cause: SessionLaneError | None = None,
        unknown: int = 0,
    ):
        super().__init__(detail, path=path, code=code)
        self.written = written
        self.failed = failed
        self.cause = cause
        self.unknown = unknown

    def __reduce__(self) -> tuple[object, ...]:
        fields = (self.written, self.failed, self.cause, self.unknown)
        return (_rebuild_broken, (type(self), self.detail, self.path, self.code, *fields))


def _rebuild_broken(
    cls: type[PipelineBroken],
    detail: str,
    path: str | None,
    code: str,
    written: tuple[Any, ...],
    failed: int | None,
    cause: SessionLaneError | None,
    unknown: int,
) -> PipelineBroken:
    return cls(
        detail, path=path, code=code, written=written, failed=failed, cause=cause, unknown=unknown
    )


_BY_CODE: dict[str, type[SessionLaneError]] = {
    "lease_timeout": LeaseTimeout,
    "contended": Contended,
    "stale_fence": StaleFence,
    "revoked": LeaseRevoked,
    "not_holder": NotHolder,
    "path_not_allowed": PathNotAllowed,
    "invalid_record": InvalidRecord,
    "too_large": TooLarge,
    "unauthorized": Unauthorized,
    "bad_frame": BadFrame,
    "queue_full": QueueFull,
    "unavailable": Unavailable,
    "shutting_down": ShuttingDown,
    "abandoned": LeaseRevoked,
    "disk_full": DiskFull,
    "read_only": ReadOnly,
    "io_error": IOFailure,
    "file_moved": FileMoved,
    "too_many_files": TooManyFiles,
    "unknown_outcome": UnknownOutcome,
    "pipeline_broken": PipelineBroken,
    "reclaim_refused": LeaseRevoked,
    "internal": SessionLaneError,
}


def error_for(code: str, detail: str = "", path: str | None = None) -> SessionLaneError:
    """The exception for a wire error code (unknown codes map to the base class)."""
    return _BY_CODE.get(code, SessionLaneError)(detail, path=path, code=code)
