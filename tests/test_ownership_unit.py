"""``sessionlane.actors.ownership`` on its own: the lock, the sidecar, the record, the refusals.

The contender that must be refused runs in a real separate process (a ``python -c`` child that
takes the lock and waits on stdin), because ``flock`` between two descriptors of one process
would also conflict and prove less.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from driver import file_settings
from thespian.actors import ChildActorExited

from sessionlane.actors.ownership import (
    OwnedElsewhere,
    OwnerRecord,
    Ownership,
    describe_owner,
    encode_owner_record,
    owner_path,
    parse_owner_record,
    read_owner,
)
from sessionlane.actors.registry import Registry
from sessionlane.actors.session_file import Broken, activation_error
from sessionlane.messages.errors import PathNotAllowed
from sessionlane.messages.internal import ActivationFailed, Configure, IdleNotice, OpenChannel

HOLDER = """
import sys, time
from sessionlane.actors.ownership import Ownership
held = Ownership.acquire(sys.argv[1], service_pid=4242, gateway="tcp://127.0.0.1:7521",
                         admin_port=40123, now=time.time())
print("held", flush=True)
sys.stdin.readline()
held.release()
print("released", flush=True)
sys.stdin.readline()
"""


class Holder:
    """Another process holding the ownership of ``path`` until told to release (or killed)."""

    def __init__(self, path: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "held"

    def release(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "released"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[Holder]:
    h = Holder(tmp_path / "s.jsonl")
    try:
        yield h
    finally:
        h.kill()


def acquire(path: Path, gateway: str = "tcp://127.0.0.1:7600") -> Ownership:
    return Ownership.acquire(str(path), service_pid=99, gateway=gateway, admin_port=5, now=1.5)


def test_the_owner_sidecar_sits_beside_the_transcript_as_a_dot_file() -> None:
    assert owner_path("/r/a/s.jsonl") == "/r/a/.s.jsonl.owner"


def test_an_owner_record_round_trips_and_bad_records_say_what_is_wrong() -> None:
    record = OwnerRecord(pid=1, service_pid=2, gateway="unix:///x", admin_port=3, since=4.5)
    data = encode_owner_record(record)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert parse_owner_record(data) == record
    for bad, why in [
        (b"{", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"v": 2}', "unknown version"),
        (b'{"v": 1, "pid": 1}', "missing field"),
        (data.replace(b'"pid": 1', b'"pid": -1'), "bad field"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_owner_record(bad)


def test_taking_ownership_creates_a_private_sidecar_naming_this_process_and_service(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.jsonl"
    held = acquire(path)
    try:
        sidecar = Path(owner_path(str(path)))
        assert sidecar.stat().st_mode & 0o777 == 0o600
        record = read_owner(str(path))
        assert record == OwnerRecord(os.getpid(), 99, "tcp://127.0.0.1:7600", 5, 1.5)
        assert not path.exists(), "ownership creates no transcript"
    finally:
        held.release()
    assert read_owner(str(path)) is None, "a released sidecar names nobody"
    assert not held.held


def test_a_second_process_is_refused_naming_the_owner_until_the_owner_releases(
    tmp_path: Path, holder: Holder
) -> None:
    path = tmp_path / "s.jsonl"
    with pytest.raises(OwnedElsewhere) as refused:
        acquire(path)
    assert refused.value.code == "unavailable"
    assert refused.value.owner is not None and refused.value.owner.pid == holder.proc.pid
    assert refused.value.detail.startswith(
        "served by another sessionlane service: pid 4242, tcp://127.0.0.1:7521"
    )

    holder.release()

    acquire(path).release()


def test_the_kernel_releases_the_lock_when_the_owner_process_is_killed(
    tmp_path: Path, holder: Holder
) -> None:
    path = tmp_path / "s.jsonl"
    with pytest.raises(OwnedElsewhere):
        acquire(path)

    holder.kill()  # SIGKILL: no release() runs

    held = acquire(path, gateway="tcp://127.0.0.1:7777")
    assert read_owner(str(path)) is not None
    assert read_owner(str(path)).gateway == "tcp://127.0.0.1:7777"  # type: ignore[union-attr]
    held.release()


def test_a_symlink_at_the_sidecar_name_is_refused_and_its_target_untouched(
    tmp_path: Path,
) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, owner_path(str(root / "s.jsonl")))

    with pytest.raises(PathNotAllowed, match="symlink"):
        acquire(root / "s.jsonl")
    assert outside.read_text() == "keep me"


def test_a_hard_linked_or_non_regular_sidecar_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    root = tmp_path / "root"
    root.mkdir()
    os.link(outside, owner_path(str(root / "a.jsonl")))
    os.mkfifo(owner_path(str(root / "b.jsonl")))

    with pytest.raises(PathNotAllowed, match="2 hard links"):
        acquire(root / "a.jsonl")
    with pytest.raises(PathNotAllowed, match="not a regular file"):
        acquire(root / "b.jsonl")
    assert outside.read_text() == "keep me"


def test_describing_an_owner_that_has_not_written_its_identity_yet_still_says_who_serves() -> None:
    assert describe_owner(None).startswith("served by another sessionlane service")
    bare = OwnerRecord(pid=7, service_pid=0, gateway="", admin_port=0, since=0)
    assert describe_owner(bare) == "served by another sessionlane actor system (file actor pid 7)"


def test_a_failed_activation_maps_to_the_error_its_requests_get() -> None:
    owner = OwnerRecord(pid=1, service_pid=2, gateway="tcp://h:1", admin_port=3, since=0)
    assert activation_error(OwnedElsewhere(owner=owner)) == Broken(
        "unavailable", describe_owner(owner)
    )
    assert activation_error(PathNotAllowed("outside the roots")) == Broken(
        "path_not_allowed", "outside the roots"
    )
    emfile = OSError(24, "Too many open files")
    assert activation_error(emfile).code == "too_many_files"
    assert activation_error(OSError(23, "Too many open files in system")).code == "too_many_files"
    name = activation_error(OSError(36, "File name too long"))
    assert name.code == "unavailable" and "File name too long" in name.detail


# The Registry's side, driven by calling its handlers (no actor system) ----------------------


class FakeRegistry(Registry):
    """A Registry whose sends, creates and timers are recorded instead of performed."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, Any]] = []
        self.created: list[str] = []
        self.timers: list[Any] = []

    def createActor(self, cls: Any, *args: Any, **kwargs: Any) -> str:
        self.created.append(f"file-{len(self.created) + 1}")
        return self.created[-1]

    def send(self, target: Any, message: Any) -> None:
        self.sent.append((target, message))

    def wakeupAfter(self, delay: Any, payload: Any = None) -> None:
        self.timers.append(payload)

    def to(self, target: str) -> list[str]:
        """Names of the messages sent to ``target`` (and forget them)."""
        names = [type(m).__name__ for t, m in self.sent if t == target]
        self.sent = [(t, m) for t, m in self.sent if t != target]
        return names


def open_channel(path: str, nonce: int) -> OpenChannel:
    return OpenChannel(path=path, nonce=nonce, reply_to="lane-1")


def configured(tmp_path: Path) -> FakeRegistry:
    registry = FakeRegistry()
    settings = file_settings()
    registry.on_configure(Configure(roots=[str(tmp_path)], suffixes=[".jsonl"], file=settings), "s")
    registry.sent.clear()
    return registry


def test_a_path_whose_actor_is_still_exiting_gets_its_next_actor_only_once_the_old_one_is_gone(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "s.jsonl")
    registry = configured(tmp_path)
    registry.open_here(open_channel(path, 1))
    assert registry.to("file-1") == ["FileInit", "OpenChannel"]
    registry.on_idle(IdleNotice(path=path, received=1), "file-1")
    assert registry.to("file-1") == ["ActorExitRequest"]

    registry.open_here(open_channel(path, 2))  # the old actor still holds the file's lock
    assert registry.created == ["file-1"] and not registry.sent

    registry.on_child_exited(ChildActorExited("file-1"), "admin")
    assert registry.created == ["file-1", "file-2"]
    assert registry.to("file-2") == ["FileInit", "OpenChannel"]


def test_an_actor_that_failed_to_activate_is_retired_once_it_answered_all_forwarded_and_not_restarted(  # noqa: E501
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "s.jsonl")
    registry = configured(tmp_path)
    registry.open_here(open_channel(path, 1))
    registry.open_here(open_channel(path, 2))
    registry.sent.clear()

    def failed(received: int) -> ActivationFailed:
        detail = "served by another sessionlane service: pid 1, tcp://h:1"
        return ActivationFailed(path=path, received=received, code="unavailable", detail=detail)

    registry.on_activation_failed(failed(0), "file-1")  # after FileInit: two calls in flight
    registry.on_activation_failed(failed(1), "file-1")
    assert not registry.sent, "not while a forwarded call is unanswered"
    registry.on_activation_failed(failed(2), "file-1")
    assert registry.to("file-1") == ["ActorExitRequest"]

    registry.on_child_exited(ChildActorExited("file-1"), "admin")
    assert registry.created == ["file-1"], "a retired actor is not restarted"
    registry.open_here(open_channel(path, 3))
    assert registry.created == ["file-1", "file-2"], "the next call tries again"
