"""CPU one SessionFile spends per lease cycle, in-process: no actor system, no sockets.

Usage: ``python tests/session_file_cpu.py [CYCLES]`` (default 2000), with the ``python`` of
the install to measure, from the root of its source tree (it drives the hand-driven ``Shell``
of that tree's ``tests/test_durability.py``). One cycle: acquire, two ``flush`` appends,
release, the clock one ms on. Prints the best of 5 runs, in microseconds of process CPU per
cycle. The SessionFile alone, so a change to its core or shell shows without the transport's
noise; ``tests/cpu_per_cycle.py`` measures the whole service.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path("tests").resolve()))

import test_durability as harness  # the tree's own harness (tests/ is no package)

from sessionlane.actors import session_file
from sessionlane.messages.wire import Acquire, Append, Release


def main() -> None:
    cycles = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    clock = harness.Clock()
    session_file.monotonic_ms = clock  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as directory:
        shell = harness.Shell(Path(directory) / "t.jsonl", clock)

        def cycle(i: int) -> None:
            shell.call("a", Acquire(lane="a", path=shell.path, purpose="write"))
            granted = shell.events[-1][1]
            for _ in range(2):
                append = Append(
                    lease=granted.lease, fence=granted.fence, records=[{"i": i}], durability="flush"
                )
                shell.call("a", append)
            shell.settle()
            shell.call("a", Release(lease=granted.lease))
            clock.now += 1
            shell.events.clear()

        for i in range(200):  # warm up
            cycle(i)
        best = float("inf")
        for _ in range(5):
            started = time.process_time()
            for i in range(cycles):
                cycle(i)
            best = min(best, (time.process_time() - started) / cycles * 1e6)
        shell.close()
    print(f'{{"cycles": {cycles}, "cpu_us_per_cycle": {best:.1f}}}')


if __name__ == "__main__":
    main()
