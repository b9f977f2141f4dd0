"""Suite ``gateway``: requests per second and latency through the gateway, C = 1, 4, 16.

Each connection is its own worker process running the lean ``FramedClient`` (one request in
flight, no client threads), for ``duration`` seconds per request kind:

* ``keepalive``: answered by the gateway itself: its select loop, framing and codec;
* ``append``: a lane-less durable append of one record, each connection to its own file:
  the whole path (gateway, Lane, Registry, SessionFile with its write and ``fdatasync``);
* ``echo``: ``keepalive`` against ``EchoServer``, a bare ``selectors`` loop with the same
  codec in its own process: the floor for a single-process Python server on this machine.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from sessionlane.system.bench._context import BenchContext
from sessionlane.system.bench._report import fmt, table
from sessionlane.system.bench._stats import latency_ms, rate, ratio
from sessionlane.system.bench._wire import EchoServer

__all__ = ["KINDS", "NAME", "render", "run"]

NAME = "gateway"
KINDS = ("keepalive", "append", "echo")
_SLACK_S = 60.0


def run(ctx: BenchContext) -> dict[str, Any]:
    connections = (1, 4) if ctx.quick else (1, 4, 16)
    result: dict[str, Any] = {kind: {} for kind in KINDS}
    with ctx.service(NAME) as (service, root), ctx.pool(max(connections)) as pool:
        ctx.progress.step("starting the echo server")
        with EchoServer() as echo:
            for c in connections:
                for kind in KINDS:
                    ctx.progress.step(f"{kind}, {c} connection(s)")
                    address = echo.address if kind == "echo" else service.address
                    params = [
                        {
                            "address": address,
                            "kind": "append" if kind == "append" else "keepalive",
                            "path": str(root / f"conn-{i:02d}.jsonl"),
                            "index": i,
                            "duration": ctx.duration,
                        }
                        for i in range(c)
                    ]
                    runs = pool.run(
                        "sessionlane.system.bench._workers:gateway_requests",
                        params,
                        timeout=ctx.duration + _SLACK_S,
                    )
                    latencies = [x for r in runs for x in r["latencies"]]
                    result[kind][f"c{c}"] = {
                        "requests_per_s": rate(len(latencies), max(r["elapsed"] for r in runs)),
                        **latency_ms(latencies, "latency"),
                    }
    result["ratios"] = {
        f"c{c}": {
            "keepalive_of_echo": ratio(
                result["keepalive"][f"c{c}"]["requests_per_s"],
                result["echo"][f"c{c}"]["requests_per_s"],
            ),
            "append_of_keepalive": ratio(
                result["append"][f"c{c}"]["requests_per_s"],
                result["keepalive"][f"c{c}"]["requests_per_s"],
            ),
        }
        for c in connections
    }
    return result


def render(result: dict[str, Any]) -> list[Table]:
    rows = [
        [
            kind,
            key[1:],
            fmt(m["requests_per_s"], 0),
            fmt(m["latency_ms_p50"], 3),
            fmt(m["latency_ms_p99"], 3),
        ]
        for kind in KINDS
        for key, m in result[kind].items()
    ]
    ratio_rows = [
        [key[1:], fmt(r["keepalive_of_echo"], 2, "x"), fmt(r["append_of_keepalive"], 2, "x")]
        for key, r in result["ratios"].items()
    ]
    return [
        table(
            "gateway: sequential requests per connection",
            ["request", "connections", "requests/s", "p50 ms", "p99 ms"],
            rows,
        ),
        table(
            "gateway: throughput ratios",
            ["connections", "keepalive / echo", "append / keepalive"],
            ratio_rows,
        ),
    ]
