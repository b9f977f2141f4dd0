"""A private ``redis-server`` for the bench's Redis peer, started and stopped by the bench.

The peer is measured only where it can be: ``redis-server`` on ``PATH`` and redis-py
importable (``pip install 'sessionlane[bench]'``). The server listens on a free loopback port,
keeps nothing on disk (no RDB, no AOF), runs in its own process group and is killed with it
when the suite ends, fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RedisPeer", "redis_server"]

_READY_S = 10.0
_POLL_S = 0.02


@dataclass(frozen=True)
class RedisPeer:
    """Where the bench's Redis runs (``url``), or why there is none (``missing``)."""

    url: str | None
    missing: str | None = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _missing() -> str | None:
    """Why the Redis peer cannot be measured here, or None if it can."""
    if shutil.which("redis-server") is None:
        return "redis-server is not on PATH"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py is not installed (pip install 'sessionlane[bench]')"
    return None


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[RedisPeer]:
    """A running ``redis-server`` on loopback for the duration of the block, if one can run."""
    missing = _missing()
    if missing is not None:
        yield RedisPeer(None, missing)
        return
    import redis

    port = _free_port()
    log = (workdir / "redis.log").open("wb")
    options = ["--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        ["redis-server", *options, "--protected-mode", "yes", "--dir", str(workdir)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1.0)
        deadline = time.monotonic() + _READY_S
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    yield RedisPeer(None, f"redis-server did not start (see {workdir}/redis.log)")
                    return
                time.sleep(_POLL_S)
        client.close()
        yield RedisPeer(f"redis://127.0.0.1:{port}/0")
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()
