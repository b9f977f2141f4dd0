"""Fault injection: SIGKILL file actors and whole services under load; nothing acknowledged is lost.

The actor processes of a file are found the way an operator would: the processes that have
the transcript open (``/proc/<pid>/fd``). Clients are separate processes using the public
client; each logs every attempt and every acknowledgement (with ``time.monotonic()``, which is
system-wide on Linux) to its own file, and retries a failed write as a *new* record (a new
id): an unacknowledged attempt may be in the file at most once, an acknowledged one exactly
once, at the offset it was acknowledged with.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from ports import listen_port
from waiting import eventually

from sessionlane.actors.fencestore import FenceStore, fence_path
from sessionlane.actors.transcript import (
    Transcript,
    encode_records,
    leftover_temps,
    quarantine_path,
)
from sessionlane.messages.errors import SessionLaneError
from sessionlane.system.client import Lease, StaleFence, connect
from sessionlane.system.client._core import LeaseState
from sessionlane.system.config import load_settings
from sessionlane.system.runtime.service import Service, embedded_service

pytestmark = pytest.mark.tcp

# Helpers -----------------------------------------------------------------------------------


def holders_of(path: str) -> list[int]:
    """Pids of the processes (other than this one) that have ``path`` open."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        fd_dir = f"/proc/{entry}/fd"
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(f"{fd_dir}/{fd}") == path:
                        found.append(int(entry))
                        break
    return found


def gone(pid: int) -> bool:
    """Dead or a zombie (a SIGKILLed actor stays a zombie until its parent reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def kill_file_actor(path: str, timeout: float = 30.0) -> int:
    """SIGKILL the actor process that has ``path`` open; return once it is dead."""
    (pid,) = eventually(lambda: holders_of(path), f"an actor holding {path}", timeout=timeout)
    os.kill(pid, signal.SIGKILL)
    eventually(lambda: gone(pid), f"pid {pid} to die", timeout=30.0)
    return pid


def service_on(root: Path, port: int, log_file: Path) -> contextlib.AbstractContextManager[Service]:
    """A service on a fixed address, so that it can be killed and restarted in place."""
    return embedded_service([str(root)], listen=f"tcp://127.0.0.1:{port}", log_file=log_file)


def kill_service(service: Service) -> None:
    """SIGKILL every actor process of the service (admin, logger, gateway, files) at once."""
    running = service.running
    assert running is not None
    os.killpg(running.system.pgid, signal.SIGKILL)
    eventually(lambda: not running.system.members(), "the actor group to die", timeout=30.0)


def restart_service(service: Service) -> None:
    """What the supervisor does when it finds the admin dead: a fresh system, same address."""
    service.supervise_once()
    assert service.running is not None and service.running.system.alive()


def read_records(path: str) -> list[tuple[int, dict[str, Any]]]:
    """(offset, record) of every line; fails on a torn or unparsable line."""
    data = Path(path).read_bytes()
    assert not data or data.endswith(b"\n"), "torn last line"
    found, offset = [], 0
    for line in data.splitlines(keepends=True):
        found.append((offset, json.loads(line)))
        offset += len(line)
    return found


# Crash recovery and fences -----------------------------------------------------------------


def test_a_killed_file_actor_restarts_revokes_its_holder_and_fences_keep_rising(
    root: Path, tmp_path: Path
) -> None:
    path = str(root / "crash.jsonl")
    log_file = tmp_path / "svc.log"
    fences: list[int] = []
    reservations: list[int] = []
    ceilings: list[int] = []

    def note_activation(sl: Any) -> None:
        (status,) = sl.status(path).files
        reservations.append(status.counters["fence_reservations"])
        ceilings.append(FenceStore(path).load())

    with service_on(root, listen_port(), log_file) as svc:
        with connect(svc.address) as sl:
            lane = sl.lane("agent:main:chat")
            for _ in range(3):
                with lane.lease(path, purpose="prompt") as lease:
                    assert lease is not None
                    fences.append(lease.fence)
                    lease.append({"turn": len(fences)})
            note_activation(sl)
            held = lane.acquire(path, purpose="prompt")
            assert held is not None
            held.append({"turn": "held"})
            kill_file_actor(path)
            # The Registry restarts it at once; the holder is told its lease is gone.
            eventually(lambda: held.revoked, "the revocation event", timeout=30.0)
            assert held.revoked == "actor_restart"
            # A write still carrying the old lease and fence is refused and changes nothing.
            size = os.path.getsize(path)
            stale = Lease(sl, LeaseState(held.id, held.path, held.fence, "prompt"), lane.name)
            with pytest.raises(StaleFence):
                stale.append({"turn": "stale"})
            assert os.path.getsize(path) == size
            with lane.lease(path, purpose="prompt") as lease:
                assert lease is not None
                fences.append(lease.fence)
            note_activation(sl)
            # A crash in the middle of a write (simulated: a torn tail while no actor is up).
            kill_file_actor(path)
            with open(path, "ab") as fh:
                fh.write(b'{"turn":"torn","pad":"')
            with lane.lease(path, purpose="prompt") as lease:
                assert lease is not None
                fences.append(lease.fence)
                lease.append({"turn": "after"})
            note_activation(sl)
            # The file's log reaches the file through thespian's logger, which the kill below
            # takes down with whatever it has not written yet.
            eventually(lambda: "torn last line" in log_file.read_text(), "the quarantine's log")
        kill_service(svc)
        restart_service(svc)
        with connect(svc.address) as sl, sl.lane("agent:main:chat").lease(path) as lease:
            assert lease is not None
            fences.append(lease.fence)
            note_activation(sl)
    assert fences == sorted(set(fences)), fences
    assert held.fence < fences[3]
    # One durable fence write per activation, each above every fence handed out before.
    assert reservations == [1, 1, 1, 1], reservations
    assert all(b > a for a, b in itertools.pairwise(ceilings)), ceilings
    assert Path(fence_path(path)).exists()
    turns = [r["turn"] for _, r in read_records(path)]
    assert turns == [1, 2, 3, "held", "after"]
    assert Path(quarantine_path(path)).read_bytes() == b'{"turn":"torn","pad":"\n'
    assert len(re.findall(r"torn last line", log_file.read_text())) == 1


# Compaction --------------------------------------------------------------------------------


def test_sigkill_during_a_compaction_leaves_the_complete_old_or_new_file(
    root: Path, tmp_path: Path
) -> None:
    path = root / "compact.jsonl"
    old = encode_records([{"old": i, "pad": "o" * 900} for i in range(6000)], 1 << 20)
    path.write_bytes(old)
    temp = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{12}}\.tmp")
    outcomes: list[str] = []
    crashed_mid_rewrite: list[bool] = []
    with service_on(root, listen_port(), tmp_path / "svc.log") as svc, connect(svc.address) as sl:
        lane = sl.lane("compactor")
        for attempt, delay in enumerate([0.0, 0.0005, 0.002, 0.005, 0.3]):
            new_records = [{"new": attempt, "i": i, "pad": "n" * 900} for i in range(3000)]
            new = encode_records(new_records, 1 << 20)
            before = path.read_bytes()
            lease = lane.acquire(str(path), purpose="compaction")
            assert lease is not None
            rewrite = threading.Thread(target=_try, args=(lease.rewrite, new_records))
            rewrite.start()

            def temp_file_or_end(rewrite: threading.Thread = rewrite) -> str | None:
                # A loaded machine may not look while the temp file exists: then the rewrite
                # has ended (its outcome is checked all the same) before the kill lands.
                if any(temp.fullmatch(n) for n in os.listdir(root)):
                    return "temp file"
                return None if rewrite.is_alive() else "end"

            seen = eventually(
                temp_file_or_end, "the rewrite's temp file (or its end)", timeout=30.0, every=0.0002
            )
            crashed_mid_rewrite.append(seen == "temp file")
            time.sleep(delay)  # where in the rewrite the crash lands
            kill_file_actor(str(path))
            rewrite.join(timeout=60)
            after = path.read_bytes()
            assert after in (before, new), f"attempt {attempt}: a mix of old and new"
            outcomes.append("new" if after == new else "old")
            lease.release(quiet=True)
            with lane.lease(str(path), purpose="write") as again:  # the restarted actor opens it
                assert again is not None
            assert not any(temp.fullmatch(n) for n in os.listdir(root)), "temp file left behind"
    print(f"\ncompaction outcomes after SIGKILL: {outcomes}, temp file seen: {crashed_mid_rewrite}")
    assert any(crashed_mid_rewrite), "no kill was aimed at a rewrite in progress"


def _try(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except SessionLaneError as exc:
        return exc


# Load with random kills --------------------------------------------------------------------


CLIENT = (
    "import sys; from test_faults import client_process; "
    "client_process(*sys.argv[1:5], seed=int(sys.argv[5]))"
)


def client_process(address: str, path: str, log_file: str, stop_file: str, seed: int) -> None:
    """Stream appends until told to stop; log every attempt and acknowledgement."""
    from sessionlane.system.client import connect as connect_client

    rng = random.Random(seed)
    n = 0
    with open(log_file, "a", buffering=1) as log:

        def note(**event: Any) -> None:
            log.write(json.dumps({"t": time.monotonic(), **event}) + "\n")

        def record(fence: int | None) -> dict[str, Any]:
            nonlocal n
            n += 1
            pad = rng.choice([8, 64, 512, 4096]) if rng.random() > 0.02 else 200_000
            rec = {"id": f"{seed}-{n}", "fence": fence, "pad": "p" * pad}
            note(ev="try", id=rec["id"], fence=fence, pad=pad)
            return rec

        sl = connect_client(address, reconnect_for=60.0, timeout=2.0)
        lane = sl.lane(f"client-{seed}", priority=rng.choice(["interactive", "background"]))
        try:
            while not os.path.exists(stop_file):
                try:
                    if rng.random() < 0.3:
                        rec = record(None)
                        res = lane.append(path, rec)
                        note(ev="ack", id=rec["id"], offset=res.offset, fence=res.fence)
                        continue
                    asked = time.monotonic()
                    lease = lane.acquire(path, purpose="write", wait_timeout=2.0)
                    assert lease is not None
                    note(ev="grant", fence=lease.fence, asked=asked)
                    try:
                        for _ in range(rng.randint(1, 4)):
                            rec = record(lease.fence)
                            res = lease.append(rec)
                            note(ev="ack", id=rec["id"], offset=res.offset, fence=res.fence)
                    finally:
                        lease.release(quiet=True)
                except SessionLaneError as exc:
                    note(ev="error", code=exc.code, detail=str(exc)[:200])
                    time.sleep(0.02)
        finally:
            sl.close()


@dataclass
class Kill:
    what: str
    at: float
    """``time.monotonic()`` just before the kill."""
    done: float = 0.0
    """... once every killed process was dead."""


@dataclass
class History:
    tries: dict[str, dict[str, Any]] = field(default_factory=dict)
    acks: dict[str, dict[str, Any]] = field(default_factory=dict)
    grants: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    @classmethod
    def read(cls, logs: list[Path]) -> History:
        history = cls()
        for log in logs:
            for line in log.read_text().splitlines():
                event = json.loads(line)
                match event["ev"]:
                    case "try":
                        history.tries[event["id"]] = event
                    case "ack":
                        assert event["id"] not in history.acks
                        history.acks[event["id"]] = event
                    case "grant":
                        history.grants.append(event)
                    case "error":
                        history.errors[event["code"]] = history.errors.get(event["code"], 0) + 1
        return history


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_random_sigkills_of_file_actors_and_services_lose_no_acknowledged_record(
    root: Path, tmp_path: Path
) -> None:
    path = str(root / "faults.jsonl")
    stop_file = tmp_path / "stop"
    clients = 6
    rng = random.Random(int(os.environ.get("SESSIONLANE_FAULT_SEED", "0")) or None)
    kills: list[Kill] = []
    injected: list[bytes] = []
    logs = [tmp_path / f"client-{i}.log" for i in range(clients)]
    # Separate interpreters running ``client_process`` from this module (no multiprocessing:
    # its resource tracker would outlive the test and count as a leftover process).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    with service_on(root, listen_port(), tmp_path / "svc.log") as svc:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CLIENT, svc.address, path, str(log), str(stop_file), str(i)],
                env=env,
            )
            for i, log in enumerate(logs)
        ]
        try:
            eventually(lambda: holders_of(path), "the first write", timeout=60)
            started = time.monotonic()
            while len(kills) < 60 and time.monotonic() - started < 150:
                time.sleep(rng.uniform(0.05, 0.6))
                if len(kills) % 10 == 9:
                    kill = Kill("service", time.monotonic())
                    kill_service(svc)
                    kill.done = time.monotonic()
                    if len(kills) % 20 == 9:
                        # A crash mid-write leaves a partial line; nothing is up to repair it yet.
                        tear = b'{"id":"torn-' + str(len(kills)).encode() + b'","pad":"ppp'
                        with open(path, "ab") as fh:
                            fh.write(tear)
                        injected.append(tear)
                    restart_service(svc)
                else:
                    kill = Kill("file", time.monotonic())
                    try:
                        kill_file_actor(path, timeout=10.0)
                    except AssertionError:
                        continue  # no actor had the file open (passivated or restarting)
                    kill.done = time.monotonic()
                kills.append(kill)
            elapsed = time.monotonic() - started
        finally:
            stop_file.touch()
            for p in procs:
                try:
                    p.wait(timeout=90)
                finally:
                    if p.poll() is None:  # pragma: no cover - never leave a client behind
                        p.kill()
                        p.wait()
        assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]
    history = History.read(logs)
    records = read_records(path)
    print(
        f"\n{len(kills)} kill points ({sum(k.what == 'service' for k in kills)} whole-service) "
        f"in {elapsed:.0f} s; {len(history.acks)} acknowledged, {len(history.tries)} attempted, "
        f"{len(records)} lines; client errors {history.errors}"
    )
    assert len(kills) >= 50
    assert len(history.acks) > 200
    # Refusals, and writes whose answer was lost with a killed process (unknown_outcome): each
    # is an attempt, in the file at most once, as checked below.
    assert set(history.errors) <= {
        "unavailable",
        "stale_fence",
        "revoked",
        "unknown_outcome",
        "lease_timeout",
        "shutting_down",
    }

    # Every acknowledged record is in the file exactly once, where it was acknowledged.
    at: dict[str, list[int]] = {}
    for offset, rec in records:
        at.setdefault(rec["id"], []).append(offset)
    for rid, ack in history.acks.items():
        assert at.get(rid) == [ack["offset"]], (rid, ack, at.get(rid))
    # Nothing else is there but attempts, each at most once.
    for rid, offsets in at.items():
        assert rid in history.tries, f"{rid} was never attempted"
        assert len(offsets) == 1, f"{rid} appears {len(offsets)} times"

    # Fences never go back along the file: no stale holder's write lands after a newer one's.
    fences = [rec["fence"] or history.acks.get(rec["id"], {}).get("fence") for _, rec in records]
    known = [f for f in fences if f is not None]
    assert known == sorted(known)
    # ... and every grant asked for after a kill is above every fence acknowledged before it.
    for kill in kills:
        before = [a["fence"] for a in history.acks.values() if a["t"] < kill.at]
        after = [g["fence"] for g in history.grants if g["asked"] > kill.done]
        if before and after:
            assert min(after) > max(before), (kill, max(before), min(after))

    # Every quarantined byte is accounted for: an injected tear or a cut-off attempt.
    quarantine = Path(quarantine_path(path))
    tears = quarantine.read_bytes().split(b"\n")[:-1] if quarantine.exists() else []
    unacked = [
        encode_records([{"id": t["id"], "fence": t["fence"], "pad": "p" * t["pad"]}], 1 << 30)
        for rid, t in history.tries.items()
        if rid not in history.acks and rid not in at
    ]
    for tear in tears:
        if tear in injected:
            injected.remove(tear)
        else:
            assert any(line.startswith(tear) for line in unacked), tear[:80]
    assert not injected, "an injected torn tail was not quarantined"
    # Temp files of a compaction or fence reservation that a kill interrupted are gone.
    assert not leftover_temps(path) and not leftover_temps(fence_path(path))


@pytest.mark.parametrize(
    ("quarantine", "expected"),
    [
        (None, b'{"b\n'),
        (b'{"x\n{"b\n', b'{"x\n{"b\n'),  # crashed after quarantining, before truncating
        (b'{"x\n{"', b'{"x\n{"b\n'),  # crashed in the middle of the quarantine write
        (b'{"x\n{"zz', b'{"x\n{"zz\n{"b\n'),  # someone else's fragment stays a tear of its own
    ],
    ids=["fresh", "after-quarantine", "mid-quarantine", "unrelated-fragment"],
)
def test_a_torn_tail_repair_interrupted_by_a_crash_is_finished_not_repeated(
    tmp_path: Path, quarantine: bytes | None, expected: bytes
) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"a":1}\n{"b')
    if quarantine is not None:
        Path(quarantine_path(str(path))).write_bytes(quarantine)
    with Transcript(str(path)):
        pass
    assert path.read_bytes() == b'{"a":1}\n'
    assert Path(quarantine_path(str(path))).read_bytes() == expected


def test_a_request_in_flight_to_a_killed_file_actor_is_answered(root: Path, tmp_path: Path) -> None:
    # A lease-less append waits, unanswered, in the file actor's write queue while a live
    # legacy writer holds the lock; then the actor is killed.
    path = root / "inflight.jsonl"
    settings, _ = load_settings(None, env={}, overrides={"roots": [str(root)], "legacy_lock": True})
    service = Service(settings, log_file=tmp_path / "svc.log").start()
    try:
        Path(f"{path}.lock").write_text(json.dumps({"pid": os.getpid(), "createdAt": "x"}))
        with connect(service.address, timeout=60.0, keepalive=0.5) as sl:
            outcome: list[Any] = []
            call = threading.Thread(
                target=lambda: outcome.append(_try(sl.lane("w").append, str(path), {"x": 1}))
            )
            call.start()
            eventually(lambda: holders_of(str(path)), "the file actor", timeout=30.0)

            def blocked_on_legacy_lock() -> bool:
                files = sl.status(str(path)).files
                return bool(files) and files[0].counters.get("legacy_lock_waits", 0) > 0

            eventually(
                blocked_on_legacy_lock, "the append to wait for the legacy lock", timeout=30.0
            )
            kill_file_actor(str(path))
            call.join(timeout=3.0)
            answered = not call.is_alive()
        call.join()  # closing the connection ended the wait
        assert answered, "no answer (not even unavailable) 3 s after the file actor died"
    finally:
        service.stop()
