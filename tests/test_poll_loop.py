"""``poll_loop.PollSelector`` answers as the standard library's ``selectors.PollSelector`` does.

thespian's loop fills a fresh selector on every pass, selects once and closes it; the lean one
must report the same descriptors, ready for the same events, and refuse the same mistakes.
Real sockets: readable, writable, hung up, closed (``POLLNVAL``).
"""

from __future__ import annotations

import os
import selectors
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sessionlane.system.runtime.poll_loop import PollSelector

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE

# Per socketpair: what happens to it before the select, and what its near end registers.
STATES = ("idle", "readable", "peer_closed", "full")
EVENTS = (READ, WRITE, READ | WRITE)


@contextmanager
def pairs(count: int) -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made = [socket.socketpair() for _ in range(count)]
    try:
        yield made
    finally:
        for near, far in made:
            near.close()
            far.close()


def prepare(near: socket.socket, far: socket.socket, state: str) -> None:
    if state == "readable":
        far.send(b"x")
    elif state == "peer_closed":
        far.close()
    elif state == "full":
        near.setblocking(False)
        try:
            while True:
                near.send(b"y" * 65536)
        except BlockingIOError:
            pass


def outcome(selector: selectors.BaseSelector | PollSelector, regs: list[tuple[object, int]]):
    keys = [selector.register(obj, events, data=("d", i)) for i, (obj, events) in enumerate(regs)]
    ready = selector.select(0)
    got = sorted(
        (key.fd, key.events, key.data, key.fileobj is regs[i][0], ev)
        for key, ev in ready
        for i in [key.data[1]]
    )
    selector.close()
    return [(k.fd, k.events, k.data) for k in keys], got


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(STATES), st.sampled_from(EVENTS), st.booleans()),
        min_size=1,
        max_size=8,
    )
)
def test_select_reports_what_the_standard_poll_selector_reports(
    plan: list[tuple[str, int, bool]],
) -> None:
    with pairs(len(plan)) as made:
        for (near, far), (state, _, _) in zip(made, plan, strict=True):
            prepare(near, far, state)
        regs: list[tuple[object, int]] = [
            (near if as_object else near.fileno(), events)
            for (near, _), (_, events, as_object) in zip(made, plan, strict=True)
        ]
        assert outcome(PollSelector(), regs) == outcome(selectors.PollSelector(), regs)


def test_a_closed_descriptor_is_reported_as_the_standard_one_reports_it() -> None:
    near, far = socket.socketpair()
    fd = os.dup(near.fileno())
    os.close(fd)  # now a number poll answers POLLNVAL for
    try:
        expected = outcome(selectors.PollSelector(), [(fd, READ)])
        assert outcome(PollSelector(), [(fd, READ)]) == expected
        assert expected[1]  # the standard one calls it ready: the loop then finds out
    finally:
        near.close()
        far.close()


def test_select_waits_for_the_timeout_when_nothing_is_ready() -> None:
    with pairs(1) as [(near, _)]:
        selector = PollSelector()
        selector.register(near, READ)
        assert selector.select(0.001) == []
        assert selector.select(-1) == []


@pytest.mark.parametrize(
    ("fileobj", "events", "error"),
    [
        (-1, READ, ValueError),
        ("not a file", READ, ValueError),
        (0, 0, ValueError),
        (0, 4, ValueError),
    ],
)
def test_bad_registrations_are_refused_as_the_standard_one_refuses_them(
    fileobj: object, events: int, error: type[Exception]
) -> None:
    for selector in (PollSelector(), selectors.PollSelector()):
        with pytest.raises(error):
            selector.register(fileobj, events)


def test_a_descriptor_registered_twice_is_refused() -> None:
    with pairs(1) as [(near, _)]:
        for selector in (PollSelector(), selectors.PollSelector()):
            selector.register(near.fileno(), READ)
            with pytest.raises(KeyError):
                selector.register(near, WRITE)
            assert set(selector.get_map()) == {near.fileno()}
            selector.close()
