"""The blocking Python client against a running service: two lanes of one agent share a
transcript.

    sessionlane serve --root ~/sessions &          # or systemd / the container (deploy/)
    python examples/sync_client.py ~/sessions/demo.jsonl
    python examples/sync_client.py --listen unix:///run/sessionlane/sock ~/sessions/demo.jsonl

The ``main`` lane holds the file for a whole turn (a ``prompt`` lease: the model call and the
writes of its answer), while the ``heartbeat`` lane, on a second connection as another process
would be, asks with ``on_contention="skip"`` and is told at once that the file is busy. Then a
short lease-less append, and the service's view of the file (``status``).

The address defaults to ``$SESSIONLANE_LISTEN``, else ``tcp://127.0.0.1:7420``; a service
that asks for a token reads it from ``$SESSIONLANE_TOKEN_FILE``. Every failure is a
``sessionlane.SessionLaneError`` (its subclass names the kind); the script prints it and
exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import sessionlane


def token() -> str | None:
    """The service's token, if ``$SESSIONLANE_TOKEN_FILE`` names one (the client strips
    the file's newline)."""
    path = os.environ.get("SESSIONLANE_TOKEN_FILE")
    if not path:
        return None
    with open(path) as f:
        return f.read()


def turn(sl: sessionlane.SessionLane, heartbeat: sessionlane.SessionLane, path: str) -> None:
    """One agent turn under a prompt lease, while the heartbeat lane tries its luck."""
    main = sl.lane("agent:demo:main", priority="interactive")
    with main.lease(path, purpose="prompt", wait_timeout=30.0) as lease:
        assert lease is not None  # only on_contention="skip" yields None
        print(f"main: holding {lease.path} (fence {lease.fence})")
        lease.append({"role": "user", "text": "What is the weather like?", "lane": "main"})

        # Elsewhere, the heartbeat would only read the transcript: it skips a busy file.
        beat = heartbeat.lane("agent:demo:heartbeat", priority="background")
        with beat.lease(path, purpose="prompt", on_contention="skip") as skipped:
            print(f"heartbeat: {'skipped, the file is busy' if skipped is None else 'granted'}")

        started = time.monotonic()
        answer = "Sunny, 21 degrees."  # the model call would run here, the lease held
        result = lease.append(
            {"role": "assistant", "text": answer, "lane": "main"}, durability="fsync"
        )
        print(
            f"main: answer written at byte {result.offset} under fence {result.fence}"
            f" ({(time.monotonic() - started) * 1000:.0f} ms)"
        )
    print("main: released")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="the transcript (under one of the service's roots)")
    parser.add_argument("--listen", help="the service's address (default $SESSIONLANE_LISTEN)")
    args = parser.parse_args(argv)
    path = os.path.abspath(args.path)
    try:
        # reconnect_for: keep trying for 5 s while the service (re)starts.
        with (
            sessionlane.connect(args.listen, token(), reconnect_for=5.0) as sl,
            sessionlane.connect(args.listen, token()) as heartbeat,
        ):
            print(f"connected to {sl.server}")
            turn(sl, heartbeat, path)
            # A short write without a lease: queued like a write lease, never interleaved.
            done = sl.lane("agent:demo:cron").append(path, {"role": "system", "text": "tick"})
            print(f"cron: appended {done.lines} line under fence {done.fence}")
            for file in sl.status(path).files:
                holder = file.holder.lane if file.holder else "free"
                print(f"status: {file.path} fence {file.fence}, holder {holder}")
    except sessionlane.SessionLaneError as exc:
        print(f"sync_client: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
