"""The file I/O of one transcript: plain synchronous Python, no actor code.

The SessionFile actor owns exactly one ``Transcript`` per canonical path and calls it from its
message handlers, so nothing here waits on anything but the local file system: no sleeps, no
retries, no locks. A transcript is an append-only JSONL file (docs/contract.md, "Transcript
semantics"): one JSON object per line, UTF-8, ``\\n``-terminated.

* ``encode_records`` turns a batch into bytes, all or nothing (``encode_lines``: its lines).
* ``Transcript.append`` writes those bytes at the end; ``sync`` makes them durable.
* ``Transcript.rewrite`` replaces the whole file atomically (compaction).
* A torn last line (no final newline) is never extended: its bytes are moved to
  ``<path>.torn`` and the transcript is cut back to its last full line.
* ``Transcript.check_external`` notices and adopts changes made by other writers.

Confinement: a transcript is opened through a ``ConfinedDir`` walked down from its root and
kept for its whole life; the file, its quarantine and rewrite temp files are only ever named
relative to that directory, never through a symlink, and every file opened is checked to be a
regular file with one hard link (``sessionlane.actors.confined``). A name that became a symlink, a
second link or anything but a regular file raises ``PathNotAllowed`` and nothing is written.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from sessionlane.actors.atomic_file import (
    leftover_temps,
    remove_leftover_temps,
    replace_file,
    write_all,
)
from sessionlane.actors.confined import ConfinedDir
from sessionlane.messages.errors import InvalidRecord, Unavailable
from sessionlane.messages.lean_records import lean_record
from sessionlane.messages.wire import Durability, ExternalChangeKind

__all__ = [
    "FileIdentity",
    "OpenReport",
    "Transcript",
    "encode_lines",
    "encode_records",
    "leftover_temps",
    "line_starts",
    "quarantine_path",
    "remove_leftover_temps",
    "replace_file",
]

_log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_OPEN_ATTEMPTS = 3
"""Create-or-open tries when the name keeps appearing and disappearing (then: unavailable)."""


_encode_record = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
"""``json.dumps`` with these options, without building an encoder per record."""


def encode_records(records: Sequence[object], max_record_bytes: int) -> bytes:
    """Encode a batch of records as JSONL: each a JSON object on one ``\\n``-terminated line.

    All or nothing: the first invalid record (not a dict, not serialisable as strict JSON, not
    encodable as UTF-8, or longer than ``max_record_bytes`` including its newline) raises
    ``InvalidRecord`` naming its index and the reason. An empty batch is refused as well.
    """
    return b"".join(encode_lines(records, max_record_bytes))


def encode_lines(records: Sequence[object], max_record_bytes: int) -> list[bytes]:
    """``encode_records``'s lines, one per record (newline included), before they are joined:
    their lengths give each line's offset (``Appended.offsets``)."""
    if len(records) == 0:
        raise InvalidRecord("empty batch: at least one record is required")
    lines: list[bytes] = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise InvalidRecord(f"record {index}: not a JSON object (got {type(record).__name__})")
        try:
            text = _encode_record(record)
            line = text.encode("utf-8") + b"\n"
        except (TypeError, ValueError, RecursionError) as exc:
            # TypeError: unserialisable value or key; ValueError: NaN/Infinity, circular
            # reference, or a lone surrogate (UnicodeEncodeError is a ValueError).
            raise InvalidRecord(f"record {index}: not serialisable as JSON: {exc}") from None
        if len(line) > max_record_bytes:
            raise InvalidRecord(
                f"record {index}: {len(line)} bytes encoded, over max_record_bytes "
                f"({max_record_bytes})"
            )
        lines.append(line)
    return lines


def line_starts(lines: Sequence[bytes]) -> tuple[int, ...]:
    """Where each of ``lines`` starts, from the start of the first, once they are joined."""
    starts: list[int] = []
    at = 0
    for line in lines:
        starts.append(at)
        at += len(line)
    return tuple(starts)


@lean_record
class FileIdentity:
    """What ``stat`` says about a file, as far as change detection cares."""

    dev: int
    """Device of the file."""
    ino: int
    """Inode number: a different one means the path now names another file."""
    size: int
    """Size in bytes."""
    mtime_ns: int
    """Modification time (ns); only as fine as the kernel's timestamp granularity."""
    ctime_ns: int
    """Inode change time (ns); same granularity caveat."""

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class OpenReport:
    """What ``Transcript.open`` found and did."""

    created: bool
    """The file did not exist and was created empty."""
    torn_bytes: int
    """Bytes of a torn last line moved to the quarantine file (0 when none)."""
    quarantine: str | None
    """The quarantine file the torn bytes went to, or None."""
    size: int
    """Size of the transcript once opened (after any truncation)."""


def quarantine_path(path: str) -> str:
    """Where the torn tails of ``path`` are kept, one tear per line."""
    return path + ".torn"


_REPAIR_CHECK_MAX = 16 << 20  # torn tails larger than this are always quarantined again


def _already_quarantined(qfd: int, fd: int, keep: int, size: int) -> int:
    """How much of the torn tail ``fd[keep:size]`` an interrupted repair already quarantined.

    ``size - keep + 1`` when the quarantine's last tear is exactly this one (then nothing is
    written again); the length of an unterminated fragment at the end of the quarantine when
    it is a prefix of this tear (an interrupted write: only the rest is written); else 0 (an
    unrelated fragment is first terminated, so that it stays a tear of its own). Two
    independent tears with identical bytes in a row are recorded once.
    """
    torn = size - keep
    qsize = os.fstat(qfd).st_size
    if qsize == 0 or torn > _REPAIR_CHECK_MAX:
        return 0
    tail = os.pread(qfd, min(qsize, torn + 2), qsize - min(qsize, torn + 2))
    ours = os.pread(fd, torn, keep)
    if tail.endswith(b"\n"):
        last = tail[:-1].rsplit(b"\n", 1)
        complete = len(last) == 2 or qsize <= torn + 1
        if last[-1] == ours and complete:
            return torn + 1
        return 0
    fragment = tail.rsplit(b"\n", 1)[-1]
    whole = b"\n" in tail or qsize == len(tail)  # the fragment is all in ``tail``
    if whole and ours.startswith(fragment):
        return len(fragment)
    write_all(qfd, b"\n")
    return 0


class Transcript:
    """One open transcript file, owned by one SessionFile actor.

    ``path`` is canonical and its parent directory exists. ``root`` is the configured root
    that contains it: the directory is reached from there without following symlinks (None:
    the parent directory itself is taken as the root). ``directory``, if given, is that
    directory already open (``ConfinedDir.open_parent``), borrowed and never closed here: the
    file's actor opens it first when something else (the owner lock) must use it before the
    transcript is opened. Call ``open()`` before anything else.
    Every method is synchronous and bounded by local disk I/O; none waits on another writer.
    The object keeps the identity (dev, inode, size, times) it last saw or produced, so that
    ``check_external`` can tell its own writes from everybody else's.
    """

    def __init__(
        self,
        path: str,
        *,
        root: str | None = None,
        directory: ConfinedDir | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.path = path
        self.root = root
        self.sync_count = 0
        """Number of fdatasyncs performed by ``sync`` (read by tests and benchmarks)."""
        self._log = log or _log
        self._fd: int | None = None
        self._dir: ConfinedDir | None = directory
        self._owns_dir = directory is None
        self._name = os.path.basename(path)
        self._identity: FileIdentity | None = None
        self._cut_to: tuple[int, int] | None = None
        """A failed append left its partial bytes (offset, end) and the cut failed too: the
        next ``check_external`` cuts them, as ours, not as somebody else's change."""

    # -- lifecycle ------------------------------------------------------------------------

    def open(self, *, repair: bool = True, durable_create: bool = True) -> OpenReport:
        """Open (or create, mode 0o600) the file and repair a torn last line.

        ``repair=False`` leaves a torn last line alone (the caller repairs it later with
        :meth:`repair_torn_tail`): with legacy interop, an unterminated last line while a live
        legacy writer holds ``<file>.lock`` is a write in progress, not a tear.

        ``durable_create=False`` leaves the directory fsync of a create to the caller (the
        directory's ``sync_pending``, or any later fsync of it): it must be done before
        anything written to the file is acknowledged.

        A torn tail is appended to ``<path>.torn`` (followed by ``\\n``) and fsynced, then the
        transcript is truncated to its last full line and fsynced; one WARNING is logged.
        Leftover temp files of an interrupted ``rewrite`` are removed (this scans the
        directory: about 7 ms per 10,000 entries). Raises ``PathNotAllowed`` when the
        directory or the file cannot be reached within the root without following a symlink,
        or is not a regular file with one hard link; then nothing stays open.
        """
        if self._fd is not None:
            raise RuntimeError(f"transcript already open: {self.path}")
        if self._owns_dir:
            self._dir, self._name = ConfinedDir.open_parent(self.path, self.root)
        try:
            self._remove_leftover_temps()
            fd, created = self._open_or_create(durable_create)
            self._fd = fd
            self._identity = FileIdentity.of(os.fstat(fd))
            torn = self._repair_torn_tail() if repair else 0
        except BaseException:
            self.close()
            raise
        return OpenReport(
            created=created,
            torn_bytes=torn,
            quarantine=quarantine_path(self.path) if torn else None,
            size=self.size,
        )

    def close(self) -> None:
        """Close the file and its directory; safe to call twice."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dir is not None and self._owns_dir:
            self._dir.close()
            self._dir = None

    @property
    def directory(self) -> ConfinedDir:
        """The transcript's open directory (for its sidecars: fence, owner lock)."""
        if self._dir is None:
            raise RuntimeError(f"transcript not open: {self.path}")
        return self._dir

    def __enter__(self) -> Self:
        if self._fd is None:
            self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- state ----------------------------------------------------------------------------

    @property
    def identity(self) -> FileIdentity:
        """The file identity as last seen or produced by this object."""
        if self._identity is None:
            raise RuntimeError(f"transcript not open: {self.path}")
        return self._identity

    @property
    def size(self) -> int:
        """Size in bytes as far as this object knows (see ``check_external``)."""
        return self.identity.size

    def line_count(self) -> int:
        """Number of lines (``\\n`` bytes) in the open file, by reading it whole."""
        fd = self._require_fd()
        count, offset = 0, 0
        while chunk := os.pread(fd, _CHUNK, offset):
            count += chunk.count(b"\n")
            offset += len(chunk)
        return count

    # -- writes ---------------------------------------------------------------------------

    def append(self, data: bytes) -> int:
        """Append encoded, ``\\n``-terminated ``data``; return the offset where it starts.

        Short writes are continued. If a write fails part-way, the partial bytes are cut off
        again when nobody else has written since. No sync: call ``sync`` before acknowledging.
        """
        if not data.endswith(b"\n"):
            raise ValueError("append data must be non-empty and end with a newline")
        fd = self._require_fd()
        known = self.identity
        view = memoryview(data)
        # O_APPEND positions every write at the current end; the fd offset after the first
        # write tells where it landed even if another process appended just before.
        written = os.write(fd, view)
        start = os.lseek(fd, 0, os.SEEK_CUR) - written
        try:
            write_all(fd, view[written:])
        except OSError:
            self._cut_partial(start, start + len(data))
            self._after_failed_append(known, start)
            raise
        st = os.fstat(fd)
        if start == known.size and st.st_size == start + len(data):
            self._identity = FileIdentity.of(st)
        else:
            # Someone else wrote around our append: remember only our own bytes so that the
            # next check_external reports theirs.
            self._identity = FileIdentity(
                known.dev, known.ino, known.size + len(data), known.mtime_ns, known.ctime_ns
            )
        return start

    def still_at_path(self) -> bool:
        """Is the open file still the one at its path under the root (walked again now)?

        An append is acknowledged only if so once it is durable: a rename of the file or of a
        directory above it between the last look and the write sent the records elsewhere.
        """
        known = self.identity
        return self.directory.leads_to(self._name, known.dev, known.ino)

    def sync(self, durability: Durability) -> None:
        """Make appended data durable: ``"fsync"`` fdatasyncs, ``"flush"`` does nothing more.

        ``os.write`` already hands the bytes to the OS, which is all ``"flush"`` promises.
        """
        if durability == "fsync":
            os.fdatasync(self._require_fd())
            self.sync_count += 1

    def rewrite(self, data: bytes) -> None:
        """Replace the whole file with ``data`` atomically (compaction).

        Temp file in the same directory (0o600), fsync, rename over the path, fsync the
        directory, then this object switches to the new file. On failure before the rename
        the temp file is removed and the old file is untouched and still in use. If only the
        final directory fsync fails, the new content is in place but this object still holds
        the old file, so the next ``check_external`` reports ``"replace"`` and adopts it.
        """
        if data and not data.endswith(b"\n"):
            raise ValueError("rewrite data must be empty or end with a newline")
        old = self._require_fd()
        new = replace_file(self.directory, self._name, data)
        self._fd = new
        self._identity = FileIdentity.of(os.fstat(new))
        os.close(old)

    # -- external changes -----------------------------------------------------------------

    def check_external(self) -> ExternalChangeKind | None:
        """Detect and adopt a change made by another writer since this object's last look.

        * path gone → recreated empty, ``"replace"``;
        * another dev/inode at the path → reopened, ``"replace"``;
        * same file, smaller → ``"truncate"``; larger → ``"append"``;
        * same size, other mtime/ctime → rewritten in place, ``"replace"``.

        The new state becomes the known identity; if it ends with a torn line, the tail is
        quarantined as in ``open``. Returns None when nothing changed. Same-size rewrites
        within one kernel timestamp tick cannot be told apart from no change.

        The directory is looked up again from the root first: if it was moved or replaced,
        the name is looked up in the directory now at its path (usually a ``"replace"``). A
        directory path that now crosses a symlink, a name that now is a symlink, a file with
        several hard links or not a regular file (or a quarantine name that is) raises
        ``PathNotAllowed``: the change is not adopted, so every later call refuses again, at
        once, until the path leads to a plain file inside the root again.
        """
        fd = self._require_fd()
        if self._cut_to is not None:
            self._cut_own_tail(fd)
        known = self.identity
        kind: ExternalChangeKind | None
        # The directory itself may have been moved (out of the root, say) or replaced: walk
        # down from the root again, so the name is looked up where the path leads now.
        self.directory.revalidate()
        st = self.directory.stat(self._name)
        if st is None or (st.st_dev, st.st_ino) != (known.dev, known.ino):
            kind = "replace"
            new, _ = self._open_or_create()
            os.close(fd)
            self._fd = new
            st = os.fstat(new)
        elif st.st_size < known.size:
            kind = "truncate"
        elif st.st_size > known.size:
            kind = "append"
        elif (st.st_mtime_ns, st.st_ctime_ns) != (known.mtime_ns, known.ctime_ns):
            kind = "replace"
        else:
            return None
        self._log.info(
            "external change to %s: %s (size %d -> %d, inode %d -> %d)",
            self.path,
            kind,
            known.size,
            st.st_size,
            known.ino,
            st.st_ino,
        )
        # Adopted only once repaired: a repair that fails leaves the change to be seen (and
        # refused) again by the next call, so nothing is ever appended to a torn line.
        if not self._repair_torn_tail():
            self._identity = FileIdentity.of(st)
        return kind

    # -- internals ------------------------------------------------------------------------

    def _require_fd(self) -> int:
        if self._fd is None:
            raise RuntimeError(f"transcript not open: {self.path}")
        return self._fd

    def _open_or_create(self, durable: bool = True) -> tuple[int, bool]:
        """Open the name read-write in append mode, creating it if needed; a durable create
        (``durable=False``: the directory is only told its fsync is due, ``fsync_later``).

        A symlink at the name (dangling or not) is refused at once (``PathNotAllowed``):
        ``O_EXCL`` sees it as existing and ``O_NOFOLLOW`` will not open it. A name that keeps
        being deleted between the two opens is given up after a few tries (``Unavailable``).
        """
        directory = self.directory
        base = os.O_RDWR | os.O_APPEND
        for _ in range(_OPEN_ATTEMPTS):
            try:
                fd = directory.open(self._name, base | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                try:
                    return directory.open(self._name, base), False
                except FileNotFoundError:
                    continue  # deleted between the two opens: create it after all
            if not durable:
                directory.fsync_later()
                return fd, True
            try:
                directory.fsync()
            except BaseException:
                os.close(fd)
                raise
            return fd, True
        raise Unavailable(
            f"{self.path} was deleted {_OPEN_ATTEMPTS} times between create and open",
            path=self.path,
        )

    def repair_torn_tail(self) -> int:
        """Quarantine a torn last line now (see ``open(repair=False)``); return its bytes."""
        torn = self._repair_torn_tail()
        self._identity = FileIdentity.of(os.fstat(self._require_fd()))
        return torn

    def _repair_torn_tail(self) -> int:
        """Quarantine the bytes after the last newline and truncate them; return their count."""
        fd = self._require_fd()
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return 0
        keep = self._last_line_end(fd, size)
        torn = size - keep
        quarantine = quarantine_path(self.path)
        directory = self.directory
        qfd = directory.open(
            quarantine_path(self._name), os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600
        )
        try:
            # A repair interrupted by a crash (after the quarantine write, before the truncate
            # below) is finished, not repeated: the same tear is never quarantined twice.
            offset = keep + _already_quarantined(qfd, fd, keep, size)
            while offset < size:
                chunk = os.pread(fd, min(_CHUNK, size - offset), offset)
                if not chunk:
                    break
                write_all(qfd, chunk)
                offset += len(chunk)
            if offset <= size:
                write_all(qfd, b"\n")
            os.fsync(qfd)
        finally:
            os.close(qfd)
        directory.fsync()
        os.ftruncate(fd, keep)
        os.fsync(fd)
        self._identity = FileIdentity.of(os.fstat(fd))
        self._log.warning(
            "torn last line in %s: moved %d bytes at offset %d to %s",
            self.path,
            torn,
            keep,
            quarantine,
        )
        return torn

    @staticmethod
    def _last_line_end(fd: int, size: int) -> int:
        """Offset just after the last ``\\n`` before ``size`` (0 when there is none)."""
        end = size
        while end > 0:
            start = max(0, end - _CHUNK)
            chunk = os.pread(fd, end - start, start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            end = start
        return 0

    def _cut_partial(self, start: int, expected_end: int) -> None:
        """After a failed append, drop our partial bytes if they are still the file's tail."""
        fd = self._require_fd()
        try:
            size = os.fstat(fd).st_size
            if start < size < expected_end:
                os.ftruncate(fd, start)
        except OSError as exc:  # the next check_external tries again (_after_failed_append)
            self._log.warning("could not cut a partial append from %s: %s", self.path, exc)

    def _after_failed_append(self, known: FileIdentity, start: int) -> None:
        """Our failed append is not somebody else's change: know the file as it is now.

        The cut restores the size but not the times, which ``check_external`` would report as
        a ``replace``; a cut that failed leaves our partial bytes for the next check to cut.
        """
        fd = self._require_fd()
        try:
            st = os.fstat(fd)
        except OSError:
            return
        if start != known.size or (st.st_dev, st.st_ino) != (known.dev, known.ino):
            return  # another writer appended meanwhile: the next check reports it
        if st.st_size == known.size:
            self._identity = FileIdentity.of(st)
        elif st.st_size > known.size:
            self._cut_to = (known.size, st.st_size)

    def _cut_own_tail(self, fd: int) -> None:
        """Cut the partial bytes a failed append left (raises while the cut still fails).

        Only while they are still the file's tail: if somebody wrote after them, the change
        is theirs to report (and the torn line is quarantined like any other).
        """
        assert self._cut_to is not None
        keep, end = self._cut_to
        if os.fstat(fd).st_size == end:
            os.ftruncate(fd, keep)
            self._identity = FileIdentity.of(os.fstat(fd))
        self._cut_to = None

    def _remove_leftover_temps(self) -> None:
        """Remove temp files that an interrupted ``rewrite`` of this path left behind."""
        for leftover in remove_leftover_temps(self.directory, self._name):
            self._log.info("removed leftover rewrite temp file %s", leftover)
