"""What the walk for held lease records costs at a start (``held_scan.scan_held``).

    python tests/held_scan_cost.py [TRANSCRIPTS] [HELD_EVERY] [DIR]

Makes TRANSCRIPTS (default 10 000) empty transcripts, 100 per directory, each with its lease
record sidecar, one in HELD_EVERY (default 100) naming a holder, in a temporary directory under
DIR (default: the system's); walks it three times and prints each walk's time.
``docs/restarts.md`` reports its numbers.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from sessionlane.actors.reclaim import FREE, HeldRecord, LeaseRecord, encode_record
from sessionlane.system.runtime.held_scan import scan_held


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    held_every = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    base = sys.argv[3] if len(sys.argv) > 3 else None
    holder = HeldRecord("l-1", 1, "agent", ("prompt",), "interactive", "0" * 64, None)
    with tempfile.TemporaryDirectory(dir=base) as root:
        for i in range(n):
            directory = os.path.join(root, f"d{i // 100}")
            os.makedirs(directory, exist_ok=True)
            open(os.path.join(directory, f"s{i}.jsonl"), "w").close()
            record = LeaseRecord(held=holder) if i % held_every == 0 else FREE
            with open(os.path.join(directory, f".s{i}.jsonl.lease"), "wb") as sidecar:
                sidecar.write(encode_record(record))
        for _ in range(3):
            started = time.perf_counter()
            found = scan_held([root], limit=n)
            took = time.perf_counter() - started
            print(
                f"{n} transcripts with records, {len(found.paths)} held: walked in "
                f"{took * 1000:.0f} ms ({took / n * 1e6:.1f} us per transcript), "
                f"truncated: {found.truncated}"
            )


if __name__ == "__main__":
    main()
