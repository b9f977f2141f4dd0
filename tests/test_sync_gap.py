"""An append whose fdatasync failed is never answered as written from the lease record.

The lease record (``actors/reclaim.py``) keeps the holder's last append ids so that an append
resent after a lost connection or a restart is answered as it was, not written twice. An id
enters the record when its append is written, before the fdatasync that makes it durable;
if that sync fails, the append is answered with the sync's error and the record must forget
the id again (and be rewritten before that error leaves), whatever the call: a plain append,
a pipelined one, one that releases. A resend then writes it again. The same holds for a write
that fails or is refused (its id never enters the record), and for a copy of the append
resent under another call key while its first answer waits for the sync: it waits for the
same sync.

Two layers: the pure core (``FileCore``, driven by the ``Shell`` of
``tests/test_append_release.py``, every effect in order) and a real service on a real file
whose fdatasync fails (the transcript's ``sync`` made to fail in the test process, which the
service's actor processes are forked from), killed with SIGKILL and restarted, its lease
record read from the disk: raw frames resending as a client does, and the Python and Node
clients' pipelines riding out a service that died between its failed sync and the errors. The
Hypothesis model of the core (``tests/test_file_core_model.py``) checks the same over every
interleaving.
"""

# ruff: noqa: F811  (the client surface and restarts fixtures are imported, then named as arguments)

from __future__ import annotations

import errno
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from client_surfaces import CLIENT_KEEPALIVE, Surface, client, lines  # noqa: F401 (fixture)
from nodejs import node_script
from test_append_release import FENCE, SECRET, Shell, new_core
from test_disk_service import fill_up, small_tmpfs
from test_gateway import RawConn
from test_restarts import Restarts, crash, node_or_skip, restarts  # noqa: F401 (fixture)
from test_session_file_core import NOW, PATH
from waiting import eventually

from sessionlane.actors.lease_record_file import LeaseRecordFile, lease_record_path
from sessionlane.actors.reclaim import parse_record
from sessionlane.actors.session_file_commit import SyncFailure
from sessionlane.actors.session_file_disk import WriteOutcome
from sessionlane.actors.session_file_effects import Deliver, WriteRecord
from sessionlane.actors.session_file_write_effects import WriteOut
from sessionlane.actors.session_file_writes import Commit
from sessionlane.actors.transcript import Transcript
from sessionlane.messages.errors import IOFailure, PipelineBroken
from sessionlane.messages.wire import (
    Acquire,
    Append,
    Appended,
    Error,
    Granted,
    ReclaimTicket,
    Release,
)
from sessionlane.system.client import connect
from sessionlane.system.runtime.service import embedded_service

# The pure core ---------------------------------------------------------------------------------


class Recording(Shell):
    """The test shell, recording what it performs in order (``log``) and failing the writes
    ``fail_writes`` says (``ENOSPC`` at ``write``: nothing of the append is in the file)."""

    def __init__(self, fence_floor: int = FENCE) -> None:
        super().__init__(new_core(fence_floor))
        self.log: list[tuple[str, Any]] = []
        self.fail_writes = False

    def perform(self, fx: Any) -> None:
        match fx:
            case WriteRecord(record=record):
                self.log.append(("record", aids(record)))
            case Commit():
                self.log.append(("sync", "failed" if self.sync_fails else "ok"))
            case Deliver(message=reply):
                self.log.append(("deliver", reply.message))
            case WriteOut(op=op, rest=rest) if self.fail_writes:
                error = OSError(errno.ENOSPC, "No space left on device")
                self.c.written(op, WriteOutcome(error=error), 0.0, 1, self.c.size, rest)
                return
        super().perform(fx)

    def acquire(self, lane: str = "a") -> Granted:
        [granted] = self.send(lane, Acquire(lane=lane, path=PATH, purpose="prompt"), 1)
        assert isinstance(granted, Granted)
        return granted

    def append(
        self, lease: Granted, aid: str, rid: int, *, after: str | None = None, end: bool = True
    ) -> list[Any]:
        request = Append(
            lease=lease.lease,
            fence=lease.fence,
            records=[{"aid": aid}],
            aid=aid,
            after=after,
        )
        return self.send("a", request, rid, end=end)


def aids(record: Any) -> list[str]:
    return [a.aid for a in record.appends]


def test_a_plain_append_whose_sync_failed_is_forgotten_by_the_record_and_written_again() -> None:
    s = Recording()
    lease = s.acquire()
    [first] = s.append(lease, "aid-00001", 2)
    assert isinstance(first, Appended)
    s.sync_fails = True
    [failed] = s.append(lease, "aid-00002", 3)
    assert isinstance(failed, Error) and failed.code == "disk_full"
    assert aids(s.record) == ["aid-00001"], "the record on disk keeps an append never synced"
    assert aids(s.c.book.record) == ["aid-00001"]
    s.sync_fails = False
    size = s.c.size
    [again] = s.append(lease, "aid-00002", 4)  # resent by the client, as after a lost answer
    assert isinstance(again, Appended) and again.offset == size, "answered from the record"
    assert s.c.size > size and aids(s.record) == ["aid-00001", "aid-00002"]
    [old] = s.append(lease, "aid-00001", 5)  # the synced one is still answered from the record
    assert isinstance(old, Appended) and (old.offset, old.lines) == (first.offset, first.lines)
    assert s.c.size == size + 1, "an append synced before the failure was written twice"


def test_the_record_that_had_the_failed_append_is_rewritten_before_its_error_leaves() -> None:
    s = Recording()
    lease = s.acquire()
    s.append(lease, "aid-00001", 2)
    s.sync_fails = True
    del s.log[:]
    s.append(lease, "aid-00002", 3)
    # Written with the append's id before the fdatasync (a kill -9 while it syncs leaves a
    # record that counts the write); the sync fails; the record without it, then the error.
    assert [what for what, _ in s.log] == ["record", "sync", "record", "deliver"], s.log
    assert s.log[0][1] == ["aid-00001", "aid-00002"] and s.log[2][1] == ["aid-00001"]
    assert isinstance(s.log[3][1], Error)


def test_a_pipeline_whose_sync_failed_is_written_again_when_resent_after_a_restart() -> None:
    """The client resends a pipeline's unanswered appends after a restart, one at a time,
    each naming the one before it: the synced ones are answered from the record, the ones
    whose sync failed are written again (the pipeline goes on from the last synced one)."""
    p = [f"pipe-{n:04d}" for n in range(6)]  # p[n] names p[n - 1] (``after``)
    s = Recording()
    lease = s.acquire()
    synced = [s.append(lease, p[1], 2)[0], s.append(lease, p[2], 3, after=p[1])[0]]
    s.sync_fails = True
    s.append(lease, p[3], 4, after=p[2], end=False)  # one pass, one sync
    s.append(lease, p[4], 5, after=p[3], end=False)
    assert [type(m) for m in s.append(lease, p[5], 6, after=p[4])] == [Error] * 3
    assert aids(s.record) == p[1:3]
    record = s.record  # the service is killed: what the sidecar holds
    assert record.held is not None
    r = Recording(fence_floor=record.held.fence)  # the durable fence reservation
    r.c.ino, r.c.size = record.ino, record.size
    assert r.c.activate(record, NOW, NOW + 10_000, 0.0) is None
    ticket = ReclaimTicket(lease=lease.lease, fence=lease.fence, secret=SECRET)
    [back] = r.send("a", Acquire(lane="a", path=PATH, purpose="prompt", reclaim=ticket), 1)
    assert isinstance(back, Granted) and back.fence == lease.fence
    for n in (1, 2):  # resent one at a time, as the client does after a restart
        [ack] = r.append(lease, p[n], n + 1, after=p[n - 1] if n > 1 else None)
        assert ack == synced[n - 1].model_copy(update={"id": n + 1}), "not from the record"
    for n in (3, 4, 5):
        size = r.c.size
        [ack] = r.append(lease, p[n], n + 1, after=p[n - 1])
        assert isinstance(ack, Appended), ack
        assert ack.offset == size and r.c.size == size + 1, f"{p[n]} answered from the record"
    assert aids(r.record) == p[1:]


def test_an_append_whose_write_failed_or_was_refused_never_enters_the_record() -> None:
    s = Recording()
    lease = s.acquire()
    s.fail_writes = True
    [failed] = s.append(lease, "aid-00001", 2)
    assert isinstance(failed, Error) and failed.code == "disk_full"
    s.fail_writes = False
    stale = Append(lease=lease.lease, fence=lease.fence + 1, records=[{"n": 1}], aid="aid-00002")
    [refused] = s.send("a", stale, 3)
    assert isinstance(refused, Error) and refused.code == "stale_fence"
    assert aids(s.record) == [] and aids(s.c.book.record) == []
    for rid, aid in ((4, "aid-00001"), (5, "aid-00002")):
        size = s.c.size
        [ack] = s.append(lease, aid, rid)
        assert isinstance(ack, Appended) and ack.offset == size and s.c.size > size


def test_a_copy_resent_while_the_first_waits_for_its_sync_waits_for_it_too() -> None:
    """The first answer is held for the batch's sync when a copy comes under another call key
    (a client that lost its connection resends it): the copy is answered from the record,
    but only once the same sync succeeds; that sync failing, both get its error."""
    for fails in (True, False):
        s = Recording()
        lease = s.acquire()
        s.sync_fails = fails
        assert s.append(lease, "aid-00001", 2, end=False) == []  # held for its sync
        assert s.append(lease, "aid-00001", 3, end=False) == [], "the copy went before the sync"
        s.send("a", Release(lease="no-such-lease"), 4)  # the pass ends: its sync
        answers = {m.id: m for m in s.answers("a") if m.id in (2, 3)}
        assert sorted(answers) == [2, 3]
        if fails:
            assert all(isinstance(m, Error) for m in answers.values()), answers
            assert aids(s.record) == []
        else:
            assert all(isinstance(m, Appended) for m in answers.values()), answers
            assert answers[2].offset == answers[3].offset and aids(s.record) == ["aid-00001"]


def test_a_failed_sync_forgets_only_the_appends_it_covered() -> None:
    s = Recording()
    lease = s.acquire()
    s.append(lease, "aid-00001", 2)
    flush = Append(
        lease=lease.lease,
        fence=lease.fence,
        records=[{"n": 2}],
        aid="aid-00002",
        durability="flush",
    )
    s.sync_fails = True
    s.send("a", flush, 3, end=False)  # answered at once: no sync covers it
    s.append(lease, "aid-00003", 4)
    assert aids(s.record) == ["aid-00001", "aid-00002"]
    held = s.c.book.answered(lease.lease, "aid-00003")
    assert held is None and s.c.book.answered(lease.lease, "aid-00002") is not None


def test_the_failure_dropped_from_the_record_is_the_sync_s_own() -> None:
    """``SyncFailure`` given by the shell: every ack held is an error, every id forgotten."""
    s = Recording()
    lease = s.acquire()
    s.append(lease, "aid-00001", 2, end=False)
    s.append(lease, "aid-00002", 3, end=False)
    s.c.committed(SyncFailure("io_error", "fdatasync failed"))
    s.run()
    assert aids(s.c.book.record) == []
    assert {type(m) for m in s.answers("a") if m.id in (2, 3)} == {Error}


# A real service on a real file whose fdatasync fails -----------------------------------------


@pytest.fixture
def failing_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """While the returned path exists, the transcript's fdatasync fails with EIO, as a disk
    reports a lost write. Set in this process before a service starts: its actor processes
    are forked from it and keep the change."""
    flag = tmp_path / "fdatasync-fails"
    real = Transcript.sync

    def sync(self: Transcript, durability: Any) -> None:
        if durability == "fsync" and flag.exists():
            raise OSError(errno.EIO, "Input/output error (injected by the test)")
        real(self, durability)

    monkeypatch.setattr(Transcript, "sync", sync)
    return flag


def recorded(path: str) -> list[str]:
    """The append ids the lease record on disk answers as written."""
    return aids(parse_record(Path(lease_record_path(path)).read_bytes()))


@pytest.mark.tcp
@pytest.mark.timeout(180)
def test_an_append_whose_fdatasync_failed_is_written_again_when_resent_after_a_kill_9(
    restarts: Restarts, failing_sync: Path
) -> None:
    """Raw frames, so that the resend is exactly the client's after its answers were lost
    with the service: a reclaim, then the unanswered appends one at a time, each naming the
    one before it."""
    path = str(restarts.root / "t.jsonl")
    first = restarts.start()
    raw = RawConn(first.address)
    raw.hello()
    granted = raw.request({"type": "acquire", "lane": "agent", "path": path, "purpose": "prompt"})
    assert granted["type"] == "granted", granted

    def append(n: int, after: int | None) -> dict[str, Any]:
        request = {"type": "append", "lease": granted["lease"], "fence": granted["fence"]}
        request |= {"records": [{"n": n}], "aid": f"aid-{n:08d}"}
        return request if after is None else {**request, "after": f"aid-{after:08d}"}

    synced = raw.request(append(1, None))
    assert synced["type"] == "appended", synced
    failing_sync.touch()
    failed = raw.request(append(2, 1))
    assert (failed["type"], failed["code"]) == ("error", "io_error"), failed
    assert "fdatasync failed" in failed["detail"]
    assert recorded(path) == ["aid-00000001"], "the record answers a never synced append"
    failing_sync.unlink()
    crash(first)  # SIGKILL: the record on disk is all the next service knows
    raw.close()
    second = restarts.start()
    again = RawConn(second.address)
    try:
        again.hello()
        ticket = {"lease": granted["lease"], "fence": granted["fence"], "secret": granted["secret"]}
        reclaim = again.request(
            {
                "type": "acquire",
                "lane": "agent",
                "path": path,
                "purpose": "prompt",
                "reclaim": ticket,
            }
        )
        assert reclaim["type"] == "granted", reclaim
        first_again = again.request(append(1, None))
        assert first_again["type"] == "appended", first_again
        assert first_again["offset"] == synced["offset"], "the synced append was written twice"
        size = os.path.getsize(path)
        second_again = again.request(append(2, 1))
        assert second_again["type"] == "appended", second_again
        assert second_again["offset"] == size, "answered from the record: never written again"
        assert recorded(path) == ["aid-00000001", "aid-00000002"]
    finally:
        again.close()
    # The failed sync's line is still in the file (it was answered an error: "may or may not
    # be in the file"); the resend wrote it again.
    assert lines(path) == [{"n": 1}, {"n": 2}, {"n": 2}]


@pytest.mark.tcp
@pytest.mark.timeout(120)
def test_a_pipeline_whose_fdatasync_failed_breaks_and_its_ids_leave_the_record(
    restarts: Restarts, failing_sync: Path
) -> None:
    """What the Python client sees: ``PipelineBroken`` with the appends written before the
    failure, the rest of unknown outcome; the record on disk names the written ones only."""
    path = str(restarts.root / "p.jsonl")
    service = restarts.start()
    with connect(service.address) as sl:
        lease = sl.lane("agent").acquire(path, purpose="prompt")
        assert lease is not None
        written = lease.append_pipelined([{"n": 1}, {"n": 2}], window=2)
        before = recorded(path)
        assert len(before) == 2
        failing_sync.touch()
        with pytest.raises(PipelineBroken) as broken:
            lease.append_pipelined([{"n": 3}, {"n": 4}, {"n": 5}], window=3)
        assert broken.value.written == () and broken.value.failed == 0
        # unknown: those the failed sync covered (one pass took 1 to 3 of them; any after
        # them were refused ``pipeline_broken``, not written)
        assert isinstance(broken.value.cause, IOFailure) and 1 <= broken.value.unknown <= 3
        assert recorded(path) == before, "the record answers appends whose sync failed"
        failing_sync.unlink()
        again = lease.append_pipelined([{"n": 3}, {"n": 4}, {"n": 5}], window=3)
        assert [r.offset for r in again] == sorted(r.offset for r in again)
        assert again[0].offset > written[-1].offset
        lease.release()


@pytest.mark.tcp
@pytest.mark.timeout(120)
def test_an_append_whose_write_failed_on_a_full_disk_is_not_in_the_record_and_is_written_again(
    tmp_path: Path,
) -> None:
    """The other path of the same fault, on a real full file system (a 64 KiB tmpfs; root
    only): the write itself fails (ENOSPC), nothing of it stays in the file, its id never
    enters the lease record, and resent once space is freed it is written."""
    with small_tmpfs(tmp_path / "small") as small, embedded_service([str(small)]) as service:
        path = str(small / "s.jsonl")
        raw = RawConn(service.address)
        try:
            raw.hello()
            lease = raw.request({"type": "acquire", "lane": "a", "path": path, "purpose": "prompt"})
            assert lease["type"] == "granted", lease
            pad = "x" * 1500

            def append(n: int) -> dict[str, Any]:
                fields = {"lease": lease["lease"], "fence": lease["fence"], "aid": f"aid-{n:08d}"}
                return raw.request({"type": "append", "records": [{"n": n, "pad": pad}]} | fields)

            assert append(1)["type"] == "appended"  # the transcript and sidecars take pages
            filler = fill_up(small)
            answers = [append(n) for n in range(2, 6)]  # the transcript's page fills, then ENOSPC
            failed = [n for n, a in zip(range(2, 6), answers, strict=True) if a["type"] == "error"]
            assert failed and all(answers[n - 2]["code"] == "disk_full" for n in failed), answers
            written = [f"aid-{n:08d}" for n in range(1, 6) if n not in failed]
            assert recorded(path) == written, "an append whose write failed is in the record"
            filler.unlink()  # space again: the resend of a failed one is written
            size = os.path.getsize(path)
            again = append(failed[0])
            assert again["type"] == "appended" and again["offset"] == size, again
        finally:
            raw.close()


class DeathAfterFailedSync:
    """While ``failing`` exists, the transcript's fdatasync fails with EIO; the first lease
    record written after a failure (the one without the failed appends, written before their
    errors leave) is followed by a SIGKILL of the service's actor system (``arm``), so their
    errors never reach the client. The actor processes are forked from this one when the
    service starts: they keep the patches."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.failing = tmp_path / "fdatasync-fails"
        self.failed = tmp_path / "fdatasync-failed"
        self.killed = tmp_path / "killed"
        self.group = tmp_path / "actor-system-pgid"
        real_sync, real_write = Transcript.sync, LeaseRecordFile.write

        def sync(transcript: Transcript, durability: Any) -> None:
            if durability == "fsync" and self.failing.exists():
                self.failed.touch()
                raise OSError(errno.EIO, "Input/output error (injected by the test)")
            real_sync(transcript, durability)

        def write(records: LeaseRecordFile, record: Any) -> None:
            real_write(records, record)
            if self.failed.exists():  # the record after the failed sync: die before its errors
                pgid = int(self.group.read_text())
                if os.getpgrp() == pgid:  # the service's actor system, never anything else
                    self.killed.touch()
                    os.killpg(pgid, signal.SIGKILL)

        monkeypatch.setattr(Transcript, "sync", sync)
        monkeypatch.setattr(LeaseRecordFile, "write", write)

    def arm(self, service: Any) -> None:
        """The next fdatasync of ``service`` fails, and the service dies after handling it."""
        assert service.running is not None
        self.group.write_text(str(service.running.system.pgid))
        self.failing.touch()

    def wait_and_clear(self, service: Any) -> None:
        """The service died after its failed sync: the rest of it is stopped, and the disk is
        well again for the next one."""
        eventually(self.killed.exists, "the service's death after the record of its failed sync")
        crash(service)
        for flag in (self.failing, self.failed, self.killed):
            flag.unlink()


@pytest.fixture
def death(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DeathAfterFailedSync:
    return DeathAfterFailedSync(tmp_path, monkeypatch)


def resent_after_the_failed_sync(path: str, offsets: list[int], before: int) -> None:
    """The transcript after a pipeline of ``{"n": 3..5}`` whose first sync failed, resent
    after the restart and answered at ``offsets``; ``before``: the offset of ``{"n": 2}``."""
    found = lines(path)
    assert found[:2] == [{"n": 1}, {"n": 2}] and found[-3:] == [{"n": 3}, {"n": 4}, {"n": 5}]
    unacknowledged = found[2:-3]  # what the failed sync covered: written again after it
    assert unacknowledged, "an append whose sync failed was answered from the record"
    assert unacknowledged == [{"n": 3}, {"n": 4}, {"n": 5}][: len(unacknowledged)]
    line, size = len(b'{"n":3}\n'), os.path.getsize(path)
    assert offsets == [size - (3 - i) * line for i in range(3)] and before < offsets[0]


@pytest.mark.tcp
@pytest.mark.timeout(180)
def test_the_client_resends_a_pipeline_whose_sync_failed_and_the_service_died_and_it_is_written(
    client: Surface, restarts: Restarts, death: DeathAfterFailedSync
) -> None:
    """The service dies (SIGKILL of its actor system) right after it handled a failed
    fdatasync: the lease record without the failed appends is on disk, their errors never
    reached the client. The Python client (both surfaces) rides out the restart, reclaims its
    lease and resends the pipeline's unanswered appends one at a time: the ones whose sync
    failed are written again, so the pipeline completes with every record durable (the failed
    batch's bytes stay in the file before them: they were never acknowledged)."""
    path = str(restarts.root / "p.jsonl")
    first = restarts.start()
    sl = client.connect(first.address, keepalive=CLIENT_KEEPALIVE, reconnect_for=60.0)
    outcome: list[Any] = []
    try:
        lease = sl.lane("agent").acquire(path, purpose="prompt")
        assert lease is not None
        before = lease.append_pipelined([{"n": 1}, {"n": 2}], window=2)
        death.arm(first)

        def pipeline() -> None:
            try:
                outcome.append(lease.append_pipelined([{"n": n} for n in (3, 4, 5)], window=3))
            except Exception as exc:  # reported by the assertion below
                outcome.append(exc)

        writer = threading.Thread(target=pipeline)
        writer.start()
        death.wait_and_clear(first)
        restarts.start()
        writer.join(timeout=90)
        assert not writer.is_alive()
        [results] = outcome
        assert isinstance(results, list), results
        lease.release()
    finally:
        sl.close()
    resent_after_the_failed_sync(path, [r.offset for r in results], before[-1].offset)


NODE_PIPELINE = """
const { connect } = require(process.argv[1]);
const [address, path] = process.argv.slice(2);
const emit = (line) => process.stdout.write(JSON.stringify(line) + '\\n');
(async () => {
  const sl = await connect(address, { reconnectForMs: 60000, keepaliveMs: 1000 });
  const lease = await sl.lane('node').lease(path);
  const before = await lease.appendPipelined([{ n: 1 }, { n: 2 }], { window: 2 });
  emit({ step: 'held', before: before[1].offset });
  await new Promise((go) => process.stdin.once('data', () => go(process.stdin.destroy())));
  const results = await lease.appendPipelined([3, 4, 5].map((n) => ({ n })), { window: 3 });
  emit({ step: 'appended', offsets: results.map((r) => r.offset), revoked: lease.revoked });
  await lease.release();
  await sl.close();
})().catch((err) => { emit({ step: 'error', error: String(err) }); process.exit(1); });
"""


@pytest.mark.tcp
@pytest.mark.timeout(180)
def test_the_node_client_resends_a_pipeline_whose_sync_failed_and_it_is_written(
    restarts: Restarts, death: DeathAfterFailedSync
) -> None:
    """As the Python client's test above, with the Node client's ``appendPipelined``."""
    node = node_or_skip()
    path = str(restarts.root / "node-p.jsonl")
    first = restarts.start()
    proc = node_script(node, NODE_PIPELINE, first.address, path)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        held = json.loads(proc.stdout.readline())
        assert held["step"] == "held", held
        death.arm(first)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        death.wait_and_clear(first)
        restarts.start()
        appended = json.loads(proc.stdout.readline())
        assert appended["step"] == "appended" and appended["revoked"] is None, appended
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    resent_after_the_failed_sync(path, appended["offsets"], held["before"])
