"""Disk errors by name, and logged once per episode.

A full disk, a file system remounted read-only or failing storage makes *every* write of a file
fail until an operator acts. Each failure is answered with its own code (``disk_full``,
``read_only``, ``io_error``: ``sessionlane.messages.errors``), but logging a traceback per
failed append would bury the one line that matters, so ``DiskEpisodes`` logs the first failure
of an episode (an ERROR naming the code, the operation, the file and the OS error), counts the
rest quietly, and logs one line when a write succeeds again. A failure of another kind starts a
new episode.
"""

from __future__ import annotations

import errno
import logging
from typing import Literal

__all__ = ["DiskEpisodes", "DiskErrorCode", "disk_error_code", "named_disk_error"]

DiskErrorCode = Literal["disk_full", "read_only", "io_error"]

_NAMED: dict[int, DiskErrorCode] = {
    errno.ENOSPC: "disk_full",
    errno.EDQUOT: "disk_full",
    errno.EROFS: "read_only",
    errno.EIO: "io_error",
}
_NOT_DISK = frozenset({errno.EMFILE, errno.ENFILE})  # the process, not the disk: too_many_files


def named_disk_error(exc: BaseException) -> DiskErrorCode | None:
    """The code of an ``OSError`` that names the disk (ENOSPC, EDQUOT, EROFS, EIO), else None."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return _NAMED.get(exc.errno)
    return None


def disk_error_code(exc: BaseException) -> DiskErrorCode | None:
    """The code of a failed write or sync: the named ones, ``io_error`` for any other
    ``OSError`` (descriptor exhaustion excepted), None for what is not an ``OSError``."""
    if not isinstance(exc, OSError) or exc.errno in _NOT_DISK:
        return None
    return named_disk_error(exc) or "io_error"


class DiskEpisodes:
    """The disk trouble of one file: logs its start and its end, counts what is between."""

    def __init__(self, path: str, log: logging.Logger) -> None:
        self.path = path
        self.log = log
        self.code: DiskErrorCode | None = None
        """The kind of the episode in progress, or None while writes succeed."""
        self.failures = 0
        """Failures in the episode in progress."""
        self.episodes = 0
        """Episodes begun so far (a status counter)."""

    def failed(self, code: DiskErrorCode, what: str, exc: BaseException) -> None:
        """A ``what`` (``append``, ``fdatasync``...) failed with ``code``; logged if it is new."""
        self.failures += 1
        if code == self.code:
            return
        self.code = code
        self.episodes += 1
        self.log.error(
            "%s: %s of %s failed: %s; further failures are not logged until a write succeeds",
            code,
            what,
            self.path,
            exc,
        )

    def succeeded(self) -> None:
        """A write was made durable: the episode (if any) is over."""
        if self.code is None:
            return
        self.log.warning(
            "%s: writes succeed again after %d failed (%s)", self.path, self.failures, self.code
        )
        self.code = None
        self.failures = 0
