"""Ownership follows the path: the check a SessionFile makes before it grants or writes.

A SessionFile owns its file by an ``flock`` on the owner sidecar (``sessionlane.actors.ownership``).
A directory restored from a backup (``mv d d.old; mkdir d; cp d.old/z.jsonl d/``) or a deleted
sidecar leaves that lock on a file that is no longer the sidecar at the transcript's path, and
another service would take the one that is: two owners, both granting. So before every request
that may grant or write, ``keep_ownership`` walks the directory down from the root again and
compares the sidecar at the path with the locked one (device and inode):

* the same: go on;
* another, or none: take the lock there (creating the sidecar), read that directory's fence
  store under it, and carry the fences both ways (later grants go above it; a holder not above
  it is revoked ``ownership_lost``; our ceiling is written there);
* held by another process, or refused (a symlink planted in its place): the file is lost,
  ``OwnerCheck.lost`` says why, and the actor stops serving it;
* the directory moved again meanwhile: look again, a few times, then refuse the request at hand.

The check is I/O (a walk, an ``fstatat``, rarely a lock and a fence read); the lease table's
part is pure (``LeaseTable.raise_floor``). docs/security-files.md has the cost.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from sessionlane.actors.confined import ConfinedDir, failure_code, failure_detail
from sessionlane.actors.fencestore import FenceStore
from sessionlane.actors.lease_table import Effect, LeaseTable
from sessionlane.actors.ownership import OwnedElsewhere, Ownership
from sessionlane.messages.errors import ErrorCode, PathNotAllowed, SessionLaneError

__all__ = ["FOLLOW_ATTEMPTS", "OwnerCheck", "Refusal", "keep_ownership"]

log = logging.getLogger(__name__)

FOLLOW_ATTEMPTS = 3
"""Times the lock is moved to the path in one check before the request is refused."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """An error to answer with: the file lost, or the request at hand refused."""

    code: ErrorCode
    detail: str


@dataclass(slots=True)
class OwnerCheck:
    """What ``keep_ownership`` found: the lock now held, effects to perform, or why to stop."""

    ownership: Ownership
    """The lock held after the check (a new one if it was taken at the path)."""
    effects: list[Effect] = field(default_factory=list)
    """The lease table's effects of taking the lock at the path (a holder revoked...)."""
    lost: Refusal | None = None
    """The file is served by another process now (or cannot be owned): stop serving it."""
    refused: Refusal | None = None
    """The path kept changing: refuse the request at hand with this error (and go on)."""


def keep_ownership(
    path: str,
    directory: ConfinedDir,
    ownership: Ownership,
    fences: FenceStore,
    table: LeaseTable,
    now: float,
) -> OwnerCheck:
    """Make sure the owner lock at ``path`` is the one held (see the module docstring).

    ``directory`` is the transcript's (shared with the transcript and ``fences``): it is
    walked again here, and switched to the directory now at the path. A path that does not
    lead to a directory is left to the write it precedes (refused ``path_not_allowed``).
    """
    check = OwnerCheck(ownership)
    for _ in range(FOLLOW_ATTEMPTS):
        try:
            directory.revalidate()
        except (PathNotAllowed, OSError):
            return check
        if check.ownership.still_at(directory):
            return check
        try:
            check.ownership = check.ownership.follow(path, directory, now=time.time())
            log.warning(
                "the owner sidecar of %s was replaced (directory restored or sidecar "
                "deleted): ownership taken at the path",
                path,
            )
            floor = fences.load()  # read under the lock just taken
            check.effects += table.raise_floor(floor, now)
            if table.fence_ceiling > fences.ceiling:
                fences.reserve(table.fence_ceiling)
            return check
        except OwnedElsewhere as exc:
            moved = "the file's ownership moved (its directory or owner sidecar was replaced)"
            check.lost = Refusal("unavailable", f"{moved}; {exc.detail}")
            return check
        except PathNotAllowed as exc:
            if _moved_again(directory):
                continue  # look at the path again
            # A sidecar at the path is refused (a symlink...): nobody can own the file there.
            check.lost = Refusal(exc.code, f"cannot own the file at its path: {exc.detail}")
            return check
        except (SessionLaneError, OSError) as exc:
            detail = f"cannot take the file's ownership at its path: {failure_detail(exc)}"
            check.lost = Refusal(failure_code(exc), detail)
            return check
    check.refused = Refusal(
        "path_not_allowed",
        f"{directory.path} keeps being moved or replaced; nothing was done, try again",
    )
    return check


def _moved_again(directory: ConfinedDir) -> bool:
    """Did the directory change (or vanish) since the last walk? Switches to it."""
    try:
        return directory.revalidate()
    except (PathNotAllowed, OSError):
        return True
