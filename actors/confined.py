"""A directory inside a root, reached and used without ever following a symlink.

Admission (``sessionlane.actors.paths.canonicalize``) checks a path once. Afterwards anybody who
can write in the root may rename a transcript away and plant a symlink (or a hard link to a file
outside the root) in its place; any later ``open(path)`` would then write wherever that link points.
So a file's actor never opens a path again. It opens its root once, walks down to the
transcript's directory one component at a time with ``O_DIRECTORY | O_NOFOLLOW`` (a symlinked
component is refused), keeps that directory's descriptor for the file's whole life, and does
every open, create, stat, rename, unlink and fsync relative to it, never following a symlink
at the last component either. Every file it opens is then checked on the descriptor itself:
a regular file with exactly one hard link (a second link may be a name of a file outside the
roots, and writing through it would change that file).

Each refusal is a ``PathNotAllowed`` that says what was found and why it is refused. A name
that became unusable is refused at once: nothing here loops or waits.

``ConfinedDir`` is the one owner of the directory descriptor; the transcript, its fence
sidecar, its quarantine and the owner lock all go through one instance.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from sessionlane.actors.disk_errors import named_disk_error
from sessionlane.messages.errors import ErrorCode, PathNotAllowed

__all__ = [
    "ConfinedDir",
    "check_regular",
    "containing_root",
    "failure_code",
    "failure_detail",
    "file_kind",
    "is_fd_exhaustion",
]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FD_EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE})


def containing_root(canonical: str, roots: Sequence[str]) -> str | None:
    """The realpath of the root in ``roots`` containing ``canonical`` (innermost), or None.

    ``canonical`` is a realpath already; roots are compared by realpath, and by whole
    components (``/srv/root-evil`` is not inside ``/srv/root``).
    """
    real = [os.path.realpath(root) for root in roots]
    inside = [root for root in real if os.path.commonpath([root, canonical]) == root]
    return max(inside, key=len) if inside else None


def is_fd_exhaustion(exc: BaseException) -> bool:
    """Whether ``exc`` is the process (EMFILE) or the system (ENFILE) out of descriptors."""
    return isinstance(exc, OSError) and exc.errno in _FD_EXHAUSTION


def failure_code(exc: BaseException) -> ErrorCode:
    """The wire code for a failure to open or use a file: what the client can act on.

    A refused path keeps its own code (``path_not_allowed``); running out of descriptors is
    ``too_many_files`` (retry once files are passivated); a full disk, a read-only file system
    or an I/O error have their names (``disk_full``, ``read_only``, ``io_error``); anything
    else, an unreadable fence sidecar included, is ``unavailable``: the file cannot be served
    as it is.
    """
    code: ErrorCode | None = getattr(exc, "code", None)
    if code is not None and code != "internal" and not isinstance(exc, OSError):
        return code
    if is_fd_exhaustion(exc):
        return "too_many_files"
    return named_disk_error(exc) or "unavailable"


def failure_detail(exc: BaseException) -> str:
    """The detail for a client: a refusal's own explanation, else the exception named."""
    detail = getattr(exc, "detail", None)
    if isinstance(detail, str) and detail:
        return detail
    if is_fd_exhaustion(exc):
        return f"out of file descriptors ({exc}); retry once idle files are passivated"
    return f"{type(exc).__name__}: {exc}"


class ConfinedDir:
    """An open directory; every operation names an entry of it and follows no symlink.

    Open with :meth:`walk` (or :meth:`open_parent` for a file path). It also keeps its root
    open, so that :meth:`revalidate` can walk down again and notice a directory that was moved
    away (out of the root, perhaps) or replaced. Not thread-safe; one owner closes it
    (``close`` is idempotent). ``path`` is only for messages: nothing is ever resolved
    through it.
    """

    def __init__(
        self, fd: int, path: str, *, root: str = "", root_fd: int = -1, parts: Sequence[str] = ()
    ) -> None:
        self.fd = fd
        self.path = path
        self.unsynced = False
        """A create here waits for its directory fsync (``fsync_later``)."""
        self._root = root
        self._root_fd = root_fd
        self._parts = list(parts)
        self._identity: tuple[int, int] | None = None
        """(device, inode) of ``fd``, read once (a descriptor's file never changes)."""

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def walk(cls, root: str, directory: str) -> ConfinedDir:
        """Open ``directory`` by walking down from ``root``, refusing any symlinked component.

        ``root`` itself is opened as configured (the operator chose it, symlinks and all);
        ``directory`` must be ``root`` or lie under it, spelled without symlinks (a canonical
        path's parent is). Raises ``PathNotAllowed`` naming the component that is missing, a
        symlink or not a directory; ``OSError`` for anything else (EMFILE included).
        """
        relative = os.path.relpath(directory, root)
        parts = [] if relative == "." else relative.split(os.sep)
        if any(part in ("", "..") for part in parts):
            raise PathNotAllowed(f"{directory} is not inside the root {root}", path=directory)
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = _descend(root_fd, root, parts)
        except BaseException:
            os.close(root_fd)
            raise
        return cls(fd, directory, root=root, root_fd=root_fd, parts=parts)

    def revalidate(self) -> bool:
        """Walk down from the root again; switch to the directory found there if it is another.

        Returns True when it switched (the directory was moved or replaced: entries are now
        looked up in the one at the path). Raises ``PathNotAllowed`` when the path no longer
        leads to a directory without a symlink; the old directory stays in use meanwhile.
        Costs two system calls per component below the root, plus one ``fstat``; none for the
        root itself, which is held open as configured (a walk of no component leads back to
        the root's descriptor, always the directory ``fd`` was opened on).
        """
        if self._root_fd < 0 or not self._parts:
            return False
        fd = _descend(self._root_fd, self._root, self._parts)
        try:
            now = os.fstat(fd)
            if self._identity is None:
                before = os.fstat(self.fd)
                self._identity = (before.st_dev, before.st_ino)
        except BaseException:
            os.close(fd)
            raise
        if (now.st_dev, now.st_ino) == self._identity:
            os.close(fd)
            return False
        if self.unsynced:  # what was created in the directory we leave is made durable
            os.fsync(self.fd)
            self.unsynced = False
        os.close(self.fd)
        self.fd = fd
        self._identity = (now.st_dev, now.st_ino)
        return True

    def leads_to(self, name: str, dev: int, ino: int) -> bool:
        """Does the path from the root lead, right now, to the file (``dev``, ``ino``) at ``name``?

        Walks down from the root again without following a symlink (and without switching
        this directory): False when the file or a directory above it was moved or replaced,
        or a component became a symlink or went missing. Other errors (EMFILE...) raise.
        Costs two system calls per component below the root, plus one ``fstatat``.
        """
        if self._root_fd < 0:
            return True  # no root to walk from: only the directory itself is confined
        try:
            fd = _descend(self._root_fd, self._root, self._parts) if self._parts else -1
        except PathNotAllowed:
            return False
        try:
            found = os.stat(name, dir_fd=fd if fd >= 0 else self._root_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        finally:
            if fd >= 0:
                os.close(fd)
        return (found.st_dev, found.st_ino) == (dev, ino)

    @classmethod
    def open_parent(cls, path: str, root: str | None = None) -> tuple[ConfinedDir, str]:
        """The directory of file ``path`` (walked from ``root``) and the file's name in it.

        Without ``root`` the parent directory itself is the root: only the last component is
        then confined.
        """
        directory, name = os.path.split(path)
        directory = directory or "."
        return cls.walk(root if root is not None else directory, directory), name

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- entries ---------------------------------------------------------------------------

    def path_of(self, name: str) -> str:
        """The full path of entry ``name`` (for messages only)."""
        return os.path.join(self.path, name)

    def open(self, name: str, flags: int, mode: int = 0o600) -> int:
        """Open entry ``name`` (never through a symlink) and check what was opened.

        ``flags`` are ``os.open`` flags (``O_NOFOLLOW | O_CLOEXEC`` are added). Returns a
        descriptor on a regular file with one hard link; otherwise the descriptor is closed
        and ``PathNotAllowed`` says what the entry is. ``FileNotFoundError`` and
        ``FileExistsError`` (with ``O_CREAT | O_EXCL``) pass through; so do other errors.
        """
        # O_NONBLOCK: opening a FIFO planted at the name must not block the actor; it is
        # cleared again below for the regular file that passes the checks.
        full = flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(name, full, mode, dir_fd=self.fd)
        except (FileNotFoundError, FileExistsError):
            raise
        except OSError as exc:
            raise _refusal(exc, self.path_of(name), "file") from None
        try:
            self.check(fd, name)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def check(self, fd: int, name: str) -> os.stat_result:
        """``fstat`` of an open ``fd``: a regular file with one link, or ``PathNotAllowed``."""
        st = os.fstat(fd)
        check_regular(st, self.path_of(name))
        return st

    def stat(self, name: str) -> os.stat_result | None:
        """``lstat`` of entry ``name`` (a symlink is reported as one), None when missing."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def rename(self, src: str, dst: str) -> None:
        """Rename entry ``src`` over entry ``dst`` (atomic; a symlink at ``dst`` is replaced,
        never followed)."""
        os.rename(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def unlink(self, name: str) -> bool:
        """Remove entry ``name`` (a symlink itself, never its target); False if missing."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def names(self) -> list[str]:
        """The names of the directory's entries."""
        return os.listdir(self.fd)

    def fsync(self) -> None:
        """Make creates, renames and unlinks in this directory durable."""
        os.fsync(self.fd)
        self.unsynced = False

    def fsync_later(self) -> None:
        """A create whose durability may wait: until ``sync_pending``, or any ``fsync`` of this
        directory (a fence reservation's rename has one), whichever comes first."""
        self.unsynced = True

    def sync_pending(self) -> None:
        """Make a create ``fsync_later`` left waiting durable now (nothing if none waits)."""
        if self.unsynced:
            self.fsync()


def _descend(root_fd: int, root: str, parts: Sequence[str]) -> int:
    """Open ``root/parts...`` from ``root_fd``, one component at a time, following no symlink.

    A new descriptor (the root's own ``.`` for no component); ``root_fd`` stays open. The first
    component is opened from ``root_fd`` itself: two system calls per component, no more."""
    if not parts:
        return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
    fd = root_fd
    try:
        for i, part in enumerate(parts):
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.ENOTDIR and _is_symlink(part, fd):
                    exc = OSError(errno.ELOOP, exc.strerror)  # say what it is
                raise _refusal(exc, os.path.join(root, *parts[: i + 1]), "directory") from None
            if fd != root_fd:
                os.close(fd)
            fd = child
    except BaseException:
        if fd != root_fd:
            os.close(fd)
        raise
    return fd


def check_regular(st: os.stat_result, where: str) -> None:
    """Refuse (``PathNotAllowed``) anything but a regular file with exactly one hard link."""
    if not stat.S_ISREG(st.st_mode):
        raise PathNotAllowed(f"{where} is {file_kind(st.st_mode)}, not a regular file", path=where)
    if st.st_nlink != 1:
        raise PathNotAllowed(
            f"{where} has {st.st_nlink} hard links: refused, because another link may be a "
            "name of a file outside the roots and writing would change that file",
            path=where,
        )


def _refusal(exc: OSError, where: str, what: str) -> OSError | PathNotAllowed:
    """What an ``os.open`` error on a confined name means for the client."""
    if exc.errno == errno.ELOOP:
        return PathNotAllowed(f"{where} is a symbolic link; it is never followed", path=where)
    if exc.errno == errno.ENOTDIR:
        return PathNotAllowed(f"{where} is not a {what}", path=where)
    if exc.errno == errno.ENOENT:
        return PathNotAllowed(f"{where} does not exist (any more)", path=where)
    if exc.errno == errno.ENAMETOOLONG:
        return PathNotAllowed(f"{where}: name too long", path=where)
    return exc


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def file_kind(mode: int) -> str:
    """What a non-regular file is, for an error message: ``a directory``, ``a FIFO``..."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"
