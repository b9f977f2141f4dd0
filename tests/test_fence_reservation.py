"""A fence reservation that fails (a full disk, say) grants nothing: the table is as before.

A grant's fence must be durable before the grant goes out (``ReserveFences`` first). When
making it durable fails, the request the grant was for gets the disk error, and the lease
table must not keep the grant: the file stays free (or goes to the next waiter, which
reserves again), and the fence counter is where it was, so the next grant gets that fence.
Driven through the real SessionFile shell (the hand-driven ``Shell`` of ``test_durability``)
with the fence store's ``reserve`` failing, and through ``FileCore`` alone.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_durability import Clock, Shell  # the hand-driven SessionFile harness
from test_session_file_core import acquire, call, core, read

from sessionlane.actors import session_file
from sessionlane.actors.session_file_core import Answer, Reserve
from sessionlane.messages.wire import Error, Granted, Queued, Release, Released

NOW = 1_000.0


class FailingReserve:
    """Stands in for ``FenceStore.reserve`` while ``full`` is set: raises ENOSPC."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.full = True

    def __call__(self, ceiling: int) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.real(ceiling)


@pytest.fixture
def shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shell]:
    clock = Clock()
    monkeypatch.setattr(session_file, "monotonic_ms", clock)
    made = Shell(tmp_path / "t.jsonl", clock)
    try:
        yield made
    finally:
        made.close()


def replies(shell: Shell, lane: str) -> list[Any]:
    return [message for who, message in shell.events if who == f"lane:{lane}"]


def test_an_acquire_whose_reservation_fails_gets_the_disk_error_and_the_file_stays_free(
    shell: Shell,
) -> None:
    s = shell.serving
    failing = FailingReserve(s.fences.reserve)
    s.fences.reserve = failing  # type: ignore[method-assign]
    fence, ceiling = s.table.fence, s.table.fence_ceiling
    shell.call("a", acquire("prompt"))
    [error] = replies(shell, "a")
    assert isinstance(error, Error) and error.code == "disk_full" and error.id == 1
    assert s.table.holder is None and not s.table.waiters
    assert (s.table.fence, s.table.fence_ceiling) == (fence, ceiling)
    assert s.table.counters["grants"] == 0 and s.fence_reservations == 0
    failing.full = False  # space again: the next acquire gets the fence the failed one had
    shell.call("b", acquire("prompt"))
    [granted] = replies(shell, "b")
    assert isinstance(granted, Granted) and granted.fence == fence + 1
    assert s.fence_reservations == 1


def test_a_waiter_whose_grant_cannot_be_reserved_gets_the_error_and_the_release_its_answer(
    shell: Shell,
) -> None:
    s = shell.serving
    shell.call("a", acquire("prompt"))
    [granted] = replies(shell, "a")
    shell.call("b", acquire("prompt"))
    shell.call("c", acquire("prompt"))
    assert isinstance(replies(shell, "b")[-1], Queued)
    s.table.fence_ceiling = s.table.fence  # the next grant needs a reservation
    s.fences.reserve = FailingReserve(s.fences.reserve)  # type: ignore[method-assign]
    shell.call("a", Release(lease=granted.lease))
    assert isinstance(replies(shell, "a")[-1], Released)  # the release itself went through
    for lane in ("b", "c"):  # each waiter in turn: its reservation failed, so did its grant
        error = replies(shell, lane)[-1]
        assert isinstance(error, Error) and error.code == "disk_full"
    assert s.table.holder is None and not s.table.waiters
    assert s.table.fence == granted.fence


def test_the_core_undoes_the_grant_after_a_failed_reservation() -> None:
    c = core()
    effects = c.call(call("a", acquire("prompt"), 1), NOW)
    [table_effects] = effects
    reserve, grant = table_effects.effects
    [out] = c.meaning(reserve)
    assert isinstance(out, Reserve)
    c.reservation_failed(OSError(errno.EIO, "Input/output error"), NOW)
    [answer] = read(c, c.meaning(grant))
    assert isinstance(answer, Answer) and isinstance(answer.message, Error)
    assert answer.message.code == "io_error" and answer.req == ("a", 1)
    assert c.table.holder is None and c.table.fence == 0 and c.table.fence_ceiling == 0
    assert c.book.secret_of(grant.lease) is None  # no reclaim secret for a lease never granted
