"""The client's groups of a pipeline (``_pipeline.plan_groups``, ``lease_append_pipelined``),
pure, with Hypothesis: no service, the appends' answers are scripted.

A pipeline sends its records in groups, one append per group, and still answers per record.
What must hold, whatever the records, the window, the frame limit and where the pipeline
stops:

- the groups are the records in order, each of at most a quarter of the window, each frame
  within ``max_frame_bytes`` unless one record alone is larger; a group's frame, built from
  its packed records, is the frame ``codec.frame`` makes of its ``Append`` model;
- the records of the groups acknowledged are ``written``, one result each at the offset its
  group's answer gave; ``failed`` is the first record of the group that failed; ``unknown``
  the records of the groups that may be in the file (a failed write), none for a refusal.
"""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from sessionlane.messages.codec import decode_request, frame
from sessionlane.messages.errors import PipelineBroken
from sessionlane.messages.wire import Append, Appended, Error, Granted
from sessionlane.system.client import _ops as ops
from sessionlane.system.client import _pipeline as pipelines
from sessionlane.system.client._core import AppendResult, ClientCore, Settings

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
records_ = st.lists(
    st.dictionaries(st.text(max_size=8), _values, max_size=5), min_size=1, max_size=80
)


@settings(max_examples=200, deadline=None)
@given(
    records=records_,
    window=st.integers(min_value=1, max_value=pipelines.MAX_WINDOW),
    limit=st.none() | st.integers(min_value=1, max_value=600),
)
def test_groups_are_the_records_in_order_within_a_quarter_window_and_the_frame_limit(
    records: list[dict[str, Any]], window: int, limit: int | None
) -> None:
    groups = pipelines.plan_groups(records, window, limit, 0)
    assert [r for members, _ in groups for r in members] == records
    for members, packed in groups:
        assert 1 <= len(members) <= max(1, window // 4)
        assert packed == msgpack.packb(members, use_bin_type=True)
        if limit is not None and len(members) > 1:
            assert len(packed) <= limit


@settings(max_examples=200, deadline=None)
@given(
    records=records_,
    offsets=st.none() | st.just(True),
    after=st.none() | st.just("b" * 16),
    release=st.none() | st.just(True),
    rid=st.integers(min_value=0, max_value=2**31),
)
def test_a_group_frame_built_from_its_packed_records_is_the_frame_of_its_model(
    records: list[dict[str, Any]],
    offsets: bool | None,
    after: str | None,
    release: bool | None,
    rid: int,
) -> None:
    ((members, packed),) = pipelines.plan_groups(records, 4 * len(records), None, 0)
    piped = pipelines.PipelinedAppend(
        "L-1", 3, members, "a" * 16, after, "fsync", release, offsets=offsets, packed=packed
    )
    model = Append(
        id=rid,
        lease="L-1",
        fence=3,
        records=records,
        aid="a" * 16,
        after=after,
        durability="fsync",
        release=release,
        offsets=offsets,
    )
    made = pipelines.append_frame(piped, rid)
    assert made == frame(model)
    assert decode_request(made[4:]) == model


def _line(n: int) -> int:
    return len(f'{{"n":{n}}}\n')


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(min_value=1, max_value=200),
    window=st.integers(min_value=1, max_value=128),
    stop=st.none()
    | st.tuples(st.integers(min_value=0), st.sampled_from(["invalid_record", "disk_full"])),
)
def test_a_stopped_pipeline_of_groups_says_which_records_were_written(
    count: int, window: int, stop: tuple[int, str] | None
) -> None:
    core = ClientCore(Settings("tcp://127.0.0.1:7420", None, keepalive=5.0))
    granted = Granted(id=1, lease="L1", fence=7, path="/s/a.jsonl", purpose="prompt")
    lease = ops.LeaseView(core.track(granted, "agent"), "agent")
    records = [{"n": n} for n in range(count)]
    op = pipelines.lease_append_pipelined(core, lease, records, window, None)
    batch = ops.advance(op, None)
    assert isinstance(batch, ops.Batch)
    groups = [len(r.records) for r in batch.requests]
    assert sum(groups) == count and max(groups) <= max(1, window // 4)
    assert batch.window * groups[0] <= window  # records in flight, at most the window
    failed_group = None if stop is None else stop[0] % len(groups)
    outcomes: list[Any] = []
    at = 0
    for index, request in enumerate(batch.requests):
        size = len(request.records)
        if failed_group is not None and index == failed_group:
            assert stop is not None
            outcomes.append(Error(code=stop[1], detail="refused"))
        elif failed_group is not None and index > failed_group:
            outcomes.append(Error(code="pipeline_broken", detail="not the last written"))
        else:
            offsets = [sum(_line(n) for n in range(at + k)) for k in range(size)]
            assert request.offsets == (True if size > 1 else None)
            reply = Appended(offset=offsets[0], lines=size, fence=7)
            outcomes.append(reply.model_copy(update={"offsets": offsets}) if size > 1 else reply)
        at += size
    if failed_group is None:
        done = ops.advance(op, outcomes)
        assert isinstance(done, ops.Finished)
        expected = [AppendResult(sum(_line(n) for n in range(k)), 1, 7) for k in range(count)]
        assert done.value == expected
        return
    try:
        ops.advance(op, outcomes)
    except PipelineBroken as error:
        first = sum(groups[:failed_group])
        assert error.failed == first == len(error.written)
        assert [r.offset for r in error.written] == [
            sum(_line(n) for n in range(k)) for k in range(first)
        ]
        assert error.unknown == (groups[failed_group] if stop and stop[1] == "disk_full" else 0)
    else:
        raise AssertionError("the pipeline did not stop")
