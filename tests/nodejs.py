"""The Node.js package (``clients/node``) for the tests that run it.

``built_node`` gives ``node`` with the package built from the sources under test (once per
test run, whichever worker asks first), or skips the
test with the reason when ``node``, ``npm`` or the package's dependencies (``npm ci`` in
``clients/node``, as ``.ci/run`` does) are missing. Run what it builds with
``processes.run_in_session``: no ``node`` (or what ``npm`` started) outlives the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from filelock import FileLock

__all__ = ["NODE_DIR", "built_node", "node_script"]

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
    # `npm ci` built the package too, maybe long ago: build what is being tested, once per
    # run. The whole suite runs on two workers: a second build would rewrite `dist/` under
    # the other worker's `node`, so the build is locked and stamped with the run's key.
    stamp = Path(tempfile.gettempdir()) / f"sessionlane-node-built-{_run_key()}"
    with FileLock(f"{stamp}.lock", timeout=_BUILD_TIMEOUT_S):
        if not stamp.exists():
            build = subprocess.run(
                [npm, "run", "build"],
                cwd=NODE_DIR,
                capture_output=True,
                text=True,
                timeout=_BUILD_TIMEOUT_S,
            )
            assert build.returncode == 0, build.stdout + build.stderr
            stamp.touch()
    return node


def _run_key() -> str:
    """What names this test run, the same in each of its xdist workers: the run's tag, or
    xdist's run id, or (a run in one process) this process."""
    for name in ("SESSIONLANE_TEST_TAG", "PYTEST_XDIST_TESTRUNUID"):
        if value := os.environ.get(name):
            return "".join(c if c.isalnum() or c in "-_" else "_" for c in value)
    return f"pid{os.getpid()}"


def node_script(node: str, script: str, *args: str) -> subprocess.Popen[str]:
    """``node -e SCRIPT NODE_DIR ARGS...`` in a session of its own, lines in and out: a holder
    the restart tests drive step by step (the caller kills its session when done)."""
    return subprocess.Popen(
        [node, "-e", script, str(NODE_DIR), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
