"""Ownership checked once per run of calls, the lease record once per batch of answers (#18).

A run is the frames of one channel read or of one carried message: the SessionFile checks
that the owner lock at the path is still its own once, before the run's first call, after all
of its frames arrived (docs/security-files.md, "Ownership follows the path"). A write's lease
record is written once before the answers it backs leave, not once per write
(docs/restarts.md). Driven by message order with the hand-driven SessionFile of
``test_durability`` (its ``Shell``), on real files: the directory is swapped between two runs,
or after a run's frames were made and before they are delivered.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from driver import file_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_durability import Clock, Shell  # the hand-driven SessionFile harness
from test_ownership_unit import Holder  # another process holding an owner lock

from sessionlane.actors import session_file, session_file_serving
from sessionlane.actors.session_file import SessionFile
from sessionlane.actors.session_file_serving import Serving
from sessionlane.messages.carried import CarriedCalls, CarriedReplies
from sessionlane.messages.channel import call_frame, hello_frame
from sessionlane.messages.internal import FileInit
from sessionlane.messages.wire import Acquire, Append, Appended, Granted, Release


class Rooted(Shell):
    """The ``Shell`` on ``<root>/d/t.jsonl`` with ``root`` configured, counting owner checks
    and noting the lease record on disk each time answers leave."""

    def __init__(self, root: Path, clock: Clock) -> None:
        self.root = root
        self.path = str(root / "d" / "t.jsonl")
        self.clock = clock
        self.events: list[tuple[str, Any]] = []
        self.wakeups: list[tuple[float, Any]] = []
        self.records_seen: list[Any] = []  # the record on disk when a batch of answers left
        self.actor = SessionFile({"Thespian Watch Supported": True})
        self.actor.send = self._send
        self.actor.wakeupAfter = lambda delay, payload=None: self.wakeups.append((delay, payload))
        settings = file_settings()
        init = FileInit(path=self.path, settings=settings, incarnation=1, root=str(root))
        self.deliver(init, sender="registry")
        self.ids = 0
        self.greeted: set[str] = set()

    def _send(self, address: Any, message: Any) -> None:
        state = self.actor.state
        if isinstance(message, CarriedReplies) and message.frames and isinstance(state, Serving):
            self.records_seen.append(state.records.load())  # through its open descriptor
        super()._send(address, message)

    def frames(self, lane: str, *requests: Any) -> CarriedCalls:
        """One carried message (one run) with ``requests`` of ``lane``, made now."""
        data = b""
        if lane not in self.greeted:
            self.greeted.add(lane)
            data = hello_frame(self.serving.channels.carried.token)
        for request in requests:
            self.ids += 1
            data += call_frame(
                lane, lane, "interactive", request.model_copy(update={"id": self.ids})
            )
        return CarriedCalls(self.path, data)

    def run(self, lane: str, message: CarriedCalls) -> list[Any]:
        """Deliver one run, end its pass: the answers it got."""
        before = len(self.events)
        self.deliver(message, sender=f"lane:{lane}")
        if isinstance(self.actor.state, Serving):
            self.settle()
        return [what for _, what in self.events[before:]]


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The path of every owner check made (the real check, counted)."""
    made: list[str] = []
    real = session_file_serving.keep_ownership

    def counted(path: str, *args: Any) -> Any:
        made.append(path)
        return real(path, *args)

    monkeypatch.setattr(session_file_serving, "keep_ownership", counted)
    return made


@pytest.fixture
def shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rooted]:
    clock = Clock()
    monkeypatch.setattr(session_file, "monotonic_ms", clock)
    (tmp_path / "d").mkdir()
    made = Rooted(tmp_path, clock)
    try:
        yield made
    finally:
        made.close()


def granted(shell: Rooted) -> Granted:
    [answer] = shell.run(
        "a", shell.frames("a", Acquire(lane="a", path=shell.path, purpose="prompt"))
    )
    assert isinstance(answer, Granted)
    return answer


def appends(g: Granted, first: int, n: int) -> list[Append]:
    return [
        Append(lease=g.lease, fence=g.fence, records=[{"n": i}], aid=f"append-{i:04d}")
        for i in range(first, first + n)
    ]


def swap(root: Path) -> None:
    """A directory restored from a backup: ``mv d d.old; mkdir d; cp d.old/t.jsonl d/``."""
    (root / "d").rename(root / "d.old")
    (root / "d").mkdir()
    shutil.copy2(root / "d.old" / "t.jsonl", root / "d" / "t.jsonl")


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n")


def test_a_run_of_calls_checks_the_owner_lock_once_before_its_first_call(
    shell: Rooted, checks: list[str]
) -> None:
    g = granted(shell)
    assert len(checks) == 1
    answers = shell.run("a", shell.frames("a", *appends(g, 0, 5)))
    assert [type(a) for a in answers] == [Appended] * 5
    assert len(checks) == 2  # one more for the run of five
    shell.run("a", shell.frames("a", *appends(g, 5, 2)))
    assert len(checks) == 3  # each run is checked
    assert lines(Path(shell.path)) == 7


def test_a_directory_swapped_between_two_runs_is_followed_before_the_second_runs_first_write(
    shell: Rooted, checks: list[str]
) -> None:
    g = granted(shell)
    shell.run("a", shell.frames("a", *appends(g, 0, 2)))
    swap(shell.root)
    answers = shell.run("a", shell.frames("a", *appends(g, 2, 3)))
    assert [a.type for a in answers] == ["external_change"] + ["appended"] * 3  # file adopted
    assert lines(shell.root / "d" / "t.jsonl") == 5  # all three went to the file at the path
    assert lines(shell.root / "d.old" / "t.jsonl") == 2  # none to the moved-out one
    assert (shell.root / "d" / ".t.jsonl.owner").exists()  # the lock followed the path


def test_frames_that_arrived_before_a_swap_are_checked_when_their_run_is_served(
    shell: Rooted, checks: list[str]
) -> None:
    g = granted(shell)
    shell.run("a", shell.frames("a", *appends(g, 0, 1)))
    run = shell.frames("a", *appends(g, 1, 4))  # the frames are here...
    swap(shell.root)  # ... then the directory is swapped, then they are served
    answers = shell.run("a", run)
    assert [a.type for a in answers] == ["external_change"] + ["appended"] * 4
    assert lines(shell.root / "d" / "t.jsonl") == 5
    assert lines(shell.root / "d.old" / "t.jsonl") == 1


def test_a_run_after_another_process_took_the_swapped_path_writes_nothing(
    shell: Rooted, checks: list[str]
) -> None:
    g = granted(shell)
    shell.run("a", shell.frames("a", *appends(g, 0, 1)))
    swap(shell.root)
    other = Holder(shell.root / "d" / "t.jsonl")  # another service took the path meanwhile
    try:
        answers = shell.run("a", shell.frames("a", *appends(g, 1, 3)))
    finally:
        other.kill()
    # The holder is revoked, the run's first call refused naming the other owner; the file's
    # actor stops serving (its channel closes: the calls after it are never served).
    assert [a.type for a in answers] == ["revoked", "error"]
    assert answers[0].reason == "ownership_lost" and answers[1].code == "unavailable"
    assert "pid 4242" in answers[1].detail
    assert lines(shell.root / "d" / "t.jsonl") == 1  # nothing of the run written anywhere
    assert lines(shell.root / "d.old" / "t.jsonl") == 1


def test_a_batch_of_appends_writes_one_lease_record_holding_every_aid_before_its_answers_leave(
    shell: Rooted,
) -> None:
    g = granted(shell)
    writes = shell.serving.records.writes
    shell.records_seen.clear()
    answers = shell.run("a", shell.frames("a", *appends(g, 0, 6)))
    assert [type(a) for a in answers] == [Appended] * 6
    assert shell.serving.records.writes == writes + 1  # one record for the six
    [record] = shell.records_seen  # on disk when the answers left
    assert [a.aid for a in record.appends] == [f"append-{i:04d}" for i in range(6)]
    assert record.size == Path(shell.path).stat().st_size


def acquire(shell: Rooted, lane: str) -> Any:
    request = Acquire(lane=lane, path=shell.path, purpose="write")
    [answer] = shell.run(lane, shell.frames(lane, request))
    return answer


def test_an_acquire_that_can_only_queue_makes_no_owner_check_the_release_that_grants_does(
    shell: Rooted, checks: list[str]
) -> None:
    g = granted(shell)
    assert len(checks) == 1
    assert acquire(shell, "b").type == "queued"
    assert len(checks) == 1  # another lane holds the file: nothing to grant, nothing to write
    answers = shell.run("a", shell.frames("a", Release(lease=g.lease)))
    assert [a.type for a in answers] == ["released", "granted"]
    assert len(checks) == 2  # the release grants b: checked first
    # b holds now; its release with nobody waiting grants nothing: no check either.
    assert shell.run("b", shell.frames("b", Release(lease=answers[1].lease)))[0].type == "released"
    assert len(checks) == 2
    assert granted(shell).fence == g.fence + 2  # a new grant of a free file: checked
    assert len(checks) == 3


def test_a_swap_before_a_queued_acquire_is_followed_before_the_grant_it_waits_for(
    shell: Rooted, checks: list[str]
) -> None:
    g = granted(shell)
    shell.run("a", shell.frames("a", *appends(g, 0, 1)))
    swap(shell.root)  # the directory is restored from a backup, then b asks
    assert acquire(shell, "b").type == "queued"  # no check: it can only queue
    assert not (shell.root / "d" / ".t.jsonl.owner").exists()  # the lock has not moved yet
    answers = shell.run("a", shell.frames("a", Release(lease=g.lease)))
    assert [a.type for a in answers] == ["released", "granted"]
    assert (shell.root / "d" / ".t.jsonl.owner").exists()  # followed before b was granted
    b = answers[1]
    answers = shell.run("b", shell.frames("b", *appends(b, 1, 1)))
    assert [a.type for a in answers] == ["external_change", "appended"]  # the copy adopted
    assert lines(shell.root / "d" / "t.jsonl") == 2  # b wrote to the file at the path
    assert lines(shell.root / "d.old" / "t.jsonl") == 1


def test_a_path_taken_by_another_process_while_an_acquire_queued_is_found_before_any_write(
    shell: Rooted, checks: list[str]
) -> None:
    g = granted(shell)
    shell.run("a", shell.frames("a", *appends(g, 0, 1)))
    swap(shell.root)
    other = Holder(shell.root / "d" / "t.jsonl")  # another service took the path meanwhile
    try:
        assert acquire(shell, "b").type == "queued"  # nothing granted, nothing written
        answers = shell.run("a", shell.frames("a", *appends(g, 1, 1)))
    finally:
        other.kill()
    # The holder's next write checks first: the file is lost, its holder revoked, the
    # waiter and the append refused, nothing written anywhere.
    assert sorted(a.type for a in answers) == ["error", "error", "revoked"]
    assert {a.code for a in answers if a.type == "error"} == {"unavailable"}
    assert lines(shell.root / "d" / "t.jsonl") == 1
    assert lines(shell.root / "d.old" / "t.jsonl") == 1


STEPS = st.lists(
    st.tuples(st.sampled_from("abc"), st.sampled_from(["acquire", "append", "release", "write"])),
    max_size=14,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(STEPS)
def test_no_run_grants_or_writes_without_an_owner_check_made_in_it(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, str]]
) -> None:
    root = tmp_path_factory.mktemp("root")
    (root / "d").mkdir()
    made: list[str] = []
    real = session_file_serving.keep_ownership

    def counted(path: str, *args: Any) -> Any:
        made.append(path)
        return real(path, *args)

    clock = Clock()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(session_file, "monotonic_ms", clock)
        patch.setattr(session_file_serving, "keep_ownership", counted)
        shell = Rooted(root, clock)
        held: dict[str, Granted] = {}
        try:
            for lane, what in steps:
                g = held.get(lane)
                if what == "acquire":
                    request: Any = Acquire(lane=lane, path=shell.path, purpose="write")
                elif what == "write":  # lease-less: queued behind a holder, written at its release
                    request = Append(lane=lane, path=shell.path, records=[{"w": lane}])
                elif g is None:
                    continue  # nothing to append under or release
                elif what == "append":
                    request = Append(lease=g.lease, fence=g.fence, records=[{"l": lane}])
                else:
                    request = Release(lease=g.lease)
                checks, size = len(made), Path(shell.path).stat().st_size
                answers = shell.run(lane, shell.frames(lane, request))
                granted = [a for a in answers if isinstance(a, Granted)]
                if granted or Path(shell.path).stat().st_size != size:
                    assert len(made) == checks + 1  # checked in this run, before
                for answer in answers:
                    if answer.type == "released" and g is not None and answer.lease == g.lease:
                        held.pop(lane, None)
                for a in granted:
                    owner = next(x for x, y in shell.events if y is a)
                    held[str(owner).removeprefix("lane:")] = a
        finally:
            shell.close()
