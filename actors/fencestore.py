"""Durable fence ceilings: fences strictly increase per path across every restart.

Block reservation: the SessionFile actor never writes a fence per grant. It durably reserves a
*ceiling* ahead of the fences it hands out, and a restarted actor starts above the last
ceiling, so a fence handed out before a crash can never be handed out again. The cost is one
durable write per block (normally one per actor activation); the price is a gap in fence
numbers after each restart, which nothing relies on.

The ceiling lives in a sidecar ``<dir>/.<basename>.fence`` holding one versioned JSON record,
``{"v": 1, "path": <transcript path>, "ceiling": N}``, replaced atomically on every reserve.
It is read and replaced only through the transcript's ``ConfinedDir``
(``sessionlane.actors.confined``): never through a symlink, and only while it is a regular file
with one hard link.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from sessionlane.actors.atomic_file import remove_leftover_temps, replace_file
from sessionlane.actors.confined import ConfinedDir, is_fd_exhaustion
from sessionlane.messages.errors import SessionLaneError

__all__ = [
    "DEFAULT_BLOCK",
    "FENCE_RECORD_VERSION",
    "CorruptFenceFile",
    "FenceRecord",
    "FenceStore",
    "encode_fence_record",
    "fence_path",
    "parse_fence_record",
]

_log = logging.getLogger(__name__)

FENCE_RECORD_VERSION = 1
DEFAULT_BLOCK = 1024
"""Fences reserved per durable write by ``FenceStore.next_fence``."""


class CorruptFenceFile(SessionLaneError):
    """A fence sidecar exists but cannot be trusted; ``path`` names the sidecar.

    Never reset to 0 silently: that could hand out a fence already used before. An operator
    who knows no old fence is in use may delete the sidecar.
    """

    code = "internal"


@dataclass(frozen=True, slots=True)
class FenceRecord:
    """The persisted content of a fence sidecar."""

    path: str
    """The canonical transcript path the ceiling belongs to."""
    ceiling: int
    """Highest fence that may have been handed out for that path (>= 0)."""


def fence_path(transcript_path: str) -> str:
    """The sidecar holding the fence ceiling of ``transcript_path``."""
    directory, base = os.path.split(transcript_path)
    return os.path.join(directory, f".{base}.fence")


def encode_fence_record(record: FenceRecord) -> bytes:
    """Encode ``record`` as the sidecar's bytes (one JSON object and a newline)."""
    payload = {"v": FENCE_RECORD_VERSION, "path": record.path, "ceiling": record.ceiling}
    return (json.dumps(payload, ensure_ascii=False) + "\n").encode("utf-8")


def parse_fence_record(data: bytes) -> FenceRecord:
    """Parse a sidecar's bytes; raise ``ValueError`` saying what is wrong with them."""
    try:
        payload = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ValueError("not a JSON object")
    version = payload.get("v")
    if version != FENCE_RECORD_VERSION or isinstance(version, bool):
        raise ValueError(f"unknown version {version!r} (expected {FENCE_RECORD_VERSION})")
    path, ceiling = payload.get("path"), payload.get("ceiling")
    if not isinstance(path, str):
        raise ValueError("'path' missing or not a string")
    if not isinstance(ceiling, int) or isinstance(ceiling, bool) or ceiling < 0:
        raise ValueError(f"'ceiling' missing or not a non-negative integer: {ceiling!r}")
    return FenceRecord(path=path, ceiling=ceiling)


class FenceStore:
    """The durable fence ceiling of one transcript path.

    Protocol for the actor: ``load()`` once per activation; hand out fences above the loaded
    value; before handing out a fence above ``ceiling``, ``reserve()`` a higher one.
    ``next_fence()`` does exactly that. Not thread-safe; one store per SessionFile actor.

    ``directory`` is the transcript's open directory (``Transcript.directory``), borrowed,
    never closed here. Without one, each ``load`` and ``reserve`` opens the transcript's
    parent directory for its own duration (tools and tests).
    """

    def __init__(self, transcript_path: str, directory: ConfinedDir | None = None) -> None:
        self.transcript_path = transcript_path
        self.path = fence_path(transcript_path)
        self._name = os.path.basename(self.path)
        self._directory = directory
        self._ceiling: int | None = None
        self._last_issued = 0

    @contextlib.contextmanager
    def _dir(self) -> Iterator[ConfinedDir]:
        if self._directory is not None:
            self._directory.revalidate()  # moved away or replaced: use what is at the path
            yield self._directory
            return
        directory, _ = ConfinedDir.open_parent(self.path)
        with directory:
            yield directory

    @property
    def ceiling(self) -> int:
        """The durably reserved ceiling (after ``load``)."""
        if self._ceiling is None:
            raise RuntimeError(f"fence store not loaded: {self.path}")
        return self._ceiling

    def load(self) -> int:
        """Read the ceiling from disk (0 when there is no sidecar) and return it.

        Raises ``CorruptFenceFile`` when the sidecar is unreadable, corrupt or of an unknown
        version, ``PathNotAllowed`` when it is a symlink, not a regular file or has several
        hard links. Fences issued by ``next_fence`` continue above the loaded ceiling. Temp
        files of a ``reserve`` that a crash interrupted are removed (the sidecar is intact: the
        rename never happened).
        """
        with self._dir() as directory:
            for leftover in remove_leftover_temps(directory, self._name):
                _log.info("removed leftover fence temp file %s", leftover)
            try:
                data = _read_all(directory, self._name)
            except FileNotFoundError:
                data = None
            except OSError as exc:
                if is_fd_exhaustion(exc):
                    raise  # not the file's fault: the caller refuses with too_many_files
                raise CorruptFenceFile(f"cannot read fence file: {exc}", path=self.path) from exc
        if data is None:
            ceiling = 0
        else:
            try:
                record = parse_fence_record(data)
            except ValueError as exc:
                raise CorruptFenceFile(f"corrupt fence file: {exc}", path=self.path) from None
            if record.path != self.transcript_path:
                # Moved or copied together with its transcript: the ceiling is still a valid
                # lower bound (a higher ceiling never breaks monotonicity), so keep it.
                _log.warning(
                    "fence file %s names %s, not %s; using its ceiling %d",
                    self.path,
                    record.path,
                    self.transcript_path,
                    record.ceiling,
                )
            ceiling = record.ceiling
        self._ceiling = ceiling
        self._last_issued = ceiling
        return ceiling

    def reserve(self, ceiling: int) -> None:
        """Durably raise the ceiling to ``ceiling`` (temp file, fsync, rename, fsync dir).

        Refuses (``ValueError``) to go below the current ceiling; the same value is a no-op.
        """
        current = self.ceiling
        if ceiling < current:
            raise ValueError(
                f"refusing to move the fence ceiling of {self.transcript_path} backwards "
                f"({current} -> {ceiling})"
            )
        if ceiling == current:
            return
        data = encode_fence_record(FenceRecord(path=self.transcript_path, ceiling=ceiling))
        with self._dir() as directory:
            os.close(replace_file(directory, self._name, data))
        self._ceiling = ceiling

    def next_fence(self, block: int = DEFAULT_BLOCK) -> int:
        """Return a fence above every fence ever issued for this path, reserving as needed.

        Reserves ``fence + block - 1`` when the fence would exceed the ceiling, so at most one
        durable write happens per ``block`` fences.
        """
        if block < 1:
            raise ValueError(f"block must be at least 1, not {block}")
        fence = self._last_issued + 1
        if fence > self.ceiling:
            self.reserve(fence + block - 1)
        self._last_issued = fence
        return fence


def _read_all(directory: ConfinedDir, name: str) -> bytes:
    fd = directory.open(name, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
