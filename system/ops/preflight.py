"""What ``serve`` checks before it starts: can this process read its secrets and write its
roots? Each problem is said with the owner and mode found and the command that fixes it.

Without these checks the failures came late and bare: a token file mounted into a container
(owned by the host's user, mode 0600) failed as "cannot read ...: Permission denied" with
nothing saying the container runs as another uid, and a data volume the service cannot write
failed at the first transcript a client opened. The checks use the effective uid and groups
(``os.access(..., effective_ids=True)``): what the service process itself may do.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from sessionlane.system.config import Settings
from sessionlane.system.config_syntax import access_advice

__all__ = ["Problem", "check_paths", "check_settings"]


@dataclass(frozen=True)
class Problem:
    """One path this process cannot use as it must."""

    key: str
    """The setting that names it (``token_file``, ``cluster_key_file``, ``roots``)."""
    path: str
    message: str
    """What is wrong and what to change."""


def check_settings(settings: Settings) -> list[Problem]:
    """The problems of ``settings``' files and roots for this process (empty: none)."""
    secrets = [("token_file", settings.token_file), ("cluster_key_file", settings.cluster_key_file)]
    return check_paths([(key, path) for key, path in secrets if path], settings.roots)


def check_paths(secrets: Iterable[tuple[str, str]], roots: Iterable[str]) -> list[Problem]:
    """Secrets must be readable, roots writable and searchable, by this process."""
    problems = []
    for key, path in secrets:
        if os.path.exists(path) and not os.access(path, os.R_OK, effective_ids=True):
            problems.append(Problem(key, path, access_advice(f"cannot read {path}", path)))
    for root in roots:
        if not os.access(root, os.W_OK | os.X_OK, effective_ids=True):
            what = f"cannot write the root {root}"
            problems.append(Problem("roots", root, access_advice(what, root, recursive=True)))
    return problems
