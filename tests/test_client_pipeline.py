"""Pipelined appends (``Lease.append_pipelined``), on both client surfaces, against a real service.

Many appends in flight on one lease are acknowledged in order and land in the file in order;
when one fails, none after it is written, and ``PipelineBroken`` says which were. The failure
is placed by the records themselves (an oversized one at a known index, checked only by the
service) or by a lease that is already gone, never by timing. The pure rule is in
``test_pipeline_model.py``.
"""

# ruff: noqa: F811  (the fixtures of client_surfaces are imported, then named as arguments)

from __future__ import annotations

import json
import pickle
import secrets
from pathlib import Path
from typing import Any

import pytest
from client_surfaces import (  # noqa: F401 (fixtures)
    MAX_RECORD_BYTES,
    Surface,
    client,
    clients,
    file_status,
    lines,
    path,
    pool,
    root,
    service,
    sl,
)
from pydantic import ValidationError
from test_disk_service import small_tmpfs
from test_gateway import RawConn
from waiting import eventually

from sessionlane.messages.errors import (
    DiskFull,
    InvalidRecord,
    LeaseRevoked,
    PipelineBroken,
    StaleFence,
    TooLarge,
)
from sessionlane.messages.wire import Append, Appended, Error, Granted
from sessionlane.system.client import AppendResult
from sessionlane.system.client import _ops as ops
from sessionlane.system.client import _pipeline as pipelines
from sessionlane.system.client._core import ClientCore, ConnectionLost, Settings
from sessionlane.system.runtime.service import embedded_service

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(60)]


def test_a_pipeline_is_acknowledged_in_order_and_written_in_order(sl: Any, path: str) -> None:
    with sl.lane("agent").lease(path) as lease:
        assert lease is not None
        first = lease.append({"n": -1})
        results = lease.append_pipelined([{"n": n} for n in range(300)], window=16)
        last = lease.append({"n": 300})
    assert [r["n"] for r in lines(path)] == list(range(-1, 301))
    assert len(results) == 300 and all(isinstance(r, AppendResult) for r in results)
    assert all(r.lines == 1 and r.fence == lease.fence for r in results)
    offsets = [first.offset, *(r.offset for r in results), last.offset]
    assert offsets == sorted(set(offsets))  # in order, each after the one before
    with open(path, "rb") as f:
        data = f.read()
    for n, result in enumerate(results):  # each offset is where its own record starts
        assert data[result.offset :].startswith(f'{{"n":{n}}}\n'.encode())


def test_a_failed_append_stops_the_ones_after_it_and_the_error_says_which_were_written(
    client: Surface, service: Any, path: str
) -> None:
    records: list[dict[str, Any]] = [{"n": n} for n in range(100)]
    records[40] = {"big": "x" * MAX_RECORD_BYTES}  # over the service's max_record_bytes
    # max_record_bytes=None: the client leaves the size to the service, which refuses it.
    sl = client.connect(service.address, timeout=10.0, max_record_bytes=None)
    with sl, sl.lane("agent").lease(path) as lease:
        assert lease is not None
        with pytest.raises(PipelineBroken) as caught:
            lease.append_pipelined(records, window=64)
        error = caught.value
        assert error.code == "pipeline_broken"
        # Groups of 16 records (a quarter of the window), each one append, all or nothing:
        # the group of records 32 to 47 is refused whole, the two before it are written.
        assert error.failed == 32 and error.unknown == 0
        assert isinstance(error.cause, InvalidRecord)
        assert [r.lines for r in error.written] == [1] * 32
        assert "record 32 and the ones after it were not written" in error.detail
        assert lease.revoked is None
        lease.append({"n": "after"})  # the lease is fine after a broken pipeline
        # The group of 48 to 63 left in the first window, before the answer to 32: refused.
        assert file_status(sl, path).counters["pipeline_broken"] >= 1
    assert [r["n"] for r in lines(path)] == [*range(32), "after"]
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.failed, copy.unknown, copy.written) == (32, 0, error.written)
    assert isinstance(copy.cause, InvalidRecord)


def test_a_pipeline_on_a_lease_that_is_gone_writes_nothing(
    client: Surface, sl: Any, path: str
) -> None:
    lane = sl.lane("agent")
    with lane.lease(path) as lease:
        assert lease is not None
        lease.append({"n": 0})
    with lane.lease(path) as newer:
        assert newer is not None
        stale = client.forged(sl, lease, lane="agent")  # its holder has not heard yet
        with pytest.raises(PipelineBroken) as caught:
            stale.append_pipelined([{"n": n} for n in range(1, 40)], window=8)
        assert isinstance(caught.value.cause, StaleFence)
        assert caught.value.written == () and caught.value.failed == 0
        assert caught.value.unknown == 0
        assert newer.revoked is None
    assert lines(path) == [{"n": 0}]
    with pytest.raises(LeaseRevoked):  # released: refused before anything is sent
        lease.append_pipelined([{"n": 1}])


def test_a_pipelined_append_after_one_that_was_not_written_is_refused(
    client: Surface, sl: Any, path: str
) -> None:
    with sl.lane("agent").lease(path) as lease:
        assert lease is not None
        lease.append({"n": 0})
        orphan = Append(
            lease=lease.id,
            fence=lease.fence,
            records=[{"n": 1}],
            aid=secrets.token_hex(8),
            after=secrets.token_hex(8),  # never written
        )
        reply = client.request(sl, orphan, 5.0)
        assert isinstance(reply, Error) and reply.code == "pipeline_broken"
        assert "nothing was written" in reply.detail
        assert lease.revoked is None
        lease.append({"n": 2})
    assert lines(path) == [{"n": 0}, {"n": 2}]


def test_bad_pipeline_arguments_raise_before_anything_is_sent(sl: Any, path: str) -> None:
    with sl.lane("agent").lease(path) as lease:
        assert lease is not None
        for window in (0, -1, 1.5, True, 10_000):
            with pytest.raises(ValueError, match="window"):
                lease.append_pipelined([{"n": 1}], window=window)
        with pytest.raises(InvalidRecord):
            lease.append_pipelined([{"n": 1}, {"n": float("nan")}])
        with pytest.raises(InvalidRecord):
            lease.append_pipelined([])
        lease.append({"n": 0})
    assert lines(path) == [{"n": 0}]


def test_the_service_refuses_a_malformed_after_as_a_bad_frame_and_writes_nothing(
    sl: Any, service: Any, path: str
) -> None:
    with sl.lane("agent").lease(path) as lease:
        assert lease is not None
        lease.append({"n": 0})
    raw = RawConn(service.address)
    try:
        raw.hello()
        granted = raw.request({"type": "acquire", "lane": "raw", "path": path, "purpose": "prompt"})
        base = {"type": "append", "lease": granted["lease"], "fence": granted["fence"]}
        aid = secrets.token_hex(8)
        for bad in (
            {"after": aid},  # no aid of its own
            {"aid": aid, "after": aid},  # after itself
            {"aid": aid, "after": "short"},  # not an aid
            {"offsets": "yes"},  # not a bool
            {"offsets": 1},
            {"offsets": [0]},
            {"offset": True},  # no such field
        ):
            reply = raw.request(base | {"records": [{"n": "bad"}]} | bad)
            assert reply["type"] == "error" and reply["code"] == "bad_frame", (bad, reply)
        fine = raw.request(base | {"records": [{"n": 1}], "aid": aid})
        assert fine["type"] == "appended", fine
    finally:
        raw.close()
    assert lines(path) == [{"n": 0}, {"n": 1}]


def test_an_append_that_asks_gets_the_offset_of_each_line_in_the_file(
    sl: Any, service: Any, path: str
) -> None:
    """On the raw wire: an append of several records with ``offsets`` is answered where each
    of its lines starts (multi-byte characters included), under a lease and without one; one
    that does not ask is answered as before, with no ``offsets``."""
    with sl.lane("agent").lease(path) as lease:
        assert lease is not None
        lease.append({"n": 0})
    raw = RawConn(service.address)
    records = [{"s": "ü" * n, "n": n} for n in range(5)]
    try:
        raw.hello()
        granted = raw.request({"type": "acquire", "lane": "raw", "path": path, "purpose": "prompt"})
        base = {"type": "append", "lease": granted["lease"], "fence": granted["fence"]}
        plain = raw.request(base | {"records": records[:2]})
        assert plain["type"] == "appended" and "offsets" not in plain, plain
        asked = raw.request(base | {"records": records, "offsets": True})
        assert asked["type"] == "appended" and asked["lines"] == 5, asked
        assert asked["offsets"][0] == asked["offset"] > plain["offset"]
        raw.request({"type": "release", "lease": granted["lease"]})
        laneless = raw.request(
            {"type": "append", "lane": "raw", "path": path, "records": records[3:], "offsets": True}
        )
        assert laneless["type"] == "appended" and len(laneless["offsets"]) == 2, laneless
    finally:
        raw.close()
    data = Path(path).read_bytes()
    for offsets, written in ((asked["offsets"], records), (laneless["offsets"], records[3:])):
        for offset, record in zip(offsets, written, strict=True):
            line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
            assert data[offset:].startswith(line.encode()), (offset, record)
    assert len(lines(path)) == 1 + 2 + 5 + 2


def test_a_pipeline_goes_in_groups_of_a_quarter_window_cut_short_at_the_frame_limit(
    client: Surface, service: Any, path: str
) -> None:
    """The service counts appends and records: 64 records with window 16 go in 16 appends of
    4; with a client held to frames of 4 KiB, 1 KiB records go 3 to an append. Each
    record's result is where its line is."""
    records = [{"n": n, "pad": "x" * 1000} for n in range(12)]
    sl = client.connect(service.address, timeout=10.0, max_frame_bytes=4096)
    with sl, sl.lane("agent").lease(path) as lease:
        assert lease is not None
        small = lease.append_pipelined([{"n": n} for n in range(64)], window=16)
        counters = file_status(sl, path).counters
        assert (counters["appends"], counters["records"]) == (16, 64)
        big = lease.append_pipelined(records, window=64)
        counters = file_status(sl, path).counters
        assert (counters["appends"], counters["records"]) == (16 + 4, 64 + 12)  # groups of 3
    data = Path(path).read_bytes()
    expected = [{"n": n} for n in range(64)] + records
    for record, result in zip(expected, small + big, strict=True):
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        assert data[result.offset : result.offset + len(line)] == line


def test_a_disk_that_fills_stops_a_grouped_pipeline_at_a_group_and_says_which_records_were(
    client: Surface, tmp_path: Path
) -> None:
    """A 64 KiB file system fills in the middle of a pipeline of groups of 16 (window 64): the
    group whose write failed and every one after it are not in the file (a partial write is
    cut), the records of the groups acknowledged are, each at its offset; ``failed`` is the
    first record of the failed group, whose 16 records are of unknown outcome to the client
    (a failed write, as for one append), and the later groups were refused."""
    with (
        small_tmpfs(tmp_path / "small") as small,
        embedded_service([str(small)], log_file=tmp_path / "service.log") as service,
    ):
        path = str(small / "full.jsonl")
        records = [{"n": n, "pad": "x" * 480} for n in range(192)]  # 95 KB: more than fits
        sl = client.connect(service.address, timeout=10.0)
        with sl, sl.lane("agent").lease(path) as lease:
            assert lease is not None
            with pytest.raises(PipelineBroken) as caught:
                lease.append_pipelined(records, window=64)
            error = caught.value
            assert isinstance(error.cause, DiskFull), error.cause
            assert error.failed == len(error.written) and error.failed % 16 == 0
            assert 0 < error.failed < 192 and error.unknown == 16
            assert lease.revoked is None
        data = Path(path).read_bytes()
    written = [json.loads(line) for line in data.splitlines()]
    assert written == records[: error.failed]
    for record, result in zip(records, error.written, strict=False):
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        assert data[result.offset : result.offset + len(line)] == line


def test_the_wire_refuses_an_after_without_its_own_aid_or_lease() -> None:
    aid = secrets.token_hex(8)
    with pytest.raises(ValidationError, match="after"):
        Append(lease="l-1", fence=1, records=[{}], after=aid)
    with pytest.raises(ValidationError, match="after"):
        Append(lane="a", path="/p.jsonl", records=[{}], aid=aid, after=secrets.token_hex(8))
    with pytest.raises(ValidationError, match="itself"):
        Append(lease="l-1", fence=1, records=[{}], aid=aid, after=aid)


def test_status_counts_refused_pipelined_appends(sl: Any, path: str) -> None:
    with sl.lane("agent").lease(path) as lease:
        assert lease is not None
        lease.append_pipelined([{"n": n} for n in range(5)])
    counters = eventually(lambda: file_status(sl, path).counters, "status")
    assert counters["pipeline_broken"] == 0 and counters["records"] == 5


# The window, without a service -------------------------------------------------------------


def test_a_pipe_keeps_at_most_its_window_unanswered_and_stops_after_an_error() -> None:
    pipe = pipelines.Pipe(ops.Batch(list(range(10)), window=4))
    assert pipe.to_send() == [0, 1, 2, 3] and pipe.to_send() == []
    pipe.answered(Appended(offset=0, lines=1, fence=1))
    assert pipe.to_send() == [4] and pipe.waiting == 4
    pipe.answered(Error(code="invalid_record", detail="too big"))
    assert pipe.to_send() == [] and pipe.waiting == 3  # the ones sent are still awaited
    for _ in range(3):
        pipe.answered(Error(code="pipeline_broken"))
    assert pipe.waiting == 0 and len(pipe.result()) == 5


def test_a_pipe_whose_sending_failed_sends_nothing_more_and_ends_with_why() -> None:
    pipe = pipelines.Pipe(ops.Batch(list(range(10)), window=4))
    assert pipe.to_send() == [0, 1, 2, 3]
    pipe.not_sent(2, TooLarge("frame too big"))  # 2 and 3 never left
    assert pipe.waiting == 2 and pipe.to_send() == []
    pipe.answered(Appended(offset=0, lines=1, fence=1))
    pipe.answered(Appended(offset=9, lines=1, fence=1))
    *acked, last = pipe.result()
    assert len(acked) == 2 and isinstance(last, TooLarge)


def test_a_wide_window_is_refilled_a_quarter_at_a_time_and_the_tail_sent_whole() -> None:
    pipe = pipelines.Pipe(ops.Batch(list(range(70)), window=16))
    assert pipe.to_send() == list(range(16))
    for answered in range(1, 4):
        pipe.answered(Appended(offset=0, lines=1, fence=1))
        assert pipe.to_send() == [], f"refilled after {answered} answers"
    pipe.answered(Appended(offset=0, lines=1, fence=1))
    assert pipe.to_send() == [16, 17, 18, 19]  # a quarter of the window at once
    for _ in range(16):
        pipe.answered(Appended(offset=0, lines=1, fence=1))
    assert pipe.to_send() == list(range(20, 36)) and pipe.waiting == 16
    for _ in range(32):
        pipe.answered(Appended(offset=0, lines=1, fence=1))
        pipe.to_send()
    assert pipe.sent == 68 and pipe.waiting == 16
    pipe.answered(Appended(offset=0, lines=1, fence=1))
    assert pipe.to_send() == []  # one of the last two fits: wait until both do
    pipe.answered(Appended(offset=0, lines=1, fence=1))
    assert pipe.to_send() == [68, 69] and pipe.waiting == 16


@pytest.mark.parametrize(
    "request_",
    [
        Append(lease="L-1", fence=3, records=[{"n": 1, "none": None, "t": [1, 2]}], aid="a" * 16),
        Append(
            lease="L-1",
            fence=3,
            records=[{"n": 1}, {"deep": [{"x": 1.5}]}],
            aid="b" * 16,
            after="a" * 16,
            durability="flush",
        ),
        Append(lane="agent", path="/p/x.jsonl", records=[{"s": "ü"}]),
    ],
)
def test_a_pipelined_append_frame_is_the_frame_of_its_model(request_: Append) -> None:
    from sessionlane.messages.codec import decode_request, frame

    made = pipelines.append_frame(request_, 41)
    assert made == frame(request_.model_copy(update={"id": 41}))
    assert decode_request(made[4:]) == request_.model_copy(update={"id": 41})
    fields = {"v", "id", "type", "records", *pipelines._APPEND_OPTIONAL}
    assert set(Append.model_fields) == fields  # a new field must be added to append_frame


@pytest.mark.parametrize("after", [None, "c" * 16])
@pytest.mark.parametrize("durability", [None, "fsync"])
def test_a_pipelined_append_is_on_the_wire_the_append_model_the_service_validates(
    after: str | None, durability: Any
) -> None:
    from sessionlane.messages.codec import decode_request, frame

    fields: dict[str, Any] = {"lease": "L-9", "fence": 4, "records": [{"n": 1}], "aid": "d" * 16}
    piped = pipelines.PipelinedAppend(after=after, durability=durability, **fields)
    model = Append(after=after, durability=durability, **fields)
    assert pipelines.append_frame(piped, 7) == frame(model.model_copy(update={"id": 7}))
    assert decode_request(pipelines.append_frame(piped, 7)[4:]) == model.model_copy(
        update={"id": 7}
    )


def test_frames_are_grouped_into_writes_of_about_the_size_never_split() -> None:
    frames = [b"a" * 100, b"b" * 100, b"c" * 300, b"d" * 10]
    assert list(pipelines.grouped(frames, 250)) == [b"a" * 100 + b"b" * 100, b"c" * 300, b"d" * 10]
    assert list(pipelines.grouped([], 250)) == []
    assert b"".join(pipelines.grouped(frames, 1)) == b"".join(frames)


# Riding out a restart, without a service ----------------------------------------------------


def test_a_resent_pipeline_stopped_by_a_forgotten_append_says_all_sent_before_are_unknown() -> None:
    """Four appends of two records each were in flight when the service died: one was
    answered before. After the reclaim they are resent one at a time; the first is answered
    from the lease record, the next refused (written before the crash, no longer remembered):
    every record sent before the crash from there on may be in the file, whatever its
    resend was answered."""
    core = ClientCore(Settings("tcp://127.0.0.1:7420", None, keepalive=5.0))
    granted = Granted(id=1, lease="L1", fence=7, path="/s/a.jsonl", purpose="prompt")
    state = core.track(granted, "agent")
    state.secret = "s" * 32
    lease = ops.LeaseView(state, "agent")
    op = pipelines.lease_append_pipelined(core, lease, [{"n": n} for n in range(12)], 8, None)
    batch = ops.advance(op, None)
    # groups of two records (a quarter of the window), four groups (eight records) in flight
    assert isinstance(batch, ops.Batch) and (len(batch.requests), batch.window) == (6, 4)
    assert [len(r.records) for r in batch.requests] == [2] * 6
    assert [r.after for r in batch.requests[1:]] == [r.aid for r in batch.requests[:-1]]
    state.suspended = True  # what a lost connection does to a lease it may take back
    lost = ConnectionLost("connection lost before the reply")
    outcomes: list[Any] = [Appended(offset=0, lines=2, fence=7, offsets=[0, 8]), *[lost] * 3]
    reclaim = ops.advance(op, outcomes)
    assert isinstance(reclaim, ops.Call) and reclaim.request.reclaim.lease == "L1"
    resend = ops.advance(
        op, Granted(id=2, lease="L1", fence=7, path="/s/a.jsonl", purpose="prompt")
    )
    assert isinstance(resend, ops.Batch) and resend.window == 1
    assert resend.requests == batch.requests[1:4]  # only those sent before the crash
    remembered = Appended(offset=16, lines=2, fence=7, offsets=[16, 24])
    with pytest.raises(PipelineBroken) as caught:
        ops.advance(op, [remembered, Error(code="pipeline_broken", detail="not the last")])
    error = caught.value
    assert [r.offset for r in error.written] == [0, 8, 16, 24]
    assert (len(error.written), error.failed, error.unknown) == (4, 4, 4)
    assert "records 4 to 7 may or may not be in the file" in error.detail
    assert error.cause is not None and error.cause.code == "pipeline_broken"


def test_an_append_acknowledged_after_the_stop_makes_the_ones_before_it_unknown() -> None:
    """A convention's member that resent a restarted owner's appends for us, all at once,
    can have one refused (written, no longer remembered) and a later one written: the client
    never says a written append was not."""
    core = ClientCore(Settings("tcp://127.0.0.1:7420", None, keepalive=5.0))
    granted = Granted(id=1, lease="L1", fence=7, path="/s/a.jsonl", purpose="prompt")
    lease = ops.LeaseView(core.track(granted, "agent"), "agent")
    op = pipelines.lease_append_pipelined(core, lease, [{"n": n} for n in range(12)], 8, None)
    assert isinstance(ops.advance(op, None), ops.Batch)  # six appends of two records
    refused = Error(code="pipeline_broken", detail="not the last written")
    outcomes = [Appended(offset=0, lines=2, fence=7, offsets=[0, 5]), refused, refused]
    outcomes += [Appended(offset=9, lines=2, fence=7, offsets=[9, 14]), refused, refused]
    with pytest.raises(PipelineBroken) as caught:
        ops.advance(op, outcomes)
    # records 2 to 7 (the appends refused, and the one written after them) may be in the file
    assert (len(caught.value.written), caught.value.failed, caught.value.unknown) == (2, 2, 6)
