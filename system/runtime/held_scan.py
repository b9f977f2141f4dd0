"""At a start with a reclaim grace: which transcripts under the roots had a holder (issue 21).

A file whose lease record (``.<name>.lease``, ``sessionlane.actors.lease_record_file``) names
a holder is activated by the Registry as soon as the service is configured, so its SessionFile
awaits that holder at once: ``status`` lists it in grace, and the grace's end is enforced by its
actor even if nobody asks for the file. Without this, such a file would appear only once a
request started its actor.

The walk runs in the service's own process before the gateway takes requests, never in an
actor handler. It follows no symlink (neither directories nor sidecars), reads at most
``RECORD_READ`` bytes of each sidecar, and is bounded: at most ``limit`` holders, at most
``max_entries`` directory entries, at most ``budget_s`` seconds. What it misses behaves as
before: the file's first request activates it, and it awaits its holder if the grace lasts.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sessionlane.actors.reclaim import parse_record

__all__ = ["HeldScan", "scan_held"]

log = logging.getLogger(__name__)

SUFFIX = ".lease"
RECORD_READ = 2 * 4096
MAX_ENTRIES = 200_000
BUDGET_S = 2.0


@dataclass
class HeldScan:
    """What the walk found: transcripts whose record names a holder, and whether it stopped
    early (``truncated`` says why)."""

    paths: list[str] = field(default_factory=list)
    entries: int = 0
    truncated: str | None = None


def transcript_of(directory: str, sidecar: str) -> str | None:
    """The transcript a ``.<name>.lease`` sidecar belongs to, or None if it is not one."""
    if not (sidecar.startswith(".") and sidecar.endswith(SUFFIX)):
        return None
    name = sidecar[1 : -len(SUFFIX)]
    return os.path.join(directory, name) if name else None


def has_holder(path: str) -> bool:
    """Whether the sidecar at ``path`` (a regular file, never through a symlink) names a
    holder. Unreadable or malformed: False (its SessionFile says why when it activates)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        data = os.pread(fd, RECORD_READ, 0)
    except OSError:
        return False
    finally:
        os.close(fd)
    try:
        return parse_record(data).held is not None
    except ValueError:
        return False


def scan_held(
    roots: list[str],
    limit: int,
    *,
    max_entries: int = MAX_ENTRIES,
    budget_s: float = BUDGET_S,
    clock: Callable[[], float] = time.monotonic,
) -> HeldScan:
    """Transcripts under ``roots`` whose lease record names a holder, at most ``limit``."""
    now = clock
    deadline = now() + budget_s
    found = HeldScan()
    stack = list(roots)
    seen: set[str] = set()
    while stack:
        directory = stack.pop()
        if directory in seen:
            continue
        seen.add(directory)
        try:
            with os.scandir(directory) as it:
                for entry in it:
                    found.entries += 1
                    if found.entries > max_entries:
                        found.truncated = f"more than {max_entries} entries under the roots"
                    elif now() > deadline:
                        found.truncated = f"the walk took more than {budget_s:.1f} s"
                    if found.truncated:
                        break
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                        continue
                    transcript = transcript_of(directory, entry.name)
                    if transcript is None or not entry.is_file(follow_symlinks=False):
                        continue
                    if has_holder(entry.path):
                        found.paths.append(transcript)
                        if len(found.paths) >= limit:
                            found.truncated = f"{limit} files with a holder (max_files)"
                            break
        except OSError as exc:
            log.debug("not scanning %s for lease records: %s", directory, exc)
        if found.truncated:
            break
    found.paths.sort()
    return found
