"""A half-migrated OpenClaw fleet on a real ``sessionlane serve`` (``examples/openclaw_switch``).

Two kinds of real processes contend on one transcript: ``dropin.mjs`` (an OpenClaw process
switched to ``sessionlane/openclaw``) and ``legacy_openclaw.py`` (one still on OpenClaw's own
``<file>.lock`` acquirer, ``sessionlane.system.race._lockfile``). In both directions the one
that holds keeps the file and the other waits, never reclaims, and is granted once the holder
lets go. Orderings are driven by what each process prints and by stdin, never by sleeps; the
"waits" halves use a short acquire budget that must run out while the other holds.

Skipped, with the reason, when ``node``/``npm`` or the package's dependencies are missing.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nodejs import NODE_DIR, built_node
from ports import listen_port
from test_serve import Serve, clean_env
from waiting import eventually

from sessionlane.actors.openclaw_lock import parse_lock_payload, process_starttime
from sessionlane.system.client import connect

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "openclaw_switch"
STEP_TIMEOUT_S = 60.0
SHORT_BUDGET_MS = 1500  # what a waiter is given when it must time out behind a holder
RECONNECT_FOR_MS = 2000  # how long the shutdown test's holder rides out the lost service
WAITER_BUDGET_MS = 10_000  # the shutdown test's waiter: queued in time, far short of 60 s


@pytest.fixture(scope="module")
def node() -> str:
    """``node``, with the package built from the sources under test."""
    return built_node("the OpenClaw drop-in tests")


@pytest.fixture(params=[False, True], ids=["plain", "legacy_lock"])
def serve(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Serve]:
    """A serve over TCP whose root allows ``.jsonl`` transcripts and ``.json`` session stores,
    without and with ``legacy_lock`` (the service's own writes take ``<file>.lock`` too)."""
    root = tmp_path / "sessions"
    root.mkdir()
    config = tmp_path / "sessionlane.toml"
    legacy = "true" if request.param else "false"
    config.write_text(
        f'roots = ["{root}"]\nsuffixes = [".jsonl", ".json"]\nlegacy_lock = {legacy}\n'
    )
    listen = f"tcp://127.0.0.1:{listen_port()}"
    started = Serve(
        tmp_path, "--config", str(config), "--listen", listen, "--log-file", str(tmp_path / "a.log")
    )
    try:
        started.wait_ready()
        yield started
    finally:
        started.kill()


class Proc:
    """One example process; ``next()`` reads its next JSON line within a bound."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )

    def next(self, timeout_s: float = STEP_TIMEOUT_S) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        assert ready, f"no output within {timeout_s} s"
        line = self.proc.stdout.readline()
        assert line, f"exited {self.proc.wait()}: {self.stderr()}"
        event: dict[str, Any] = json.loads(line)
        return event

    def release(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("release\n")
        self.proc.stdin.flush()
        return self.next()

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read() if self.proc.poll() is not None else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def run(node: str, serve: Serve) -> Iterator[Callable[..., Proc]]:
    """``run("dropin"|"legacy", session_file, timeout_ms, label[, "service"])``: a process,
    always killed (``service``: the drop-in appends through its lease). A drop-in started with
    ``reconnect_for_ms`` rides out a lost service for that long instead of its default 60 s."""
    started: list[Proc] = []
    env = {
        **clean_env(serve.run_dir),
        "SESSIONLANE_OPENCLAW_MODULE": (NODE_DIR / "dist" / "openclaw.mjs").as_uri(),
    }

    def make(
        kind: str,
        session_file: Path,
        timeout_ms: int,
        label: str,
        *more: str,
        reconnect_for_ms: int | None = None,
    ) -> Proc:
        if kind == "dropin":
            argv = [node, str(EXAMPLE / "dropin.mjs"), serve.address]
        else:
            argv = [sys.executable, str(EXAMPLE / "legacy_openclaw.py")]
        own = dict(env)
        if reconnect_for_ms is not None:
            own["DROPIN_RECONNECT_FOR_MS"] = str(reconnect_for_ms)
        started.append(Proc([*argv, str(session_file), str(timeout_ms), label, *more], own))
        return started[-1]

    yield make
    for proc in started:
        proc.kill()


def writers(path: Path) -> list[str]:
    return [json.loads(line)["writer"] for line in path.read_text().splitlines()]


def test_the_drop_in_waits_for_an_openclaw_holder_and_is_granted_after(
    run: Callable[..., Proc], serve: Serve, tmp_path: Path
) -> None:
    transcript = tmp_path / "sessions" / "main.jsonl"
    legacy = run("legacy", transcript, 60_000, "legacy")
    held = legacy.next()
    assert held["event"] == "held"

    # While OpenClaw holds its lock, a drop-in acquire runs out of budget and names it.
    early = run("dropin", transcript, SHORT_BUDGET_MS, "early").next()
    assert early["event"] == "timeout"
    assert early["owner"].startswith(f"pid={held['pid']} alive=true ageMs=")
    assert f"{transcript}.lock" in early["message"]
    with connect(serve.address) as sl:
        assert sl.status(str(transcript)).files[0].holder is None, "the lease went back"

    # A drop-in with the whole budget waits, and is granted once OpenClaw releases.
    dropin = run("dropin", transcript, 60_000, "dropin")
    with connect(serve.address) as sl:
        eventually(
            lambda: any(f.holder is not None for f in sl.status(str(transcript)).files),
            "the drop-in to hold its lease",
            STEP_TIMEOUT_S,
        )
    assert legacy.release()["event"] == "released"
    granted = dropin.next()
    assert granted["event"] == "held"
    payload = parse_lock_payload(Path(granted["lockPath"]).read_bytes())
    assert payload is not None and payload.pid == granted["pid"]
    assert payload.starttime == process_starttime(granted["pid"])
    assert dropin.release()["event"] == "released"
    assert not Path(granted["lockPath"]).exists()
    assert writers(transcript) == ["legacy", "dropin"]


def test_an_openclaw_process_waits_for_the_drop_in_and_never_reclaims(
    run: Callable[..., Proc], tmp_path: Path
) -> None:
    transcript = tmp_path / "sessions" / "cron.jsonl"
    dropin = run("dropin", transcript, 60_000, "dropin")
    held = dropin.next()
    assert held["event"] == "held"
    lock = Path(held["lockPath"])
    before = lock.read_bytes()
    payload = parse_lock_payload(before)
    assert payload is not None
    assert (payload.pid, payload.starttime) == (held["pid"], process_starttime(held["pid"]))

    # OpenClaw's own acquirer finds the drop-in's lock alive: it times out, and leaves it.
    early = run("legacy", transcript, SHORT_BUDGET_MS, "early").next()
    assert early["event"] == "timeout"
    assert early["owner"].startswith(f"pid={held['pid']} alive=true ageMs=")
    assert lock.read_bytes() == before, "the lock file was not reclaimed"

    legacy = run("legacy", transcript, 60_000, "legacy")
    assert dropin.release()["event"] == "released"
    granted = legacy.next()
    assert granted["event"] == "held"
    assert json.loads(granted["lock"])["pid"] == granted["pid"]
    assert legacy.release()["event"] == "released"
    assert writers(transcript) == ["dropin", "legacy"]


def test_two_drop_ins_and_an_openclaw_process_take_turns(
    run: Callable[..., Proc], tmp_path: Path
) -> None:
    """Lease first, lock file second: drop-ins queue on the service, never crosswise."""
    transcript = tmp_path / "sessions" / "mixed.jsonl"
    first = run("dropin", transcript, 60_000, "first")
    assert first.next()["event"] == "held"
    second = run("dropin", transcript, 60_000, "second")
    legacy = run("legacy", transcript, 60_000, "legacy")
    assert first.release()["event"] == "released"
    # Either waiter may win the hand-off; each then waits for the other.
    order = []
    waiting = {"second": second, "legacy": legacy}
    while waiting:
        ready = [name for name, proc in waiting.items() if _readable(proc)]
        if not ready:
            continue  # nothing printed yet (each look waits up to 50 ms)
        name = ready[0]
        assert waiting[name].next()["event"] == "held"
        order.append(name)
        assert waiting.pop(name).release()["event"] == "released"
    assert writers(transcript) == ["first", *order]


def _readable(proc: Proc) -> bool:
    assert proc.proc.stdout is not None
    ready, _, _ = select.select([proc.proc.stdout], [], [], 0.05)
    return bool(ready)


def test_a_json_session_store_is_locked_when_the_suffix_is_configured(
    run: Callable[..., Proc], tmp_path: Path
) -> None:
    store = tmp_path / "sessions" / "agents" / "main" / "sessions.json"
    dropin = run("dropin", store, 60_000, "store")
    held = dropin.next()
    assert held["event"] == "held", "the directory is created as OpenClaw does"
    assert held["lockPath"] == f"{store}.lock"
    assert dropin.release()["event"] == "released"


def test_a_service_shutdown_reaches_the_drop_in_as_typed_errors(
    run: Callable[..., Proc], serve: Serve, tmp_path: Path
) -> None:
    """The holder is told (``LeaseRevoked``) and keeps the lock file; a waiter retries, then
    gets OpenClaw's timeout error naming the service; OpenClaw processes keep waiting.

    The holder rides out the lost service for ``RECONNECT_FOR_MS`` instead of the default
    60 s (what it is told once that ends is the same, whatever the window). The waiter keeps
    the default 60 s ride-out: its own budget ends its wait all the same, at 10 s."""
    transcript = tmp_path / "sessions" / "shutdown.jsonl"
    holder = run("dropin", transcript, 60_000, "holder", reconnect_for_ms=RECONNECT_FOR_MS)
    held = holder.next()
    assert held["event"] == "held"
    lock = Path(held["lockPath"])
    before = lock.read_bytes()
    waiter = run("dropin", transcript, WAITER_BUDGET_MS, "waiter")
    waiter_started = time.monotonic()
    with connect(serve.address) as sl:
        eventually(
            lambda: len(sl.status(str(transcript)).files[0].queue) == 1,
            "the waiter to queue",
            STEP_TIMEOUT_S,
        )
    assert serve.terminate() == 0
    lost = holder.next()
    assert lost["event"] == "lost" and lost["error"] == "LeaseRevoked", lost
    assert lost["reason"] in {"shutdown", "connection_lost", "actor_restart"}, lost
    assert lock.read_bytes() == before, "the caller has not released: the lock file stays"
    legacy = run("legacy", transcript, SHORT_BUDGET_MS, "legacy").next()
    assert legacy["event"] == "timeout", "an un-migrated process still waits"
    gave_up = waiter.next(timeout_s=WAITER_BUDGET_MS / 1000 + 20)
    assert gave_up["event"] == "timeout"
    took = time.monotonic() - waiter_started
    assert took < WAITER_BUDGET_MS / 1000 + 20, f"{took:.0f} s: the ride-out, not the budget"
    assert "sessionlane service" in gave_up["owner"], gave_up
    assert holder.release()["event"] == "released"
    assert not lock.exists()


def test_the_drop_in_writes_through_its_lease_under_its_own_lock_file(
    run: Callable[..., Proc], tmp_path: Path
) -> None:
    """With ``legacy_lock`` on, the service's write under the drop-in's lease goes under the
    lock file the drop-in holds for that lease (it names it), instead of waiting for it."""
    transcript = tmp_path / "sessions" / "service.jsonl"
    dropin = run("dropin", transcript, 60_000, "dropin", "service")
    held = dropin.next()
    assert held["event"] == "held"
    lock = Path(held["lockPath"])
    assert json.loads(lock.read_text())["sessionlaneLease"]
    early = run("legacy", transcript, SHORT_BUDGET_MS, "early").next()
    assert early["event"] == "timeout"
    assert dropin.release()["event"] == "released"
    assert writers(transcript) == ["dropin"]
    assert not lock.exists()
