"""When a SessionFile asks to be retired (``sessionlane.actors.passivation``), with time as a plain
number."""

from __future__ import annotations

from sessionlane.actors.passivation import Passivation


def test_the_idle_timer_is_due_idle_ms_after_the_last_activity_and_armed_once() -> None:
    idle = Passivation()
    idle.touch(100.0)
    assert idle.arm(150.0, 1000.0) == 950.0
    assert idle.arm(160.0, 1000.0) is None  # one timer at a time


def test_a_quiet_file_with_nothing_new_since_the_timer_was_armed_asks_to_be_retired() -> None:
    idle = Passivation()
    idle.forwarded(0.0)
    idle.arm(0.0, 1000.0)
    assert idle.fired(idle.activity, quiet=True) is True
    assert idle.retiring and idle.arm(2000.0, 1000.0) is None  # no timer while retiring


def test_activity_since_the_timer_was_armed_re_arms_it_instead() -> None:
    idle = Passivation()
    idle.arm(0.0, 1000.0)
    seen = idle.activity
    idle.touch(500.0)  # a channel call: activity, not a forwarded message
    assert idle.fired(seen, quiet=True) is False and not idle.retiring
    assert idle.received == 0
    assert idle.arm(1000.0, 1000.0) == 500.0


def test_a_file_that_is_not_quiet_is_looked_at_again_a_full_idle_period_later() -> None:
    idle = Passivation()
    idle.arm(0.0, 1000.0)
    assert idle.fired(idle.activity, quiet=False) is False
    assert idle.arm(1000.0, 1000.0) == 1000.0


def test_a_message_forwarded_after_the_idle_notice_cancels_the_retirement() -> None:
    idle = Passivation()
    idle.arm(0.0, 1000.0)
    idle.fired(idle.activity, quiet=True)
    assert idle.forwarded(1500.0) is True  # re-arm: the Registry will not retire us
    assert not idle.retiring and idle.received == 1
    assert idle.forwarded(1600.0) is False


def test_a_status_query_is_counted_but_does_not_keep_the_file_alive() -> None:
    idle = Passivation()
    idle.arm(0.0, 1000.0)
    seen = idle.activity
    idle.forwarded(500.0, activity=False)
    assert idle.received == 1 and idle.fired(seen, quiet=True) is True


def test_a_broken_file_reports_once_per_count_of_messages_received() -> None:
    idle = Passivation()
    idle.forwarded(0.0)
    assert idle.report_broken() is True
    assert idle.report_broken() is False
    idle.forwarded(1.0)
    assert idle.report_broken() is True
