"""``check_records`` skips encoding a record it can bound below the limit: same verdicts.

The client refuses what the service could not store (``InvalidRecord``, before sending). It
used to encode every record with ``json.dumps`` to measure it; it now bounds the encoded size
while it walks the record, and encodes only when the bound does not settle it. Every verdict,
the accepted records and each refusal's words, must be the same as with the encoder every time.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sessionlane.messages.errors import InvalidRecord
from sessionlane.system.client import _records
from sessionlane.system.client._records import check_records

# Characters whose encoded size differs from one byte: escapes, multi-byte UTF-8, a surrogate.
texts = st.text(max_size=12) | st.text(
    st.sampled_from(["a", '"', "\\", "\x01", "\n", "é", "€", "😀", "\ud800"]), max_size=40
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**65), max_value=2**65)
    | st.floats()
    | texts
    | st.sampled_from([b"x", {1, 2}, 1j])
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(texts | st.integers(0, 3), inner, max_size=4)
    ),
    max_leaves=16,
)
records = st.lists(st.dictionaries(texts, values, max_size=5) | values, max_size=3)
limits = st.none() | st.integers(min_value=1, max_value=300)


def verdict(batch: list[Any], limit: int | None) -> object:
    try:
        return check_records(batch, max_record_bytes=limit, allow_empty=True)
    except InvalidRecord as exc:
        return exc.detail


@settings(max_examples=500, deadline=None)
@given(records, limits)
@example([{"a": "\x01" * 40}], 100)  # escapes: 240 bytes from 40 characters
@example([{"a": "😀" * 30}], 100)  # 120 bytes of UTF-8
def test_a_bounded_record_gets_the_verdict_encoding_it_gives(
    batch: list[Any], limit: int | None
) -> None:
    fast = verdict(batch, limit)
    walk = _records._unstorable
    with pytest.MonkeyPatch.context() as patch:  # no bound settles it: every record encoded
        patch.setattr(_records, "_unstorable", lambda record: (walk(record)[0], None))
        assert verdict(batch, limit) == fast
