"""Where a service logs, and how: one rotated file per service identity, or stderr.

The actors log through thespian's logger process (every actor forwards its records there), so
the handler is described in ``logDefs`` (:func:`sessionlane.system.runtime.launch.log_config`) and
lives in that process, the only writer of the file.

Where (:func:`log_target`):

* ``--log-file FILE``: that file;
* ``--log-file -``, or running under systemd (``$JOURNAL_STREAM`` or ``$INVOCATION_ID`` set):
  stderr, for the journal or the container runtime to collect;
* otherwise ``<log_dir()>/serve-<listen address>.log``: the same file for every start of the
  service on that address, rotated at :data:`MAX_BYTES` with :data:`BACKUPS` old files.

:func:`log_dir` is ``$XDG_STATE_HOME/sessionlane`` (default ``~/.local/state/sessionlane``),
created private (0700). A file is opened at its first line only: a start that fails before
logging anything leaves nothing behind.

Pruning (:func:`stale_logs`, run by ``serve`` at start): every ad-hoc address leaves a file of
its own, so in the log directory the files of other addresses beyond the :data:`KEEP_LOGS`
most recent, or older than :data:`KEEP_DAYS` days, are removed with their rotations; never the
starting service's own, nor one a running service names in its state file.

Levels (:class:`LevelFilter`): sessionlane's own loggers at the configured ``log_level``,
everything else (thespian's) at WARNING. The filter sits on the handler because the logger
process hands each forwarded record straight to its logger's handlers, skipping the loggers'
levels; the actors forward everything down to the lowest level named in ``logDefs``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import logging.handlers
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

__all__ = [
    "BACKUPS",
    "FILE_MODE",
    "KEEP_DAYS",
    "KEEP_LOGS",
    "MAX_BYTES",
    "STDERR",
    "LevelFilter",
    "PrivateRotatingFileHandler",
    "append_line",
    "filter_config",
    "handler_config",
    "log_dir",
    "log_file_for",
    "log_target",
    "open_private",
    "prune_logs",
    "stale_logs",
    "under_service_manager",
]

STDERR: Final = "-"
"""The ``--log-file`` value (and :func:`log_target` result) that means stderr."""
MAX_BYTES: Final = 10 * 1024 * 1024
"""A log file is rotated when a line would take it past this size."""
BACKUPS: Final = 3
"""Rotated files kept beside the current one (``.1`` newest ... ``.3`` oldest)."""
FILE_MODE: Final = 0o600
"""Every log file, and every rotated one, is the owner's only: logs name paths and peers."""

KEEP_LOGS: Final = 20
"""Log files of other addresses kept in the log directory (the most recently written)."""
KEEP_DAYS: Final = 30
"""A log file of another address not written for this many days is removed at start."""

_OWN_PACKAGES: Final = ("sessionlane",)
_SLUG_MAX = 80


def log_dir(env: Mapping[str, str] | None = None) -> Path:
    """The per-user state directory for logs, created 0700 if missing."""
    env = os.environ if env is None else env
    base = env.get("XDG_STATE_HOME") or ""
    # The XDG spec says a relative value is invalid and must be ignored.
    root = Path(base) if os.path.isabs(base) else Path.home() / ".local" / "state"
    path = root / "sessionlane"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def log_file_for(listen: str, env: Mapping[str, str] | None = None) -> Path:
    """The default log file of the service listening on ``listen``: stable across starts."""
    return log_dir(env) / f"serve-{_slug(listen)}.log"


def under_service_manager(env: Mapping[str, str] | None = None) -> bool:
    """Whether systemd runs us: its journal collects stderr, so a file would be a second copy."""
    env = os.environ if env is None else env
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


def log_target(
    log_file: str | Path | None, listen: str, env: Mapping[str, str] | None = None
) -> Path | None:
    """Where to log: a file path, or ``None`` for stderr (see the module docstring)."""
    if log_file is not None and str(log_file) == STDERR:
        return None
    if log_file:
        return Path(log_file)
    if under_service_manager(env):
        return None
    return log_file_for(listen, env)


def handler_config(target: Path | None, level: str) -> dict[str, Any]:
    """The ``logDefs`` handler for ``target`` (``None``: stderr), with the ``levels`` filter."""
    common: dict[str, Any] = {"formatter": "plain", "filters": ["levels"]}
    if target is None:
        return {**common, "class": "logging.StreamHandler", "stream": "ext://sys.stderr"}
    return {
        **common,
        "()": f"{__name__}.PrivateRotatingFileHandler",
        "filename": str(target),
        "maxBytes": MAX_BYTES,
        "backupCount": BACKUPS,
        "encoding": "utf-8",
        "delay": True,
    }


def open_private(path: str | os.PathLike[str], mode: str = "a", **kwargs: Any) -> Any:
    """``open(path, mode)`` for appending to a log: created 0600, and made 0600 if it was not."""
    if mode not in ("a", "at", "ab"):
        return open(path, mode, **kwargs)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o777 != FILE_MODE:
            os.fchmod(fd, FILE_MODE)  # an older file, from before logs were private
        return os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """``RotatingFileHandler`` whose files, the current one and each started at a rotation, are
    created 0600 (the rotated ones keep that mode: a rename does not change it)."""

    def _open(self) -> Any:
        return open_private(
            self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors
        )


def filter_config(level: str) -> dict[str, Any]:
    """The ``logDefs`` entry of the :class:`LevelFilter` at ``level``."""
    return {"()": f"{__name__}.LevelFilter", "level": level.upper()}


class LevelFilter(logging.Filter):
    """Pass sessionlane's records at ``level`` and above, everyone else's at WARNING and above."""

    def __init__(self, level: str = "INFO") -> None:
        super().__init__()
        self.own = logging.getLevelName(level.upper())
        if not isinstance(self.own, int):
            raise ValueError(f"unknown log level {level!r}")

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name.split(".", 1)[0] in _OWN_PACKAGES
        return record.levelno >= (self.own if own else logging.WARNING)


def stale_logs(
    files: Mapping[Path, float],
    keep: Iterable[Path],
    now: float,
    *,
    keep_logs: int = KEEP_LOGS,
    keep_days: float = KEEP_DAYS,
) -> list[Path]:
    """Which of ``files`` (``serve-*.log`` and their rotations ``.1``..., with their mtimes) to
    remove: every file of a log beyond the ``keep_logs`` most recently written logs, or whose
    newest file is older than ``keep_days``. The logs in ``keep`` (the starting service's,
    the running services') stay, and do not count against ``keep_logs``. Pure."""
    kept = {Path(p) for p in keep}
    logs: dict[Path, list[Path]] = {}
    for path in files:
        base = path.with_suffix("") if path.suffix[1:].isdigit() else path
        logs.setdefault(base, []).append(path)
    newest = {base: max(files[p] for p in members) for base, members in logs.items()}
    others = sorted((b for b in logs if b not in kept), key=lambda b: newest[b], reverse=True)
    horizon = now - keep_days * 86400.0
    stale = [b for i, b in enumerate(others) if i >= keep_logs or newest[b] < horizon]
    return sorted(p for base in stale for p in logs[base])


def prune_logs(keep: Iterable[Path], now: float, directory: Path | None = None) -> list[Path]:
    """Remove the stale log files (:func:`stale_logs`) of ``directory`` (default
    :func:`log_dir`); the files removed. A file that vanished or cannot be removed is skipped."""
    directory = log_dir() if directory is None else directory
    files: dict[Path, float] = {}
    for path in directory.glob("serve-*.log*"):
        if _LOG_NAME.fullmatch(path.name):
            with contextlib.suppress(OSError):
                files[path] = path.lstat().st_mtime
    removed = []
    for path in stale_logs(files, keep, now):
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


def append_line(target: Path, line: str) -> Callable[[], None]:
    """Append one line to the log file ``target`` (:func:`open_private`: the owner's only),
    formatted as the actors' lines are; the logger process appends to the same file.

    Returns ``forget``: if this call created the file and nothing was written after the line,
    ``forget()`` removes it again (a start that fails before logging leaves no file behind).
    """
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    text = f"{stamp},{int(time.time() * 1000) % 1000:03d} p{os.getpid()} INFO sessionlane: {line}\n"
    data = text.encode()
    created = not target.exists()
    with open_private(target, "ab") as fh:
        fh.write(data)

    def forget() -> None:
        with contextlib.suppress(OSError):
            if created and target.stat().st_size == len(data):
                target.unlink()

    return forget


_LOG_NAME = re.compile(r"serve-.+\.log(\.[0-9]+)?")


def _slug(listen: str) -> str:
    """A file-name-safe rendering of a listen address (``tcp-127.0.0.1-7420``)."""
    text = re.sub(r"[^A-Za-z0-9.]+", "-", listen.replace("://", "-")).strip("-")
    if len(text) > _SLUG_MAX:
        digest = hashlib.sha256(listen.encode()).hexdigest()[:12]
        text = f"{text[: _SLUG_MAX - 13]}-{digest}"
    return text or "default"
