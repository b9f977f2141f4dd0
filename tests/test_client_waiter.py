"""The sync client's per-request waiter: a bare lock that wakes its caller once."""

from __future__ import annotations

import threading

from sessionlane.system.client._sync import _Waiter


def test_a_waiter_not_woken_times_out_and_says_so() -> None:
    waiter = _Waiter()
    assert waiter.wait(0.0) is False
    assert waiter.wait(-1.0) is False  # a deadline already passed: no wait, no error
    assert not waiter.is_set() and not waiter.done


def test_a_waiter_woken_twice_stays_woken_for_every_later_look() -> None:
    waiter = _Waiter()
    waiter.wake()
    waiter.wake()
    assert waiter.wait(0.0) is True
    assert waiter.wait(5.0) is True
    assert waiter.is_set()


def test_a_caller_blocked_on_a_waiter_is_woken_by_another_thread_with_its_reply() -> None:
    waiter = _Waiter()
    started = threading.Event()
    seen: list[object] = []

    def caller() -> None:
        started.set()
        seen.append(waiter.wait(60.0))
        seen.append(waiter.reply)

    thread = threading.Thread(target=caller)
    thread.start()
    started.wait()
    waiter.reply = "the reply"  # type: ignore[assignment]
    waiter.wake()
    thread.join(60.0)
    assert seen == [True, "the reply"]
