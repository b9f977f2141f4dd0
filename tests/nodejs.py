"""The Node.js package (``clients/node``) for the tests that run it, and how they run it.

``built_node`` gives ``node`` with the package built from the sources under test, or skips the
test with the reason when ``node``, ``npm`` or the package's dependencies (``npm ci`` in
``clients/node``, as ``.ci/run`` does) are missing. ``run_in_session`` runs one process in a
session of its own and kills its whole process group when it returns, so no ``node`` (or what
``npm`` started) outlives the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest

__all__ = ["NODE_DIR", "built_node", "run_in_session"]

NODE_DIR = Path(__file__).resolve().parent.parent / "clients" / "node"
"""The package's directory in the repository."""

_NEEDED = ("@msgpack/msgpack", "typescript", "@types/node")
_BUILD_TIMEOUT_S = 300.0


def built_node(needed_by: str) -> str:
    """The ``node`` executable, once ``npm run build`` has built the package from the sources
    under test (no network). Skips, naming ``needed_by``, without node and npm; skips without
    the package's dependencies; fails the test if the build fails."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip(f"node and npm are needed for {needed_by}")
    for needed in _NEEDED:
        if not (NODE_DIR / "node_modules" / needed).is_dir():
            pytest.skip(f"{needed} is not installed: run `npm ci` in {NODE_DIR}")
    # `npm ci` built the package too, maybe long ago: build what is being tested.
    build = subprocess.run(
        [npm, "run", "build"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=_BUILD_TIMEOUT_S,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    return node


def run_in_session(
    args: list[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    merge_stderr: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` in a session of its own, stdin empty, and return what it printed (with
    ``merge_stderr``, its stderr in its stdout). ``env`` is added to this process's
    environment. Its process group is killed once it has exited, and when it outlives
    ``timeout`` seconds: then ``subprocess.TimeoutExpired`` is raised with what it printed as
    ``output``."""
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as late:
        _kill_group(proc)
        out, err = proc.communicate(timeout=10)
        raise subprocess.TimeoutExpired(args, timeout, out, err) from late
    finally:
        _kill_group(proc)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
