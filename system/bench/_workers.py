"""Tasks that run inside the bench's worker processes (see ``_pool``).

Each task sets up (connects, opens files, runs one warm-up cycle so actors and lanes exist),
waits at the gate for the common start, measures until its deadline, and returns plain lists
of ``time.monotonic()`` stamps or durations. ``CLOCK_MONOTONIC`` is one clock for every
process on Linux, so the parent can compare stamps taken in different workers.
"""

from __future__ import annotations

import os
import time
from typing import Any

from sessionlane.system.bench._pool import Gate

__all__ = ["direct_appends", "gateway_requests", "lane_appends", "lock_cycles", "record"]

_TEXT = "x" * 160


def record(worker: int, seq: int) -> dict[str, Any]:
    """A transcript-like record of about 200 bytes."""
    return {"type": "message", "role": "assistant", "worker": worker, "seq": seq, "text": _TEXT}


def lock_cycles(params: dict[str, Any], gate: Gate) -> list[tuple[float, float, float, float]]:
    """Loop acquire, append one record, release; one ``(asked, granted, releasing, released)``
    stamp tuple per cycle. ``releasing`` is taken just before the release is sent."""
    from sessionlane.system.bench._peers import open_contender

    index: int = params["index"]
    contender = open_contender(
        params["kind"], params["path"], address=params.get("address", ""), lane=f"bench:{index}"
    )
    try:
        contender.acquire()
        contender.append([record(index, 0)])
        contender.release()
        start = gate.wait()
        end = start + params["duration"]
        limit: int = params["max_cycles"]
        cycles: list[tuple[float, float, float, float]] = []
        while (asked := time.monotonic()) < end and len(cycles) < limit:
            contender.acquire()
            granted = time.monotonic()
            contender.append([record(index, len(cycles) + 1)])
            releasing = time.monotonic()
            contender.release()
            cycles.append((asked, granted, releasing, time.monotonic()))
        return cycles
    finally:
        contender.close()


def lane_appends(params: dict[str, Any], gate: Gate) -> dict[str, Any]:
    """Lane-less durable appends of one record each, round-robin over ``paths``."""
    from sessionlane.system.client import connect

    index: int = params["index"]
    paths: list[str] = params["paths"]
    with connect(params["address"]) as sl:
        lane = sl.lane(f"append:{index}")
        lane.append(paths[index % len(paths)], record(index, 0))
        start = gate.wait()
        end = start + params["duration"]
        latencies: list[float] = []
        done = start
        while (began := time.monotonic()) < end:
            seq = len(latencies) + 1
            lane.append(paths[(index + seq) % len(paths)], record(index, seq))
            done = time.monotonic()
            latencies.append(done - began)
    return {"latencies": latencies, "elapsed": done - start}


def pipelined_appends(params: dict[str, Any], gate: Gate) -> dict[str, Any]:
    """Turns on one file: take the lease, pipeline ``per_lease`` records (``window`` in
    flight), release (a ``release`` of its own; ``release`` True: carried by the last append,
    append and release, which measured within the noise of it: docs/fused-release.md);
    repeat. One latency per turn."""
    from sessionlane.system.client import connect

    index: int = params["index"]
    per_lease: int = params["per_lease"]
    with connect(params["address"]) as sl:
        lane = sl.lane(f"pipelined:{index}")
        start = gate.wait()
        end = start + params["duration"]
        turns: list[float] = []
        records = 0
        done = start
        while (began := time.monotonic()) < end:
            batch = [record(index, records + i) for i in range(per_lease)]
            with lane.lease(params["path"], purpose="write") as lease:
                assert lease is not None
                window, fused = params["window"], params.get("release", False)
                records += len(lease.append_pipelined(batch, window=window, release=fused))
            done = time.monotonic()
            turns.append(done - began)
    return {"records": records, "turns": turns, "elapsed": done - start}


def direct_appends(params: dict[str, Any], gate: Gate) -> dict[str, Any]:
    """Plain appends: ``batch`` one-record writes, then one ``fdatasync``; repeat."""
    from sessionlane.system.bench._peers import encode

    batch: int = params["batch"]
    fd = os.open(params["path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        start = gate.wait()
        end = start + params["duration"]
        records = syncs = 0
        done = start
        while time.monotonic() < end:
            for _ in range(batch):
                os.write(fd, encode([record(0, records)]))
                records += 1
            os.fdatasync(fd)
            syncs += 1
            done = time.monotonic()
    finally:
        os.close(fd)
    return {"records": records, "syncs": syncs, "elapsed": done - start}


def gateway_requests(params: dict[str, Any], gate: Gate) -> dict[str, Any]:
    """Sequential requests on one connection: ``keepalive`` or a lane-less ``append``."""
    from sessionlane.messages.wire import Append, Error, Keepalive
    from sessionlane.system.bench._pool import BenchError
    from sessionlane.system.bench._wire import FramedClient

    index: int = params["index"]
    client = FramedClient(params["address"])
    try:

        def request(seq: int) -> Any:
            if params["kind"] == "keepalive":
                return Keepalive()
            return Append(lane=f"gw:{index}", path=params["path"], records=[record(index, seq)])

        for seq in range(3):
            reply = client.call(request(seq))
            if isinstance(reply, Error):
                raise BenchError(f"{params['kind']} refused: {reply.code} {reply.detail}")
        start = gate.wait()
        end = start + params["duration"]
        latencies: list[float] = []
        done = start
        while (began := time.monotonic()) < end:
            client.call(request(len(latencies) + 3))
            done = time.monotonic()
            latencies.append(done - began)
    finally:
        client.close()
    return {"latencies": latencies, "elapsed": done - start}
