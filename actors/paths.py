"""Canonical transcript paths: one name per file, always inside a configured root.

A SessionFile actor is keyed by the canonical path, so two spellings of one file (a symlinked
directory, a relative path, ``a/../b``) must give the same key, and no spelling may reach a
file outside the roots. Every check is made *after* resolution, which is what defeats ``..``
and symlink escapes. Nothing here creates, opens or modifies anything.

The checks are a snapshot: a path can change after it was canonicalised (a symlink swapped
in). This module decides admission; the SessionFile then reaches the file from its root
without following symlinks for the file's whole life (``sessionlane.actors.confined``).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence

from sessionlane.actors.confined import check_regular, containing_root, file_kind
from sessionlane.messages.errors import PathNotAllowed

__all__ = [
    "MAX_FILE_NAME",
    "MAX_PATH_CHARS",
    "NAME_MAX",
    "canonicalize",
    "lease_route",
    "root_of",
    "route_of_lease",
]

MAX_PATH_CHARS = 4096
"""Longest raw path accepted (Linux PATH_MAX)."""
NAME_MAX = 255
"""Longest component accepted, in bytes of the file system encoding (Linux NAME_MAX)."""
SIDECAR_OVERHEAD = 25
"""Bytes the longest name sessionlane keeps beside a transcript adds to the transcript's name:
a fence reservation's temp file, ``..<name>.fence.<12 hex>.tmp`` (the owner lock
``.<name>.owner`` adds 7, a rewrite's temp file 18, ``.torn`` and ``.lock`` 5)."""
MAX_FILE_NAME = NAME_MAX - SIDECAR_OVERHEAD
"""Longest transcript file name accepted, in bytes: its sidecars must fit in NAME_MAX too."""


def canonicalize(raw: str, roots: Sequence[str], suffixes: Sequence[str] = (".jsonl",)) -> str:
    """The canonical path of transcript ``raw``, or :class:`PathNotAllowed` (``path=raw``).

    * ``raw`` must be a non-empty string of at most :data:`MAX_PATH_CHARS` characters with no
      NUL byte and no component longer than :data:`NAME_MAX` bytes (such a name could never
      be opened); a relative path is taken relative to ``roots[0]``.
    * An existing path resolves to its ``realpath`` and must then be a regular file with one
      hard link; directories, FIFOs, sockets, devices, dangling (or looping) symlinks and
      files with several hard links are refused.
    * A path that does not exist yet resolves to ``realpath(parent) + basename``; the parent
      must be an existing directory.
    * The result must lie inside one of ``roots`` (themselves compared by realpath) and its
      basename must end with one of ``suffixes``.
    """
    if not isinstance(raw, str):
        raise PathNotAllowed(f"a path must be a string, not {type(raw).__name__}", path=None)
    if not raw:
        raise PathNotAllowed("empty path", path=raw)
    if "\x00" in raw:
        raise PathNotAllowed("path contains a NUL byte", path=raw)
    if len(raw) > MAX_PATH_CHARS:
        raise PathNotAllowed(f"path longer than {MAX_PATH_CHARS} characters", path=raw)
    try:
        longest = max(len(os.fsencode(part)) for part in raw.split("/"))
    except UnicodeEncodeError:
        raise PathNotAllowed("path is not encodable as a file name", path=raw) from None
    if longest > NAME_MAX:
        raise PathNotAllowed(
            f"a path component is {longest} bytes long, over NAME_MAX ({NAME_MAX} bytes)",
            path=raw,
        )
    name_bytes = len(os.fsencode(os.path.basename(raw)))
    if name_bytes > MAX_FILE_NAME:
        raise PathNotAllowed(
            f"the file name is {name_bytes} bytes long; at most {MAX_FILE_NAME} are allowed, so"
            f" that the files kept beside it (its owner lock and fence) fit in NAME_MAX",
            path=raw,
        )
    real_roots = _real_roots(roots, raw)

    path = raw if os.path.isabs(raw) else os.path.join(real_roots[0], raw)
    canonical = _resolve(path, raw)
    if containing_root(canonical, real_roots) is None:
        raise PathNotAllowed("path resolves outside the configured roots", path=raw)
    if not any(os.path.basename(canonical).endswith(suffix) for suffix in suffixes):
        raise PathNotAllowed(
            f"file name must end with {' or '.join(suffixes) or '(no suffix allowed)'}",
            path=raw,
        )
    return canonical


def root_of(canonical: str, roots: Sequence[str]) -> str:
    """The (realpath'd) root that contains ``canonical``; the innermost if roots nest.

    Raises :class:`PathNotAllowed` if no root contains it.
    """
    if not roots:
        raise PathNotAllowed("no roots are configured", path=canonical)
    root = containing_root(canonical, roots)
    if root is None:
        raise PathNotAllowed("path lies outside the configured roots", path=canonical)
    return root


def _real_roots(roots: Sequence[str], raw: str) -> list[str]:
    if not roots:
        raise PathNotAllowed("no roots are configured", path=raw)
    return [os.path.realpath(root) for root in roots]


def _resolve(path: str, raw: str) -> str:
    if os.path.lexists(path):
        # lexists but not exists: a symlink whose target is missing (or a loop). Refused:
        # creating "it" would create the target, wherever the link points.
        if not os.path.exists(path):
            raise PathNotAllowed("dangling symlink", path=raw)
        canonical = os.path.realpath(path)
        try:
            st = os.stat(canonical)
        except OSError as exc:
            raise PathNotAllowed(f"cannot stat: {exc.strerror}", path=raw) from None
        if not stat.S_ISREG(st.st_mode):
            raise PathNotAllowed(f"not a regular file ({file_kind(st.st_mode)})", path=raw)
        check_regular(st, canonical)  # one hard link only
        return canonical

    parent, name = os.path.split(path)
    if name in ("", ".", ".."):
        raise PathNotAllowed("path does not name a file", path=raw)
    real_parent = os.path.realpath(parent or ".")
    if not os.path.isdir(real_parent):
        raise PathNotAllowed("parent directory does not exist", path=raw)
    return os.path.join(real_parent, name)


LEASE_ROUTE_CHARS = 16
"""Hex digits of a path's lease route (64 bits: a collision between two files one gateway
uses is detected there and refused, never misrouted; see ``sessionlane.actors.links``)."""


def lease_route(canonical: str) -> str:
    """The route a lease id names: a digest of the canonical path of the file that granted it.

    Lease ids are ``<route>-<fence>`` (``sessionlane.actors.lease_table``), so a request naming
    only a lease carries what routes it: no router keeps a map of who holds what.
    """
    return hashlib.sha256(canonical.encode()).hexdigest()[:LEASE_ROUTE_CHARS]


def route_of_lease(lease: str) -> str | None:
    """The route named by ``lease``, or None when it is not a lease id of ours."""
    route, sep, fence = lease.rpartition("-")
    if not sep or len(route) != LEASE_ROUTE_CHARS or not fence.isdigit():
        return None
    return route
