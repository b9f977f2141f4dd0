"""Pipelined appends across a crash of the service (``docs/restarts.md``), on both surfaces.

The service's actor system is stopped (SIGSTOP) while a pipeline is in flight, so the client
has sent its window and heard nothing; then it is SIGKILLed and a new service started on the
same address and root. The client reclaims the lease and sends the unanswered appends again,
in order, one at a time: each is written once, in order. Without ``reconnect_for`` the same
cut raises ``PipelineBroken`` naming the appends in flight as of unknown outcome. On the raw
wire, the restarted service goes on with a pipeline from the holder's last append in the
lease record, answers a resent append as it was, and refuses one that does not follow the last
one written.
"""

# ruff: noqa: F811  (the fixtures of client_surfaces are imported, then named as arguments)

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from client_surfaces import (  # noqa: F401 (fixtures)
    CLIENT_KEEPALIVE,
    Surface,
    client,
    eventually,
    lines,
    pool,
)
from nodejs import node_script
from test_gateway import RawConn
from test_restarts import (  # noqa: F401 (fixture)
    RECONNECT_FOR,
    Restarts,
    crash,
    node_or_skip,
    restarts,
)

from sessionlane.messages.errors import PipelineBroken, UnknownOutcome

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(180)]


def pending_requests(client: Surface, sl: Any) -> int:
    core = sl.core if client.name == "sync" else sl.target.core
    links = core.direct_links() + ([] if core.link is None else [core.link])
    return sum(len(link.pending) for link in links)  # the lease's direct channel, or not


def test_a_pipeline_cut_by_a_crash_is_resent_in_order_and_written_once(
    client: Surface, restarts: Restarts, pool: ThreadPoolExecutor
) -> None:
    path = str(restarts.root / "piped.jsonl")
    first = restarts.start()
    sl = client.connect(first.address, keepalive=CLIENT_KEEPALIVE, reconnect_for=RECONNECT_FOR)
    try:
        lease = sl.lane("agent").acquire(path, purpose="prompt")
        assert lease is not None
        lease.append_pipelined([{"n": n} for n in range(5)], window=4)
        running = first.running
        assert running is not None
        os.killpg(running.system.pgid, signal.SIGSTOP)  # hears the window, answers nothing
        piped = pool.submit(lease.append_pipelined, [{"n": n} for n in range(5, 40)], window=8)
        # a window of eight records: four appends of two (a quarter of the window each)
        eventually(lambda: pending_requests(client, sl) == 4 or None, "a window in flight")
        crash(first)  # SIGKILL reaches stopped processes too
        restarts.start()
        results = piped.result(timeout=120)
        assert len(results) == 35 and lease.revoked is None
        assert [r.offset for r in results] == sorted({r.offset for r in results})
        lease.release()
    finally:
        sl.close()
    assert [r["n"] for r in lines(path)] == list(range(40))
    data = Path(path).read_bytes()
    for n, result in enumerate(results, start=5):  # resent or not, each where its line is
        assert data[result.offset :].startswith(f'{{"n":{n}}}\n'.encode())


def test_a_pipeline_whose_connection_is_lost_says_which_appends_have_an_unknown_outcome(
    client: Surface, restarts: Restarts, pool: ThreadPoolExecutor
) -> None:
    path = str(restarts.root / "lost.jsonl")
    first = restarts.start()
    sl = client.connect(first.address, keepalive=CLIENT_KEEPALIVE)  # no reconnect_for
    try:
        lease = sl.lane("agent").acquire(path, purpose="prompt")
        assert lease is not None
        done = lease.append_pipelined([{"n": n} for n in range(3)])
        running = first.running
        assert running is not None
        os.killpg(running.system.pgid, signal.SIGSTOP)
        piped = pool.submit(lease.append_pipelined, [{"n": n} for n in range(3, 30)], window=8)
        eventually(lambda: pending_requests(client, sl) == 4 or None, "a window in flight")
        crash(first)
        with pytest.raises(PipelineBroken) as caught:
            piped.result(timeout=60)
    finally:
        sl.close()
    error = caught.value
    assert (error.written, error.failed, error.unknown) == ((), 0, 8)
    assert isinstance(error.cause, UnknownOutcome) and "read it" in error.cause.detail
    assert "records 0 to 7 may or may not be in the file" in error.detail
    assert lease.revoked == "connection_lost"
    assert [r["n"] for r in lines(path)] == [0, 1, 2] and len(done) == 3


def test_the_restarted_service_goes_on_with_a_pipeline_from_the_lease_record(
    restarts: Restarts,
) -> None:
    path = str(restarts.root / "record.jsonl")
    first = restarts.start()
    held = RawConn(first.address)  # kept open: closing it would abandon the lease
    held.hello()
    granted = held.request({"type": "acquire", "lane": "agent", "path": path} | PROMPT)
    assert granted["type"] == "granted", granted
    base = {"type": "append", "lease": granted["lease"], "fence": granted["fence"]}
    # A pipeline of two, written before the crash (their aids go to the lease record); the
    # second a group of two records that asks for its lines' offsets.
    piped = held.request(base | {"records": [{"n": 0}], "aid": "aid-0000-a"})
    assert piped["type"] == "appended" and "offsets" not in piped, piped
    group = {"records": [{"n": 1}, {"n": 1.5}], "aid": "aid-0001-b", "after": "aid-0000-a"}
    piped = held.request(base | group | {"offsets": True})
    assert piped["type"] == "appended" and piped["offsets"] == [8, 16], piped
    crash(first)
    held.close()
    second = restarts.start()
    raw = RawConn(second.address)
    try:
        raw.hello()
        ticket = {k: granted[k] for k in ("lease", "fence", "secret")}
        got = raw.request(
            {"type": "acquire", "lane": "agent", "path": path, "reclaim": ticket} | PROMPT
        )
        assert got["type"] == "granted", got
        resent = raw.request(base | group | {"offsets": True})
        assert resent["type"] == "appended", resent  # answered as it was, not written again
        assert (resent["offset"], resent["offsets"]) == (piped["offset"], piped["offsets"])
        stray = raw.request(
            base | {"records": [{"n": "x"}], "aid": "aid-stray", "after": "aid-0000-a"}
        )
        assert stray["type"] == "error" and stray["code"] == "pipeline_broken", stray
        going_on = raw.request(
            base | {"records": [{"n": 2}], "aid": "aid-0002-c", "after": "aid-0001-b"}
        )
        assert going_on["type"] == "appended", going_on
    finally:
        raw.close()
    assert lines(path) == [{"n": 0}, {"n": 1}, {"n": 1.5}, {"n": 2}]


PROMPT = {"purpose": "prompt"}


NODE_PIPELINE = """
const { connect } = require(process.argv[1]);
const [address, path] = process.argv.slice(2);
const emit = (line) => process.stdout.write(JSON.stringify(line) + '\\n');
(async () => {
  const sl = await connect(address, { reconnectForMs: 60000, keepaliveMs: 1000 });
  const lease = await sl.lane('node').lease(path);
  await lease.appendPipelined([0, 1, 2, 3, 4].map((n) => ({ n })), { window: 4 });
  emit({ step: 'held' });
  await new Promise((go) => process.stdin.once('data', () => go(process.stdin.destroy())));
  const records = Array.from({ length: 35 }, (_, i) => ({ n: i + 5 }));
  const piped = lease.appendPipelined(records, { window: 8 }); // the first window is sent now
  emit({ step: 'sent' });
  const results = await piped;
  const ordered = results.every((r, i) => i === 0 || r.offset > results[i - 1].offset);
  emit({ step: 'appended', count: results.length, ordered, revoked: lease.revoked });
  await lease.release();
  await sl.close();
})().catch((err) => { emit({ step: 'error', error: String(err) }); process.exit(1); });
"""


def test_a_node_pipeline_cut_by_a_crash_is_resent_in_order_and_written_once(
    restarts: Restarts,
) -> None:
    node = node_or_skip()
    path = str(restarts.root / "node-piped.jsonl")
    first = restarts.start()
    proc = node_script(node, NODE_PIPELINE, first.address, path)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert json.loads(proc.stdout.readline()) == {"step": "held"}
        running = first.running
        assert running is not None
        os.killpg(running.system.pgid, signal.SIGSTOP)  # hears the window, answers nothing
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline()) == {"step": "sent"}
        crash(first)
        restarts.start()
        appended = json.loads(proc.stdout.readline())
        assert appended == {"step": "appended", "count": 35, "ordered": True, "revoked": None}
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    assert [r["n"] for r in lines(path)] == list(range(40))
