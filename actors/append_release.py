"""Appends that release their lease (``Append.release``, "append and release"). Pure.

A turn's last append may carry its release: once its records are written and durable, one
level of its lease is released exactly as a ``Release`` would release it, and the next waiter
granted, in the same turn of the file (the grant is written first). ``ReleasingAppends`` is the
part of the write path (``sessionlane.actors.session_file_writes.WritePath``) that keeps what
is between an append's write and its release:

- an ``fsync`` append's release waits, by the append's call key, for the sync that makes it
  durable (``hold``); the core asks for the releases of the acks a successful sync delivers
  (``synced``), before it sends those acks; a failed sync (or a refused or failed write)
  ``forget``s it, and the lease stays held;
- a ``flush`` append's release is performed right after its write, before its answer;
- each release is a ``ReleaseWriteLease`` of a key of its own, which nobody answers
  (``silent``): the append's ``appended`` (``released: true``) is the answer;
- while releases are held, a write under the same lease is refused if they release its last
  level (``refusal``): it is as good as released;
- an append resent (by its ``aid``) while its release waits for the sync must not release
  twice (``waiting``).

Invariants (checked by ``tests/test_file_core_model.py``): a release is performed only after
the append it rides on is durable, at most once, and never for an append whose write or sync
failed.
"""

from __future__ import annotations

from typing import Any

from sessionlane.actors.lease_types import Holder
from sessionlane.actors.session_file_write_effects import ReleaseWriteLease, Verdict
from sessionlane.messages.wire import Appended

__all__ = ["ReleasingAppends"]


class ReleasingAppends:
    """The releases of appends that carry one, from their write to their release."""

    def __init__(self) -> None:
        self.held: dict[Any, ReleaseWriteLease] = {}
        """By the append's call key: the release to perform once its sync succeeds."""
        self.keys: set[Any] = set()
        """The request keys of the releases not yet answered by the table (``silent``)."""
        self.ids = 0

    def __bool__(self) -> bool:
        return bool(self.held)

    def release(self, lane: Any, lease: str, aid: str | None, reply: Appended) -> ReleaseWriteLease:
        """The release of one level of ``lease`` that the append ``aid`` (answered ``reply``)
        carries: performed by the core on the lease table, answered by nobody."""
        self.ids += 1
        key = ("released-by-append", self.ids)
        self.keys.add(key)
        return ReleaseWriteLease(key, lane, lease, aid, reply)

    def hold(self, call_key: Any, release: ReleaseWriteLease) -> None:
        """Perform ``release`` once the ack of the append ``call_key`` leaves after a sync."""
        self.held[call_key] = release

    def synced(self, keys: list[Any]) -> list[ReleaseWriteLease]:
        """The acks of ``keys`` leave after a successful sync: the releases they carry."""
        if not self.held:
            return []
        return [r for key in keys if (r := self.held.pop(key, None)) is not None]

    def forget(self, call_key: Any) -> None:
        """The append ``call_key`` failed after its write (its sync): it releases nothing."""
        dropped = self.held.pop(call_key, None)
        if dropped is not None:
            self.keys.discard(dropped.req)  # never performed: nobody will answer it

    def silent(self, req: Any) -> bool:
        """Is ``req`` the key of one of these releases (answered by nobody)? Forgets it."""
        if req in self.keys:
            self.keys.discard(req)
            return True
        return False

    def waiting(self, lease: str, aid: str | None) -> bool:
        """Does the release of the append ``aid`` of ``lease`` wait for its sync?"""
        return any(r.lease == lease and r.aid == aid for r in self.held.values())

    def refusal(self, holder: Holder | None, lease: str) -> Verdict:
        """A write under ``lease`` while appends written before it wait to release it: refused
        (``stale_fence``) if they release its last level, else None."""
        if not self.held or holder is None or holder.lease != lease:
            return None
        pending = sum(1 for r in self.held.values() if r.lease == lease)
        if pending == 0 or len(holder.purposes) > pending:
            return None
        return ("stale_fence", f"lease {lease} is released by an append before this write")
