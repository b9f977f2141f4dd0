"""What ``serve`` does before it starts its actor system: the start line, the log file.

The start line (:func:`start_line`) names the version, the listen address, the roots and where
the settings came from; ``serve`` prints it and writes it as the first line of its log file
(:func:`prepare_log`), after removing stale log files of other addresses
(``sessionlane.system.ops.logs.prune_logs``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from sessionlane.system._version import __version__
from sessionlane.system.config import NON_CONFIG_ENV, Settings
from sessionlane.system.ops import logs
from sessionlane.system.ops.running import found_services

__all__ = ["prepare_log", "start_line"]

log = logging.getLogger(__name__)


def start_line(settings: Settings, config: str | None, env: Mapping[str, str] | None = None) -> str:
    """The one line ``serve`` starts with: version, listen address, roots, and where its
    settings came from (the config file and how it was named, the ``SESSIONLANE_*``
    variables), so that a log read later says what ran."""
    env = os.environ if env is None else env
    if config:
        source = f"config {config} (--config)"
    elif env.get("SESSIONLANE_CONFIG"):
        source = f"config {env['SESSIONLANE_CONFIG']} ($SESSIONLANE_CONFIG)"
    else:
        source = "no config file"
    variables = sorted(k for k in env if k.startswith("SESSIONLANE_") and k not in NON_CONFIG_ENV)
    if variables:
        source += ", environment " + " ".join(variables)
    return (
        f"sessionlane {__version__} starting (pid {os.getpid()}): listen {settings.listen},"
        f" roots {', '.join(settings.roots)}; {source}"
    )


def prepare_log(target: Path, started: str) -> Callable[[], None]:
    """Remove stale log files of other addresses, then write the start line to ours; returns
    what removes the file again if the start fails before anything else is logged."""
    from sessionlane.system.runtime.service import state_dir

    running = [f.state.get("log_file") for f in found_services(state_dir()) if f.live]
    keep = [target, *(Path(p) for p in running if p)]
    for path in logs.prune_logs(keep, time.time(), target.parent):
        log.info("removed the old log file %s", path)
    try:
        return logs.append_line(target, started)
    except OSError as exc:
        print(f"sessionlane: warning: cannot write to {target}: {exc}", file=sys.stderr)
        return lambda: None
