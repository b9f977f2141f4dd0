"""What the objects made on every lease cycle cost to make (docs/hot-path.md, "Effect records
and replies, the tenth session").

Usage: ``python tests/record_cost.py`` with the ``python`` of an install; prints one JSON line
of microseconds (the best of 7 repeats of ``timeit``): a five-field record as a frozen
dataclass (with and without slots) and as a ``lean_record``; the file's hot replies and
envelopes validated, through ``model_construct`` and built by ``messages.trusted``; a reply
frame decoded (unpacked, then validated); a ``threading.Event`` made, set and waited on against
the sync client's waiter. Not a test: a measurement, run by hand.
"""

from __future__ import annotations

import json
import threading
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sessionlane.messages import trusted
from sessionlane.messages.codec import decode_reply, frame, unpack_map
from sessionlane.messages.internal import FileReply, LaneCall, LaneRef
from sessionlane.messages.lean_records import lean_record
from sessionlane.messages.wire import Append, Appended, Granted, Released
from sessionlane.system.client._sync import _Waiter


def _us(make: Callable[[], Any], number: int = 50_000) -> float:
    return round(min(timeit.repeat(make, number=number, repeat=7)) / number * 1e6, 2)


@dataclass(frozen=True)
class Frozen:
    a: int
    b: int
    c: int
    d: int
    e: int


@dataclass(frozen=True, slots=True)
class FrozenSlots:
    a: int
    b: int
    c: int
    d: int
    e: int


@lean_record
class Lean:
    a: int
    b: int
    c: int
    d: int
    e: int


def _event() -> bool:
    event = threading.Event()
    event.set()
    return event.wait(1.0)


def _waiter() -> bool:
    waiter = _Waiter()
    waiter.wake()
    return waiter.wait(1.0)


def main() -> None:
    appended = Appended(id=12, offset=123_456, lines=1, fence=7, released=True)
    ref = LaneRef(uid="u1", name="w", address=("channel", 1), priority="interactive")
    request = Append(id=3, path="/t/a.jsonl", records=[{"i": 1}], lease="L-1", fence=7)
    path = "/t/a.jsonl"
    body = frame(appended)[4:]
    out: dict[str, float] = {
        "frozen_dataclass": _us(lambda: Frozen(1, 2, 3, 4, 5)),
        "frozen_slots_dataclass": _us(lambda: FrozenSlots(1, 2, 3, 4, 5)),
        "lean_record": _us(lambda: Lean(1, 2, 3, 4, 5)),
        "appended_validated": _us(
            lambda: Appended(id=12, offset=123_456, lines=1, fence=7, released=True)
        ),
        "appended_model_construct": _us(
            lambda: Appended.model_construct(id=12, offset=123_456, lines=1, fence=7, released=True)
        ),
        "appended_trusted": _us(lambda: trusted.appended(12, 123_456, 1, 7, True)),
        "granted_validated": _us(
            lambda: Granted(id=1, lease="L-1", fence=7, path=path, purpose="write", secret="s")
        ),
        "granted_trusted": _us(lambda: trusted.granted(1, "L-1", 7, path, "write", "s")),
        "released_validated": _us(lambda: Released(id=1, lease="L-1")),
        "released_trusted": _us(lambda: trusted.released(1, "L-1")),
        "file_reply_validated": _us(lambda: FileReply(path=path, message=appended, lane="u1")),
        "file_reply_trusted": _us(lambda: trusted.file_reply(path, appended, "u1")),
        "lane_call_validated": _us(
            lambda: LaneCall(lane=ref, path=path, canonical=True, request=request)
        ),
        "lane_call_trusted": _us(lambda: trusted.lane_call(ref, path, True, request)),
        "appended_frame_unpacked": _us(lambda: unpack_map(body)),
        "appended_frame_decoded": _us(lambda: decode_reply(body)),
        "threading_event_made_set_waited": _us(_event),
        "client_waiter_made_woken_waited": _us(_waiter),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
