"""A restart nobody notices: leases and queues survive a restart of the service (issue 21).

Real services on real sockets: an embedded service whose actor system is SIGKILLed (every
SessionFile dies holding its file, as in a crash) or stopped cleanly, then a new service on
the same address and root; and ``sessionlane serve`` itself killed with SIGKILL. Every test
runs on both client surfaces (the ``client`` fixture). Orderings are forced by the services'
own state (``status``) and by events, never by sleeps; waiting is a bounded poll.
"""

# ruff: noqa: F811  (the fixtures of client_surfaces are imported, then named as arguments)

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
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
from nodejs import built_node, node_script
from ports import listen_port
from test_gateway import RawConn

from sessionlane.system.runtime.service import Service, embedded_service

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(180)]

RECONNECT_FOR = 60.0


def crash(service: Service) -> None:
    """SIGKILL the service's actor system (its SessionFiles die holding their files), then
    stop what is left of it: the clients see their connections drop, as in a crash."""
    running = service.running
    assert running is not None
    os.killpg(running.system.pgid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while running.system.members() and time.monotonic() < deadline:
        time.sleep(0.01)  # a bounded poll for the processes to be gone
    service.stop()


class Restarts:
    """Services on one address and one root, started and crashed in turn."""

    def __init__(self, root: Path, tmp: Path) -> None:
        self.root = root
        self.tmp = tmp
        self.listen = f"tcp://127.0.0.1:{listen_port()}"
        self.started: list[Any] = []

    def start(self, **overrides: Any) -> Service:
        n = len(self.started)
        cm = embedded_service(
            [str(self.root)], listen=self.listen, log_file=self.tmp / f"svc{n}.log", **overrides
        )
        service = cm.__enter__()
        self.started.append(cm)
        return service

    def stop_all(self) -> None:
        for cm in self.started:
            cm.__exit__(None, None, None)


@pytest.fixture
def restarts(tmp_path: Path) -> Iterator[Restarts]:
    root = tmp_path / "sessions"
    root.mkdir()
    made = Restarts(root, tmp_path)
    yield made
    made.stop_all()


def status_of(sl: Any, path: str) -> Any:
    files = sl.status(path).files
    return files[0] if files else None


def test_a_holder_in_mid_turn_keeps_its_lease_and_fence_across_a_crash(
    client: Surface, restarts: Restarts
) -> None:
    path = str(restarts.root / "turn.jsonl")
    first = restarts.start()
    sl = client.connect(first.address, keepalive=CLIENT_KEEPALIVE, reconnect_for=RECONNECT_FOR)
    try:
        lease = sl.lane("agent:main").acquire(path, purpose="prompt")
        assert lease is not None
        before = lease.append({"turn": 1, "n": 0})
        crash(first)
        restarts.start()
        # The turn goes on: the next append reclaims the lease (or finds it reclaimed by the
        # client already), under the same lease id and fence.
        after = lease.append({"turn": 1, "n": 1})
        assert (lease.revoked, after.fence) == (None, before.fence)
        status = status_of(sl, path)
        assert status.holder.lease == lease.id and status.holder.lane == "agent:main"
        assert status.counters["reclaims"] == 1
        lease.release()
    finally:
        sl.close()
    assert lines(path) == [{"turn": 1, "n": 0}, {"turn": 1, "n": 1}]


def test_a_nested_lease_is_reclaimed_with_its_nesting(client: Surface, restarts: Restarts) -> None:
    path = str(restarts.root / "nested.jsonl")
    first = restarts.start()
    sl = client.connect(first.address, keepalive=CLIENT_KEEPALIVE, reconnect_for=RECONNECT_FOR)
    other = None
    try:
        lane = sl.lane("agent:main")
        outer = lane.acquire(path, purpose="prompt")
        inner = lane.acquire(path, purpose="write")
        assert outer is not None and inner is not None and inner.id == outer.id
        crash(first)
        second = restarts.start()
        inner.release()  # reclaims first, then releases one level: the outer still holds
        outer.append({"still": "held"})
        other = client.connect(second.address)
        assert status_of(other, path).holder.lease == outer.id
        outer.release()
        with other.lane("next").lease(path, wait_timeout=10) as nxt:
            assert nxt is not None and nxt.fence > outer.fence
    finally:
        sl.close()
        if other is not None:
            other.close()


def test_a_waiter_queued_before_the_crash_is_granted_after_the_holder_releases(
    client: Surface, restarts: Restarts, pool: ThreadPoolExecutor
) -> None:
    path = str(restarts.root / "queue.jsonl")
    first = restarts.start()
    kw: dict[str, Any] = {"keepalive": CLIENT_KEEPALIVE, "reconnect_for": RECONNECT_FOR}
    holder_sl = client.connect(first.address, **kw)
    waiter_sl = client.connect(first.address, **kw)
    probe = None
    released = threading.Event()
    try:
        lease = holder_sl.lane("holder").acquire(path, purpose="prompt")
        assert lease is not None

        def wait_turn() -> tuple[int, bool]:
            with waiter_sl.lane("waiter").lease(path, purpose="prompt", wait_timeout=60) as got:
                assert got is not None
                return got.fence, released.is_set()

        waiting = pool.submit(wait_turn)
        eventually(lambda: len(status_of(holder_sl, path).queue) == 1, "the waiter to queue")
        crash(first)
        second = restarts.start()
        probe = client.connect(second.address)

        def both_back() -> bool:
            if waiting.done():  # the waiter gave up: say why, not "timed out"
                raise AssertionError(f"the waiter ended: {waiting.exception()!r}")
            s = status_of(probe, path)
            return s is not None and s.holder.lane == "holder" and len(s.queue) == 1

        eventually(both_back, "the holder to reclaim and the waiter to queue again", 30)
        assert not waiting.done()
        lease.append({"by": "holder"})
        released.set()  # set before the release is sent: a grant before it would see it clear
        lease.release()
        fence, after_release = waiting.result(timeout=30)
        assert after_release and fence > lease.fence
    finally:
        for sl in (holder_sl, waiter_sl, probe):
            if sl is not None:
                sl.close()


def test_a_holder_that_does_not_return_loses_the_file_when_the_grace_ends(
    client: Surface, restarts: Restarts, pool: ThreadPoolExecutor
) -> None:
    path = str(restarts.root / "gone.jsonl")
    first = restarts.start()
    gone = client.connect(first.address, keepalive=CLIENT_KEEPALIVE)  # no reconnect_for
    lease = gone.lane("gone").acquire(path, purpose="prompt")
    assert lease is not None
    secret = lease.state.secret
    lease.append({"by": "gone"})
    crash(first)
    second = restarts.start(reclaim_grace_ms=1500)
    sl = client.connect(second.address)
    try:
        waiting = pool.submit(lambda: sl.lane("next").acquire(path, wait_timeout=30))

        def awaited() -> bool:
            s = status_of(sl, path)
            return s is not None and s.counters["in_grace"] == 1 and len(s.queue) == 1

        eventually(awaited, "the file to await its holder, the newcomer queued", 10)
        assert status_of(sl, path).holder.lane == "gone (awaiting reclaim)"
        nxt = waiting.result(timeout=30)
        assert nxt is not None and nxt.fence > lease.fence
        assert status_of(sl, path).counters["reclaims_expired"] == 1
        # Too late: the old lease cannot be taken back, even with its secret.
        raw = RawConn(second.address)
        try:
            raw.hello()
            ticket = {"lease": lease.id, "fence": lease.fence, "secret": secret}
            reply = raw.request(
                {
                    "type": "acquire",
                    "lane": "gone",
                    "path": path,
                    "purpose": "prompt",
                    "reclaim": ticket,
                }
            )
            assert reply["type"] == "error" and reply["code"] == "reclaim_refused", reply
        finally:
            raw.close()
        nxt.release()
    finally:
        sl.close()
        gone.close()


def test_a_reclaim_with_a_wrong_secret_or_after_the_file_changed_is_refused(
    client: Surface, restarts: Restarts
) -> None:
    path = str(restarts.root / "changed.jsonl")
    first = restarts.start()
    sl = client.connect(first.address, keepalive=CLIENT_KEEPALIVE)
    lease = sl.lane("a").acquire(path, purpose="prompt")
    assert lease is not None
    lease.append({"n": 0})
    secret = lease.state.secret
    crash(first)
    sl.close()
    with open(path, "a") as f:  # someone else wrote while the service was down
        f.write(json.dumps({"outsider": 1}) + "\n")
    second = restarts.start()
    raw = RawConn(second.address)
    try:
        raw.hello()

        def reclaim(fence: int, secret: str) -> dict[str, Any]:
            ticket = {"lease": lease.id, "fence": fence, "secret": secret}
            message = {"type": "acquire", "lane": "a", "path": path, "purpose": "prompt"}
            return raw.request({**message, "reclaim": ticket})

        wrong = reclaim(lease.fence, "x" * 32)
        assert wrong["code"] == "reclaim_refused" and "secret" in wrong["detail"], wrong
        moved = reclaim(lease.fence + 1, secret)
        assert moved["code"] == "reclaim_refused" and "fence" in moved["detail"], moved
        changed = reclaim(lease.fence, secret)
        assert changed["code"] == "reclaim_refused" and "changed" in changed["detail"], changed
    finally:
        raw.close()


def test_a_file_nobody_held_is_served_at_once_during_the_grace(
    client: Surface, restarts: Restarts
) -> None:
    path = str(restarts.root / "free.jsonl")
    first = restarts.start()
    sl = client.connect(first.address, reconnect_for=RECONNECT_FOR)
    try:
        with sl.lane("a").lease(path) as lease:
            assert lease is not None
            lease.append({"n": 0})
        crash(first)
        restarts.start(reclaim_grace_ms=600_000)
        with sl.lane("b").lease(path, on_contention="fail") as again:
            assert again is not None  # no wait for a grace nobody needs
    finally:
        sl.close()


def test_a_clean_restart_is_ridden_out_too(client: Surface, restarts: Restarts) -> None:
    path = str(restarts.root / "clean.jsonl")
    first = restarts.start()
    sl = client.connect(first.address, keepalive=CLIENT_KEEPALIVE, reconnect_for=RECONNECT_FOR)
    try:
        lease = sl.lane("agent").acquire(path, purpose="prompt")
        assert lease is not None
        lease.append({"n": 1})
        restarts.started.pop().__exit__(None, None, None)  # a clean stop: revoked "shutdown"
        restarts.start()
        assert lease.append({"n": 2}).fence == lease.fence
        assert lease.revoked is None
        lease.release()
    finally:
        sl.close()
    assert lines(path) == [{"n": 1}, {"n": 2}]


def test_an_append_resent_after_a_crash_is_not_written_twice(
    client: Surface, restarts: Restarts
) -> None:
    """The answer of an append is lost with the service: the client sends it again with the
    same append id, and the restarted service answers it from the lease record."""
    path = str(restarts.root / "resent.jsonl")
    first = restarts.start()
    sl = client.connect(first.address, keepalive=CLIENT_KEEPALIVE)  # the raw client reclaims
    try:
        lease = sl.lane("agent").acquire(path, purpose="prompt")
        assert lease is not None
        first_result = lease.append({"n": 1})
        crash(first)
        second = restarts.start()
        raw = RawConn(second.address)
        try:
            raw.hello()
            ticket = {"lease": lease.id, "fence": lease.fence, "secret": lease.state.secret}
            got = raw.request(
                {
                    "type": "acquire",
                    "lane": "agent",
                    "path": path,
                    "purpose": "prompt",
                    "reclaim": ticket,
                }
            )
            assert got["type"] == "granted" and got["fence"] == lease.fence, got
            append = {
                "type": "append",
                "lease": lease.id,
                "fence": lease.fence,
                "records": [{"n": 2}],
                "aid": "aid-00000001",
            }
            written = raw.request(append)
            again = raw.request(append)
            assert written["type"] == again["type"] == "appended"
            assert (again["offset"], again["lines"]) == (written["offset"], written["lines"])
            assert written["offset"] > first_result.offset
        finally:
            raw.close()
    finally:
        sl.close()
    assert lines(path) == [{"n": 1}, {"n": 2}]


def test_a_kill_9_of_serve_is_ridden_out_by_a_holder_in_mid_turn(
    client: Surface, tmp_path: Path
) -> None:
    from test_serve import Serve

    root = tmp_path / "sessions"
    root.mkdir()
    listen = f"tcp://127.0.0.1:{listen_port()}"
    args = ["--root", str(root), "--listen", listen]
    made: list[Serve] = []

    def start() -> Serve:
        serve = Serve(tmp_path, *args, "--log-file", str(tmp_path / f"s{len(made)}.log"))
        made.append(serve)
        serve.wait_ready()
        return serve

    path = str(root / "serve.jsonl")
    try:
        first = start()
        sl = client.connect(listen, keepalive=CLIENT_KEEPALIVE, reconnect_for=RECONNECT_FOR)
        try:
            lease = sl.lane("agent").acquire(path, purpose="prompt")
            assert lease is not None
            lease.append({"n": 1})
            for pgid in first.groups():
                os.killpg(pgid, signal.SIGKILL)  # kill -9 of serve and its actors
            first.proc.wait(10)
            eventually(lambda: not first.leftovers(), "the killed service's processes to go")
            start()
            assert lease.append({"n": 2}).fence == lease.fence
            lease.release()
        finally:
            sl.close()
    finally:
        for serve in made:
            serve.kill()
    assert lines(path) == [{"n": 1}, {"n": 2}]


NODE_HOLDER = """
const { connect } = require(process.argv[1]);
const { createSessionWriteLocks } = require(process.argv[1] + '/dist/openclaw.js');
const [address, path, mode] = process.argv.slice(2);
const emit = (line) => process.stdout.write(JSON.stringify(line) + '\\n');
const nextLine = () =>
  new Promise((resolve) => process.stdin.once('data', () => resolve(process.stdin.destroy())));
(async () => {
  if (mode === 'client') {
    const sl = await connect(address, { reconnectForMs: 60000, keepaliveMs: 1000 });
    const lease = await sl.lane('node').lease(path);
    await lease.append({ n: 1 });
    emit({ step: 'held', lease: lease.id, fence: lease.fence });
    await nextLine();
    const after = await lease.append({ n: 2 });
    emit({ step: 'appended', fence: after.fence, aborted: lease.signal.aborted });
    await lease.release();
    await sl.close();
  } else {
    const locks = createSessionWriteLocks({ address, connectOptions: { keepaliveMs: 1000 } });
    const lock = await locks.acquireSessionWriteLock({ sessionFile: path });
    emit({ step: 'held', lease: lock.lease.id, fence: lock.lease.fence });
    await nextLine();
    const after = await lock.lease.append({ n: 2 });
    emit({ step: 'appended', fence: after.fence, aborted: lock.signal.aborted });
    await lock.release();
    await locks.close();
  }
  emit({ step: 'done' });
})().catch((err) => { emit({ step: 'error', error: String(err) }); process.exit(1); });
"""


def node_or_skip() -> str:
    """``node``, the package built from the sources under test (skips without node)."""
    return built_node("the Node holder's restart test")


@pytest.mark.parametrize("mode", ["client", "openclaw"])
def test_a_node_holder_rides_out_a_crash_and_under_the_openclaw_drop_in_sees_nothing(
    restarts: Restarts, mode: str
) -> None:
    node = node_or_skip()
    path = str(restarts.root / f"node-{mode}.jsonl")
    first = restarts.start()
    proc = node_script(node, NODE_HOLDER, first.address, path, mode)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        held = json.loads(proc.stdout.readline())
        assert held["step"] == "held", held
        crash(first)
        restarts.start()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        appended = json.loads(proc.stdout.readline())
        assert appended == {"step": "appended", "fence": held["fence"], "aborted": False}
        assert json.loads(proc.stdout.readline()) == {"step": "done"}
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    if mode == "client":
        assert lines(path) == [{"n": 1}, {"n": 2}]
    else:
        assert lines(path) == [{"n": 2}]
