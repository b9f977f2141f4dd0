"""Confinement for a transcript's whole life, on real files: no swapped-in link redirects a write.

Each test plants what an attacker (or an operator's slip) could plant in a root after the file
was admitted, then drives the transcript as its actor would. ``outside`` is a directory beside
the root: nothing may ever be created or changed there.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from sessionlane.actors.confined import ConfinedDir, failure_code
from sessionlane.actors.fencestore import FenceStore, fence_path
from sessionlane.actors.transcript import Transcript, encode_records, quarantine_path
from sessionlane.messages.errors import PathNotAllowed

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    (path / "team").mkdir(parents=True)
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    (path / "precious.jsonl").write_bytes(b'{"keep":"me"}\n')
    return path


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def records(*numbers: int) -> bytes:
    return encode_records([{"n": n} for n in numbers], 1000)


def opened(root: Path, name: str = "team/s.jsonl") -> Transcript:
    transcript = Transcript(str(root / name), root=str(root))
    transcript.open()
    return transcript


def test_a_leased_file_renamed_away_and_replaced_by_a_symlink_outside_is_refused_and_nothing_leaves(
    root: Path, outside: Path
) -> None:
    transcript = opened(root)
    transcript.append(records(1))
    path = root / "team" / "s.jsonl"
    path.rename(root / "team" / "moved.jsonl")
    path.symlink_to(outside / "precious.jsonl")
    before = snapshot(outside)

    with pytest.raises(PathNotAllowed, match="symbolic link"):
        transcript.check_external()
    with pytest.raises(PathNotAllowed, match="symbolic link"):
        transcript.check_external()  # refused again, not adopted

    assert snapshot(outside) == before
    assert (root / "team" / "moved.jsonl").read_bytes() == records(1)
    transcript.close()


def test_once_the_symlink_is_gone_the_name_is_recreated_inside_the_root(
    root: Path, outside: Path
) -> None:
    transcript = opened(root)
    path = root / "team" / "s.jsonl"
    path.unlink()
    path.symlink_to(outside / "precious.jsonl")
    with pytest.raises(PathNotAllowed):
        transcript.check_external()
    path.unlink()

    assert transcript.check_external() == "replace"
    transcript.append(records(2))
    assert path.read_bytes() == records(2) and not path.is_symlink()
    transcript.close()


def test_a_dangling_symlink_swapped_in_is_refused_at_once_and_creates_nothing(
    root: Path, outside: Path
) -> None:
    transcript = opened(root)
    path = root / "team" / "s.jsonl"
    path.unlink()
    path.symlink_to(outside / "created-by-us.jsonl")

    # The old loop (O_CREAT|O_EXCL: EEXIST, plain open: ENOENT, again) spun forever here; a
    # thread with a deadline shows the refusal comes back at all.
    outcome: list[BaseException] = []
    worker = threading.Thread(target=lambda: _capture(transcript.check_external, outcome))
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "check_external spins on a dangling symlink"
    assert len(outcome) == 1 and isinstance(outcome[0], PathNotAllowed)
    assert not (outside / "created-by-us.jsonl").exists()
    transcript.close()


def _capture(call: object, into: list[BaseException]) -> None:
    try:
        call()  # type: ignore[operator]
    except BaseException as exc:
        into.append(exc)


def test_a_dangling_symlink_at_the_name_refuses_the_open(root: Path, outside: Path) -> None:
    (root / "team" / "s.jsonl").symlink_to(outside / "nothing.jsonl")
    with pytest.raises(PathNotAllowed, match="symbolic link"):
        opened(root)
    assert not (outside / "nothing.jsonl").exists()


def test_a_hard_link_to_a_file_outside_is_refused_naming_the_link_count(
    root: Path, outside: Path
) -> None:
    os.link(outside / "precious.jsonl", root / "team" / "s.jsonl")
    with pytest.raises(PathNotAllowed, match="has 2 hard links: refused, because") as refused:
        opened(root)
    assert refused.value.code == "path_not_allowed"
    assert (outside / "precious.jsonl").read_bytes() == b'{"keep":"me"}\n'


def test_a_hard_link_swapped_in_is_refused_at_the_reopen(root: Path, outside: Path) -> None:
    transcript = opened(root)
    path = root / "team" / "s.jsonl"
    path.unlink()
    os.link(outside / "precious.jsonl", path)

    with pytest.raises(PathNotAllowed, match="2 hard links"):
        transcript.check_external()
    assert (outside / "precious.jsonl").read_bytes() == b'{"keep":"me"}\n'
    transcript.close()


def test_a_symlink_at_the_quarantine_name_is_never_written_through(
    root: Path, outside: Path
) -> None:
    path = root / "team" / "s.jsonl"
    path.write_bytes(b'{"a":1}\n{"torn":')
    Path(quarantine_path(str(path))).symlink_to(outside / "quarantine.torn")

    with pytest.raises(PathNotAllowed, match="symbolic link"):
        opened(root)

    assert not (outside / "quarantine.torn").exists()
    assert path.read_bytes() == b'{"a":1}\n{"torn":'  # not cut: its tail went nowhere


def test_a_torn_external_append_with_a_planted_quarantine_link_refuses_every_write(
    root: Path, outside: Path
) -> None:
    transcript = opened(root)
    path = root / "team" / "s.jsonl"
    Path(quarantine_path(str(path))).symlink_to(outside / "quarantine.torn")
    with path.open("ab") as other_writer:
        other_writer.write(b'{"torn":')

    for _ in range(2):  # not adopted: an append never lands after a torn line
        with pytest.raises(PathNotAllowed):
            transcript.check_external()
    assert not (outside / "quarantine.torn").exists()
    transcript.close()


def test_a_symlinked_directory_on_the_way_from_the_root_is_refused(
    root: Path, outside: Path
) -> None:
    transcript = opened(root)
    transcript.close()
    (root / "team").rename(root / "old-team")
    (root / "team").symlink_to(outside, target_is_directory=True)

    with pytest.raises(PathNotAllowed, match="team is a symbolic link"):
        opened(root)
    assert snapshot(outside) == {"precious.jsonl": b'{"keep":"me"}\n'}


def test_a_fifo_at_the_name_is_refused_without_blocking(root: Path) -> None:
    os.mkfifo(root / "team" / "s.jsonl")
    with pytest.raises(PathNotAllowed, match="is a FIFO, not a regular file"):
        opened(root)


def test_a_rewrite_replaces_a_symlink_at_the_name_instead_of_writing_through_it(
    root: Path, outside: Path
) -> None:
    transcript = opened(root)
    transcript.append(records(1))
    directory = transcript.directory
    from sessionlane.actors.transcript import replace_file

    (root / "team" / "s.jsonl").unlink()
    (root / "team" / "s.jsonl").symlink_to(outside / "precious.jsonl")
    os.close(replace_file(directory, "s.jsonl", records(9)))

    assert (root / "team" / "s.jsonl").read_bytes() == records(9)
    assert not (root / "team" / "s.jsonl").is_symlink()
    assert (outside / "precious.jsonl").read_bytes() == b'{"keep":"me"}\n'
    transcript.close()


def test_a_symlinked_fence_sidecar_is_refused_and_its_target_untouched(
    root: Path, outside: Path
) -> None:
    transcript = opened(root)
    Path(fence_path(transcript.path)).symlink_to(outside / "precious.jsonl")
    store = FenceStore(transcript.path, transcript.directory)
    with pytest.raises(PathNotAllowed, match="symbolic link"):
        store.load()
    assert (outside / "precious.jsonl").read_bytes() == b'{"keep":"me"}\n'
    transcript.close()


def test_the_fence_sidecar_is_written_through_the_transcripts_directory(root: Path) -> None:
    transcript = opened(root)
    store = FenceStore(transcript.path, transcript.directory)
    store.load()
    assert store.next_fence() == 1
    store.reserve(5000)
    transcript.close()
    assert FenceStore(str(root / "team" / "s.jsonl")).load() == 5000


def test_a_directory_moved_out_of_the_root_and_linked_back_is_refused(
    root: Path, outside: Path
) -> None:
    transcript = opened(root)
    transcript.append(records(1))
    store = FenceStore(transcript.path, transcript.directory)
    store.load()
    (root / "team").rename(outside / "team")  # our directory fd would follow it out
    (root / "team").symlink_to(outside / "team", target_is_directory=True)

    with pytest.raises(PathNotAllowed, match="team is a symbolic link"):
        transcript.check_external()
    with pytest.raises(PathNotAllowed, match="team is a symbolic link"):
        store.reserve(5000)
    assert sorted(os.listdir(outside / "team")) == ["s.jsonl"]
    assert (outside / "team" / "s.jsonl").read_bytes() == records(1)
    transcript.close()


def test_a_directory_replaced_inside_the_root_is_followed_by_the_path(root: Path) -> None:
    transcript = opened(root)
    transcript.append(records(1))
    (root / "team").rename(root / "archive")
    (root / "team").mkdir()

    assert transcript.check_external() == "replace"
    transcript.append(records(2))
    assert (root / "team" / "s.jsonl").read_bytes() == records(2)
    assert (root / "archive" / "s.jsonl").read_bytes() == records(1)
    transcript.close()


def test_the_walk_refuses_a_directory_outside_its_root(root: Path, outside: Path) -> None:
    with pytest.raises(PathNotAllowed, match="not inside the root"):
        ConfinedDir.walk(str(root), str(outside))


def test_failures_map_to_the_codes_a_client_can_act_on() -> None:
    assert failure_code(PathNotAllowed("x")) == "path_not_allowed"
    assert failure_code(OSError(24, "Too many open files")) == "too_many_files"
    assert failure_code(OSError(23, "Too many open files in system")) == "too_many_files"
    assert failure_code(OSError(28, "No space left on device")) == "disk_full"
    assert failure_code(OSError(122, "Disk quota exceeded")) == "disk_full"
    assert failure_code(OSError(30, "Read-only file system")) == "read_only"
    assert failure_code(OSError(5, "Input/output error")) == "io_error"
    assert failure_code(OSError(13, "Permission denied")) == "unavailable"


def test_a_transcript_that_fails_to_open_leaves_no_descriptor_open(
    root: Path, outside: Path
) -> None:
    os.link(outside / "precious.jsonl", root / "team" / "s.jsonl")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(PathNotAllowed):
            opened(root)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_directory_opened_first_is_shared_by_the_transcript_and_stays_open_after_it(
    root: Path,
) -> None:
    directory, name = ConfinedDir.open_parent(str(root / "team" / "s.jsonl"), str(root))
    with directory:
        transcript = Transcript(str(root / "team" / "s.jsonl"), directory=directory)
        transcript.open()
        assert transcript.directory is directory
        transcript.append(records(1))
        transcript.close()
        fd = directory.open(name, os.O_RDONLY)  # still usable: the transcript borrowed it
        os.close(fd)
    assert directory.fd == -1


def test_the_legacy_lock_is_taken_in_the_confined_directory_and_never_outside(
    root: Path, outside: Path
) -> None:
    from sessionlane.actors.legacy_lock import LegacyLock

    transcript = opened(root)
    lock = LegacyLock(transcript.path, directory=transcript.directory)
    assert lock.try_acquire()
    assert (root / "team" / "s.jsonl.lock").exists()
    lock.release()
    assert not (root / "team" / "s.jsonl.lock").exists()

    (root / "team").rename(outside / "team")
    (root / "team").symlink_to(outside / "team", target_is_directory=True)
    with pytest.raises(PathNotAllowed, match="team is a symbolic link"):
        lock.try_acquire()
    assert sorted(os.listdir(outside / "team")) == ["s.jsonl"]
    transcript.close()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_a_walk_again_follows_each_replaced_directory_and_keeps_no_descriptor(
    root: Path, depth: int
) -> None:
    parts = [f"d{i}" for i in range(depth)]
    (root / Path(*parts)).mkdir(parents=True)
    before = open_fds()
    directory = ConfinedDir.walk(str(root), str(root / Path(*parts)))
    with directory:
        assert directory.revalidate() is False  # nothing moved
        for level in range(depth):  # replace each directory on the way in turn, top first
            moved = root / Path(*parts[: level + 1])
            moved.rename(moved.with_name(moved.name + ".old"))
            (root / Path(*parts)).mkdir(parents=True)
            (root / Path(*parts) / f"new{level}").write_bytes(b"")
            assert directory.revalidate() is True  # switched to the one at the path
            assert directory.names() == [f"new{level}"]
            assert directory.revalidate() is False  # and it stays there
        (root / Path(*parts)).rename(root / "gone")
        with pytest.raises(PathNotAllowed):
            directory.revalidate()
        assert directory.names() == [f"new{depth - 1}"]  # the old one stays in use meanwhile
    assert open_fds() == before  # no descriptor left open by the walks, the switches, a refusal


def test_a_walk_again_of_the_root_itself_opens_nothing(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = ConfinedDir.walk(str(root), str(root))
    opens: list[Any] = []
    real = os.open
    monkeypatch.setattr(os, "open", lambda *a, **k: opens.append(a) or real(*a, **k))
    with directory:
        (root / "team").rename(root / "elsewhere")  # entries move; the root is held open
        assert directory.revalidate() is False
        assert opens == []
        assert directory.names() == ["elsewhere"]
