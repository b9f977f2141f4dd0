"""One OpenClaw process not yet migrated: OpenClaw's own ``<file>.lock`` acquirer.

The acquirer is ``sessionlane.system.race._lockfile``, OpenClaw's ``acquireSessionWriteLock``
ported to Python (its retry loop, timeout budget, stale rules and payload). Like OpenClaw, it
appends one line to the transcript itself while it holds the lock, and releases when told to::

    python legacy_openclaw.py SESSION_FILE TIMEOUT_MS LABEL

One JSON line per step on stdout, as ``dropin.mjs``: ``held`` (with the lock file's text),
``timeout`` or ``stale`` (it gave up, the owner as OpenClaw names it), ``released``.
"""

from __future__ import annotations

import json
import os
import sys

from sessionlane.system.race._lockfile import SessionWriteLockManager
from sessionlane.system.race._lockpolicy import (
    SessionWriteLockStaleError,
    SessionWriteLockTimeoutError,
)


def say(**event: object) -> None:
    print(json.dumps(event), flush=True)


def main(session_file: str, timeout_ms: str, label: str) -> int:
    manager = SessionWriteLockManager(log=lambda line: print(line, file=sys.stderr))
    try:
        lock = manager.acquire(session_file, timeout_ms=float(timeout_ms))
    except SessionWriteLockTimeoutError as err:
        say(event="timeout", owner=err.owner, message=str(err))
        return 3
    except SessionWriteLockStaleError as err:
        say(event="stale", owner=err.owner, message=str(err))
        return 4
    with open(session_file + ".lock", encoding="utf-8") as held:
        say(event="held", pid=os.getpid(), lock=held.read())
    with open(session_file, "a", encoding="utf-8") as transcript:
        transcript.write(json.dumps({"writer": label, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        if line.strip() == "release":
            break
    lock.release()
    manager.close()
    say(event="released")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
