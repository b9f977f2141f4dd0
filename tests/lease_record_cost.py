"""What a lease record write costs, against the fdatasync of an append in the same run.

    python tests/lease_record_cost.py [DIR]

Writes the record of a held lease (one 4 KiB ``pwrite`` in place, as a SessionFile does at a
grant, a release and after each write of the holder) 20 000 times, then appends a line and
fdatasyncs it 300 times, in a temporary directory under DIR (default: the system's), and
prints both per-operation times and their ratio. ``docs/restarts.md`` reports its numbers.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from sessionlane.actors.confined import ConfinedDir
from sessionlane.actors.lease_record_file import LeaseRecordFile
from sessionlane.actors.reclaim import HeldRecord, LeaseRecord, digest

RECORD_WRITES = 20_000
SYNCED_APPENDS = 300


def main() -> None:
    with tempfile.TemporaryDirectory(dir=sys.argv[1] if len(sys.argv) > 1 else None) as tmp:
        path = os.path.join(tmp, "t.jsonl")
        open(path, "w").close()
        directory, _ = ConfinedDir.open_parent(path)
        records = LeaseRecordFile(path, directory)
        held = HeldRecord(
            "0123abcd-1", 1, "agent:main", ("prompt",), "interactive", digest("s" * 32), 1.8e12
        )
        record = LeaseRecord(held=held, ino=1, size=100)
        started = time.perf_counter()
        for _ in range(RECORD_WRITES):
            records.write(record)
        write_us = (time.perf_counter() - started) / RECORD_WRITES * 1e6
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        started = time.perf_counter()
        for _ in range(SYNCED_APPENDS):
            os.write(fd, b'{"n":1}\n')
            os.fdatasync(fd)
        sync_us = (time.perf_counter() - started) / SYNCED_APPENDS * 1e6
        os.close(fd)
        records.close()
        directory.close()
    print(
        f"lease record write: {write_us:.1f} us; append + fdatasync: {sync_us:.1f} us; "
        f"the record costs 1/{sync_us / write_us:.0f} of a durable append"
    )


if __name__ == "__main__":
    main()
