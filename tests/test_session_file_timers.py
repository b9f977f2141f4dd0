"""The SessionFile's timers, driven by hand: each wakeup payload is a typed value, fired here.

Uses the hand-driven ``Shell`` of ``test_durability`` (thespian's ``send`` and ``wakeupAfter``
recorded, a fake clock): a timer fires only when the test delivers its ``WakeupMessage``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_durability import Clock, Shell  # the hand-driven SessionFile harness
from thespian.actors import WakeupMessage

from sessionlane.actors import session_file
from sessionlane.actors.timers import IdleCheck, LeaseTick
from sessionlane.messages.internal import IdleNotice
from sessionlane.messages.wire import Acquire, Granted, Revoked


class Recorded(Shell):
    """The Shell, also recording what is sent to the Registry."""

    def __init__(self, path: Path, clock: Clock, **settings: Any) -> None:
        self.to_registry: list[Any] = []
        super().__init__(path, clock, **settings)

    def _send(self, address: Any, message: Any) -> None:
        if address == "registry":
            self.to_registry.append(message)
        super()._send(address, message)

    def fire(self, kind: type) -> Any:
        """Advance the clock to the newest pending timer of ``kind`` and deliver it."""
        delay, payload = next(w for w in reversed(self.wakeups) if isinstance(w[1], kind))
        self.clock.now += delay * 1000.0
        self.deliver(WakeupMessage(delay, payload), sender=None)
        return payload


@pytest.fixture
def shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorded]:
    clock = Clock()
    monkeypatch.setattr(session_file, "monotonic_ms", clock)
    made = Recorded(tmp_path / "t.jsonl", clock, max_hold_ms=2_000, idle_ms=5_000)
    try:
        yield made
    finally:
        made.close()


def test_a_held_lease_is_revoked_when_its_hold_limit_tick_fires(shell: Recorded) -> None:
    shell.call("a", Acquire(lane="a", path=shell.path, purpose="prompt"))
    granted = shell.events[-1][1]
    assert isinstance(granted, Granted)
    tick = shell.fire(LeaseTick)
    assert tick == LeaseTick(due=1_000.0 + 2_000.0)
    revoked = shell.events[-1][1]
    assert isinstance(revoked, Revoked) and revoked.lease == granted.lease


def test_a_quiet_file_asks_to_be_retired_when_its_idle_check_fires(shell: Recorded) -> None:
    assert shell.to_registry == []
    shell.fire(IdleCheck)
    [notice] = shell.to_registry
    assert isinstance(notice, IdleNotice) and notice.path == shell.path


def test_a_file_holding_a_lease_is_not_retired_and_looks_again_later(shell: Recorded) -> None:
    shell.call("a", Acquire(lane="a", path=shell.path, purpose="prompt"))
    armed = len(shell.wakeups)
    shell.fire(IdleCheck)
    assert shell.to_registry == []
    assert any(isinstance(w[1], IdleCheck) for w in shell.wakeups[armed:])  # re-armed


def test_a_wakeup_that_is_no_timer_of_ours_changes_nothing(shell: Recorded) -> None:
    shell.call("a", Acquire(lane="a", path=shell.path, purpose="prompt"))
    before = list(shell.events)
    shell.deliver(WakeupMessage(0.0, ("tick", 10_000.0)), sender=None)  # the old string form
    assert shell.events == before and shell.to_registry == []
