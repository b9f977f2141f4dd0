"""Whole-file replacement that a crash cannot tear, in a confined directory.

``replace_file`` writes a uniquely named temp file beside the target, fsyncs it, renames it
over the target and fsyncs the directory: readers see the old content or the new one, never a
mix. A crash before the rename leaves a temp file (``.<name>.<12 hex>.tmp``) that only the
target's owner may remove (``remove_leftover_temps``; ``leftover_temps`` lists them). Used
for transcript compaction (``sessionlane.actors.transcript``) and fence sidecars
(``sessionlane.actors.fencestore``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable

from sessionlane.actors.confined import ConfinedDir

__all__ = ["leftover_temps", "remove_leftover_temps", "replace_file", "write_all"]

_TEMP_SUFFIX = ".tmp"


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data``, continuing after short writes."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def replace_file(directory: ConfinedDir, name: str, data: bytes, *, mode: int = 0o600) -> int:
    """Atomically replace entry ``name`` of ``directory`` with ``data``; return an fd
    (O_RDWR|O_APPEND) on the new file.

    Writes a uniquely named temp file in the same directory, fsyncs it, renames it over
    ``name`` and fsyncs the directory. A crash at any point leaves the old or the new content,
    never a mix. Nothing is followed: a symlink at ``name`` is replaced, not written through.
    On failure the temp file is removed, the fd closed and ``name`` is untouched unless the
    rename already happened (then only the directory fsync failed). The caller owns the fd.
    """
    temp = f".{name}.{secrets.token_hex(6)}{_TEMP_SUFFIX}"
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL
    fd = directory.open(temp, flags, mode)
    renamed = False
    try:
        write_all(fd, data)
        os.fsync(fd)
        directory.rename(temp, name)
        renamed = True
        directory.fsync()
    except BaseException:
        os.close(fd)
        if not renamed:
            directory.unlink(temp)
        raise
    return fd


_HEX = frozenset("0123456789abcdef")


def _is_temp_of(name: str, head: str) -> bool:
    """Whether ``name`` is ``head`` (``.<base>.``), 12 hex digits, the suffix: a temp file
    ``replace_file`` made for ``base``. (Not a regular expression: one compiled per file name
    would cost each file's activation about a millisecond, as its path is in the pattern.)"""
    if not (name.startswith(head) and name.endswith(_TEMP_SUFFIX)):
        return False
    digits = name[len(head) : len(name) - len(_TEMP_SUFFIX)]
    return len(digits) == 12 and _HEX.issuperset(digits)


def _temps_among(names: Iterable[str], base: str) -> list[str]:
    """The names among ``names`` that are temp files of ``base``. Every activation lists its
    directory twice (the transcript's temps, the fence file's), and a directory holds every
    transcript of its root: the prefix is built once and tested first, so the cost per entry
    is one string comparison (1,500 entries, 500 files' worth: 56 us a listing, against 137 us
    with the prefix built per entry; ``docs/activation.md``)."""
    head = f".{base}."
    return [n for n in names if n.startswith(head) and _is_temp_of(n, head)]


def leftover_temps(path: str) -> list[str]:
    """Temp files of an interrupted ``replace_file`` of ``path`` (a crash before its rename)."""
    directory, base = os.path.dirname(path) or ".", os.path.basename(path)
    with os.scandir(directory) as entries:
        paths = {entry.name: entry.path for entry in entries if entry.name.startswith(".")}
    return [paths[name] for name in _temps_among(paths, base)]


def remove_leftover_temps(directory: ConfinedDir, name: str) -> list[str]:
    """Remove the leftover temp files of entry ``name``; return their paths.

    Only for the one process that owns ``name`` (a temp file is never in use by anybody else
    once its writer is gone, and the owner is the only writer). A symlink with a temp file's
    name is removed as a link; nothing is followed.
    """
    removed = []
    for entry in _temps_among(directory.names(), name):
        if directory.unlink(entry):
            removed.append(directory.path_of(entry))
    return removed
