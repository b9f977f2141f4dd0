"""The asyncio Python client against a running service: agents take turns on one transcript.

    sessionlane serve --root ~/sessions &
    python examples/async_client.py ~/sessions/demo.jsonl
    python examples/async_client.py --agents 3 --turns 2 ~/sessions/demo.jsonl

Each agent is a task with its own connection (as separate processes would be). Every turn it
takes a ``write`` lease on the file and appends its records one at a time, with an ``await``
between them (a model streaming its answer). The service queues the other agents meanwhile,
so each turn lands as one contiguous run of lines, under a fence higher than the turn before.
The script reads the transcript back and checks exactly that.

The address defaults to ``$SESSIONLANE_LISTEN``, else ``tcp://127.0.0.1:7420``; the token,
if the service asks for one, comes from ``$SESSIONLANE_TOKEN_FILE``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
from typing import Any

import sessionlane

RECORDS_PER_TURN = 3


def token() -> str | None:
    path = os.environ.get("SESSIONLANE_TOKEN_FILE")
    if not path:
        return None
    with open(path) as f:
        return f.read()


async def agent(name: str, address: str | None, path: str, turns: int) -> None:
    """``turns`` turns of ``RECORDS_PER_TURN`` records, each under its own lease."""
    async with sessionlane.connect_async(address, token(), reconnect_for=5.0) as sl:
        lane = sl.lane(f"agent:{name}")
        for turn in range(1, turns + 1):
            async with lane.lease(path, purpose="write", wait_timeout=60.0) as lease:
                assert lease is not None
                for seq in range(RECORDS_PER_TURN):
                    await lease.append(
                        {"agent": name, "turn": turn, "seq": seq, "fence": lease.fence}
                    )
                    await asyncio.sleep(0)  # let the others ask for the file meanwhile
                print(f"{name}: turn {turn} written under fence {lease.fence}")


def check(path: str, names: list[str], turns: int) -> list[tuple[str, int]]:
    """The turns in file order; raises if a turn was split, lost or fenced out of order."""
    with open(path) as f:
        records: list[dict[str, Any]] = [json.loads(line) for line in f if line.strip()]
    mine = [r for r in records if r.get("agent") in names]
    runs = [
        list(group) for _, group in itertools.groupby(mine, key=lambda r: (r["agent"], r["turn"]))
    ]
    for run in runs:
        if [r["seq"] for r in run] != list(range(RECORDS_PER_TURN)):
            raise AssertionError(f"a turn was split or lost: {run}")
    fences = [run[0]["fence"] for run in runs]
    if fences != sorted(set(fences)) or len(runs) != len(names) * turns:
        raise AssertionError(f"turns out of order or missing: {fences}")
    return [(run[0]["agent"], run[0]["fence"]) for run in runs]


async def amain(address: str | None, path: str, agents: int, turns: int) -> None:
    names = [f"agent-{i}" for i in range(1, agents + 1)]
    await asyncio.gather(*(agent(name, address, path, turns) for name in names))
    order = check(path, names, turns)
    print("file order: " + ", ".join(f"{name}@{fence}" for name, fence in order))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="the transcript (under one of the service's roots)")
    parser.add_argument("--listen", help="the service's address (default $SESSIONLANE_LISTEN)")
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--turns", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        asyncio.run(amain(args.listen, os.path.abspath(args.path), args.agents, args.turns))
    except sessionlane.SessionLaneError as exc:
        print(f"async_client: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
