"""The client's hand-built request frames are pydantic's, byte for byte.

``_frames.request_frame`` replaced ``codec.frame(message.model_copy(update={"id": rid}))`` on
the client's hot path; the Node client and the held-out contract suite speak the same bytes, so
every request type, every optional field set or not, must encode exactly as before.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from sessionlane.messages.codec import decode_request, frame
from sessionlane.messages.handshake import NONCE_BYTES, PROOF_BYTES
from sessionlane.messages.wire import (
    Abandon,
    Acquire,
    Append,
    Direct,
    Hello,
    Keepalive,
    Proof,
    ReclaimTicket,
    Recover,
    Release,
    Rewrite,
    Status,
)
from sessionlane.system.client._frames import request_frame

names = st.text(min_size=1, max_size=20)
paths = st.text(min_size=1, max_size=40).map(lambda s: "/" + s)
leases = st.text(min_size=1, max_size=30)
tokens = st.text(min_size=8, max_size=64)
ms = st.none() | st.integers(min_value=0, max_value=2**40)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
records = st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=5), max_size=4)
ids = st.integers(min_value=1, max_value=2**62) | st.text(min_size=1, max_size=12)


@st.composite
def appends(draw: st.DrawFn) -> Append:
    durability = draw(st.none() | st.sampled_from(["fsync", "flush"]))
    if draw(st.booleans()):
        return Append(
            lane=draw(names), path=draw(paths), records=draw(records), durability=durability
        )
    aid = draw(st.none() | tokens)
    after = draw(tokens.filter(lambda t: t != aid)) if aid and draw(st.booleans()) else None
    return Append(
        lease=draw(leases),
        fence=draw(st.integers(min_value=1, max_value=2**40)),
        records=draw(records),
        durability=durability,
        aid=aid,
        after=after,
    )


tickets = st.builds(
    ReclaimTicket,
    lease=leases,
    fence=st.integers(min_value=1, max_value=2**40),
    secret=st.text(min_size=16, max_size=40),
)
requests = st.one_of(
    st.builds(
        Acquire,
        lane=names,
        path=paths,
        purpose=st.sampled_from(["prompt", "write", "compaction", "recovery"]),
        priority=st.none() | st.sampled_from(["recovery", "interactive", "background"]),
        wait_timeout_ms=ms,
        max_hold_ms=st.none() | st.integers(min_value=1, max_value=2**40),
        on_contention=st.sampled_from(["wait", "fail", "skip"]),
        reclaim=st.none() | tickets,
        waited_ms=ms,
    ),
    appends(),
    st.builds(Release, lease=leases),
    st.builds(
        Rewrite, lease=leases, fence=st.integers(min_value=1, max_value=2**40), records=records
    ),
    st.builds(Abandon, lane=names, path=st.none() | paths, reason=st.none() | st.text()),
    st.builds(
        Recover,
        lane=names,
        path=paths,
        reason=st.text(max_size=50),
        grace_ms=st.integers(min_value=0, max_value=2**31),
    ),
    st.builds(Status, path=st.none() | paths),
    st.builds(Keepalive),
    st.builds(Direct, lane=names, path=paths),
    st.builds(
        Hello,
        client=st.text(max_size=30),
        nonce=st.none() | st.binary(min_size=NONCE_BYTES, max_size=NONCE_BYTES),
        direct=st.none() | st.booleans(),
    ),
    st.builds(Proof, proof=st.binary(min_size=PROOF_BYTES, max_size=PROOF_BYTES)),
)


@settings(max_examples=400, deadline=None)
@given(requests, ids)
def test_a_hand_built_request_frame_is_pydantics_byte_for_byte(
    request: BaseModel, rid: Any
) -> None:
    ours = request_frame(request, rid)
    assert ours == frame(request.model_copy(update={"id": rid}))
    assert decode_request(ours[4:]).id == rid  # the service takes it, under its id


def test_the_request_itself_keeps_its_own_id() -> None:
    request = Release(lease="L1")
    request_frame(request, 7)
    assert request.id is None
