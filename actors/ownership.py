"""Kernel-enforced ownership of a transcript: one live SessionFile per file, machine-wide.

A SessionFile serves a file only while it holds an exclusive lock on the file's *owner
sidecar*, ``<dir>/.<basename>.owner``: a small file beside the transcript that sessionlane
never renames, replaces or deletes (a lock on the transcript itself would not survive a
compaction's rename, and one on the fence sidecar would not survive its atomic replace). The
kernel drops the lock when the holding process dies, however it dies, so ownership needs no
cooperation between services: two services on one root, on nested roots, or a service started
while the leftovers of another still run all meet at the same lock.

Why ``flock(LOCK_EX | LOCK_NB)`` and not a classic POSIX ``fcntl`` lock: a POSIX lock belongs
to the *process* and is dropped as soon as the process closes *any* descriptor of the file
(reading the sidecar to name the owner, for instance, would silently release it). ``flock``
belongs to the open file description, so only closing this descriptor (or the death of every
process that has it) releases it. An OFD lock (``F_OFD_SETLK``) has the same semantics but
needs a platform-specific ``struct flock`` packing and is Linux only; ``flock`` is portable
(macOS, the BSDs) and whole-file, which is all we need. The descriptor is ``O_CLOEXEC`` so no
exec'd program keeps the lock; a SessionFile forks nothing, so no fork inherits it either.

Holding the lock, the owner writes its identity into the sidecar (one versioned JSON line:
the file actor's pid, the service's pid, gateway address and admin port, and when it took the
lock) so a refused contender can name it: :class:`OwnedElsewhere`.

Ownership follows the path, not the directory it was taken in. A directory restored from a
backup (``mv d d.old; mkdir d; cp d.old/z.jsonl d/``) or a deleted sidecar leaves the lock on a
file that no longer is the sidecar at the transcript's path, and another service would take the
one that is. So before it grants or writes, the SessionFile checks :meth:`Ownership.still_at`
(by device and inode, on the directory freshly walked from the root) and, when the check fails,
:meth:`Ownership.follow` takes the lock at the path (or learns who holds it).

The sidecar is opened relative to the transcript's directory with ``O_NOFOLLOW``; a symlink,
a non-regular file or a file with several hard links at its name is refused
(:class:`~sessionlane.messages.errors.PathNotAllowed`): writing the identity through it could
change a file outside the root.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from dataclasses import dataclass

from sessionlane.actors.confined import ConfinedDir
from sessionlane.messages.errors import PathNotAllowed, SessionLaneError

__all__ = [
    "OWNER_RECORD_VERSION",
    "OwnedElsewhere",
    "OwnerRecord",
    "Ownership",
    "describe_owner",
    "encode_owner_record",
    "owner_path",
    "parse_owner_record",
    "read_owner",
]

OWNER_RECORD_VERSION = 1
_MAX_RECORD = 4096


@dataclass(frozen=True, slots=True)
class OwnerRecord:
    """Who holds a file's ownership lock (the sidecar's content)."""

    pid: int
    """The SessionFile process that holds the lock."""
    service_pid: int
    """The service (``sessionlane serve`` or the embedding process) it belongs to."""
    gateway: str
    """The service's gateway address, where its clients connect."""
    admin_port: int
    """The service's thespian admin port."""
    since: float
    """Unix time the lock was taken."""


def owner_path(transcript_path: str) -> str:
    """The owner sidecar of ``transcript_path``."""
    directory, base = os.path.split(transcript_path)
    return os.path.join(directory, f".{base}.owner")


def encode_owner_record(record: OwnerRecord) -> bytes:
    """One JSON line, versioned."""
    payload = {
        "v": OWNER_RECORD_VERSION,
        "pid": record.pid,
        "service_pid": record.service_pid,
        "gateway": record.gateway,
        "admin_port": record.admin_port,
        "since": record.since,
    }
    return (json.dumps(payload, ensure_ascii=False) + "\n").encode("utf-8")


def parse_owner_record(data: bytes) -> OwnerRecord:
    """Parse a sidecar's bytes; ``ValueError`` says what is wrong with them."""
    try:
        payload = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ValueError("not a JSON object")
    if payload.get("v") != OWNER_RECORD_VERSION:
        raise ValueError(f"unknown version {payload.get('v')!r}")
    try:
        record = OwnerRecord(
            pid=_int(payload["pid"]),
            service_pid=_int(payload["service_pid"]),
            gateway=str(payload["gateway"]),
            admin_port=_int(payload["admin_port"]),
            since=float(payload["since"]),
        )
    except KeyError as exc:
        raise ValueError(f"missing field {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad field: {exc}") from None
    return record


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a non-negative integer")
    return value


def describe_owner(record: OwnerRecord | None) -> str:
    """What a refused request is told: ``served by another sessionlane service: pid N, ADDR``."""
    if record is None:
        return "served by another sessionlane service (it has not written its identity yet)"
    if not record.service_pid or not record.gateway:  # an actor system without a service
        return f"served by another sessionlane actor system (file actor pid {record.pid})"
    return (
        f"served by another sessionlane service: pid {record.service_pid}, {record.gateway}"
        f" (admin port {record.admin_port}, file actor pid {record.pid})"
    )


class OwnedElsewhere(SessionLaneError):
    """Another live process holds the file's ownership lock; ``owner`` names it if it could."""

    code = "unavailable"

    def __init__(
        self,
        detail: str = "",
        *,
        path: str | None = None,
        code: str | None = None,
        owner: OwnerRecord | None = None,
    ):
        super().__init__(detail or describe_owner(owner), path=path, code=code)
        self.owner = owner


class Ownership:
    """A held ownership lock. Take it with :meth:`acquire`; :meth:`release` once, at the end.

    The process holding it must not fork (a child would inherit the lock).
    """

    def __init__(self, path: str, fd: int, record: OwnerRecord):
        self.path = path
        """The sidecar."""
        self.record = record
        self._fd: int | None = fd
        st = os.fstat(fd)
        self.identity = (st.st_dev, st.st_ino)
        """Device and inode of the locked sidecar: what ``still_at`` compares."""

    @property
    def held(self) -> bool:
        return self._fd is not None

    @classmethod
    def acquire(
        cls,
        transcript_path: str,
        *,
        service_pid: int,
        gateway: str,
        admin_port: int,
        now: float,
        directory: ConfinedDir | None = None,
    ) -> Ownership:
        """Take the lock of ``transcript_path`` without waiting, and write who we are.

        Raises :class:`OwnedElsewhere` when another process holds it,
        :class:`~sessionlane.messages.errors.PathNotAllowed` when the sidecar's name is a symlink,
        not a regular file or hard-linked, and ``OSError`` for anything else (EMFILE included).
        Creates the sidecar (mode 0600) if needed; never follows a symlink. ``directory``, the
        transcript's directory already walked from its root (``sessionlane.actors.confined``), is
        where the sidecar is opened when given (borrowed, not closed here).
        """
        sidecar = owner_path(transcript_path)
        if directory is not None:
            fd = directory.open(os.path.basename(sidecar), os.O_RDWR | os.O_CREAT)
        else:
            fd = _open_sidecar(sidecar, transcript_path)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OwnedElsewhere(path=transcript_path, owner=_read(fd)) from None
            record = OwnerRecord(
                pid=os.getpid(),
                service_pid=service_pid,
                gateway=gateway,
                admin_port=admin_port,
                since=now,
            )
            data = encode_owner_record(record)
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(sidecar, fd, record)

    def still_at(self, directory: ConfinedDir) -> bool:
        """Is the sidecar at the transcript's path in ``directory`` the one this lock is on?

        ``directory`` is the transcript's directory as walked from the root just now
        (``ConfinedDir.revalidate``). One ``fstatat``; a missing sidecar is not ours.
        """
        st = directory.stat(os.path.basename(self.path))
        return st is not None and (st.st_dev, st.st_ino) == self.identity

    def follow(self, transcript_path: str, directory: ConfinedDir, *, now: float) -> Ownership:
        """Take the lock at the sidecar now at the path, then let this one go.

        Raises :class:`OwnedElsewhere` (naming the holder) when another process holds the
        lock there, and whatever :meth:`acquire` raises; this lock is then still held.
        """
        moved = Ownership.acquire(
            transcript_path,
            service_pid=self.record.service_pid,
            gateway=self.record.gateway,
            admin_port=self.record.admin_port,
            now=now,
            directory=directory,
        )
        self.release()
        return moved

    def release(self) -> None:
        """Blank the identity and drop the lock. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # a contender that reads before the next owner writes: no name
        os.close(fd)  # closing the only descriptor releases the flock


def read_owner(transcript_path: str) -> OwnerRecord | None:
    """The identity in ``transcript_path``'s sidecar, if one is written and readable.

    Only meaningful while someone holds the lock (a released lock leaves the sidecar empty).
    """
    with contextlib.suppress(OSError, PathNotAllowed):
        fd = _open_sidecar(owner_path(transcript_path), transcript_path, create=False)
        try:
            return _read(fd)
        finally:
            os.close(fd)
    return None


def _read(fd: int) -> OwnerRecord | None:
    try:
        return parse_owner_record(os.pread(fd, _MAX_RECORD, 0))
    except (OSError, ValueError):
        return None


def _open_sidecar(sidecar: str, transcript_path: str, *, create: bool = True) -> int:
    directory, name = os.path.split(sidecar)
    dir_fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        if create:
            flags |= os.O_CREAT
        try:
            fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PathNotAllowed(
                    f"the owner sidecar {sidecar} is a symlink", path=transcript_path
                ) from None
            raise
    finally:
        os.close(dir_fd)
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_nlink != 1:
        problem = f"has {st.st_nlink} hard links"
    if problem is not None:
        os.close(fd)
        raise PathNotAllowed(f"the owner sidecar {sidecar} {problem}", path=transcript_path)
    return fd
