"""The lease record sidecar of a transcript: ``<dir>/.<basename>.lease``, one fixed-size record.

The I/O half of ``sessionlane.actors.reclaim``: it opens the sidecar once per activation
(through the transcript's ``ConfinedDir``: never through a symlink, only a regular file with
one hard link), reads the record, and rewrites it in place with one ``pwrite`` of
``RECORD_BYTES`` (page-sized: a process killed mid-call leaves the old or the new record).
No fsync: the record must outlive the service's process, which the page cache does; after a
machine crash an old record is caught by the size check of a reclaim and refused.

A write that fails (a file system remounted read-only after an I/O error, a full btrfs) is
not an error of the call it follows (``try_write``, which the shell performs): the answers it
backs still leave, and the record on disk lags (``docs/restarts.md``, "A lease record that
cannot be written"). The failure is counted (``failures``, the status counter
``lease_record_failures``) and logged once per episode (``DiskEpisodes``), as the
transcript's own disk errors are.
"""

from __future__ import annotations

import logging
import os

from sessionlane.actors.confined import ConfinedDir
from sessionlane.actors.disk_errors import DiskEpisodes, disk_error_code
from sessionlane.actors.reclaim import FREE, LeaseRecord, encode_record, parse_record

__all__ = ["LeaseRecordFile", "lease_record_path"]

log = logging.getLogger(__name__)


def lease_record_path(transcript_path: str) -> str:
    """The sidecar holding the lease record of ``transcript_path``."""
    directory, base = os.path.split(transcript_path)
    return os.path.join(directory, f".{base}.lease")


class LeaseRecordFile:
    """The open lease record sidecar of one transcript. Not thread-safe."""

    def __init__(self, transcript_path: str, directory: ConfinedDir) -> None:
        self.path = lease_record_path(transcript_path)
        name = os.path.basename(self.path)
        self.fd = directory.open(name, os.O_RDWR | os.O_CREAT)
        self.writes = 0
        self.failures = 0
        """Writes that failed (the record on disk lags until one succeeds)."""
        self.episodes = DiskEpisodes(self.path, log)

    def load(self) -> LeaseRecord:
        """The record on disk; an unreadable one is logged and read as free (its lease cannot
        be reclaimed, which is the honest loss: fences stay safe, they live elsewhere)."""
        data = os.pread(self.fd, 2 * 4096, 0)
        try:
            return parse_record(data)
        except ValueError as exc:
            log.warning("ignoring the unreadable lease record %s: %s", self.path, exc)
            return FREE

    def try_write(self, record: LeaseRecord) -> bool:
        """``write``, its ``OSError`` logged once per episode and counted, never raised (False):
        what the shell performs, so that no answer waits for a record the disk refuses."""
        try:
            self.write(record)
        except OSError as exc:
            self.failures += 1
            self.episodes.failed(disk_error_code(exc) or "io_error", "lease record write", exc)
            return False
        return True

    def write(self, record: LeaseRecord) -> None:
        """Write ``record`` in place (raises what the ``pwrite`` raised)."""
        os.pwrite(self.fd, encode_record(record), 0)
        self.writes += 1
        self.episodes.succeeded()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
