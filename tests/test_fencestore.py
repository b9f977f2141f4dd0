"""Durable fence ceilings: fences strictly increase per path across restarts."""

from __future__ import annotations

import json
import logging
import pickle
import stat
from pathlib import Path

import pytest

from sessionlane.actors import fencestore
from sessionlane.actors import transcript as transcript_io
from sessionlane.actors.confined import ConfinedDir
from sessionlane.actors.fencestore import (
    CorruptFenceFile,
    FenceRecord,
    FenceStore,
    encode_fence_record,
    fence_path,
    parse_fence_record,
)


@pytest.fixture
def transcript(tmp_path: Path) -> str:
    return str(tmp_path / "session.jsonl")


def count_durable_writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    writes: list[str] = []
    real = transcript_io.replace_file

    def counting(directory: ConfinedDir, name: str, data: bytes, *, mode: int = 0o600) -> int:
        writes.append(directory.path_of(name))
        return real(directory, name, data, mode=mode)

    monkeypatch.setattr(fencestore, "replace_file", counting)
    return writes


def test_the_sidecar_is_a_hidden_file_beside_the_transcript(tmp_path: Path) -> None:
    assert fence_path(str(tmp_path / "a.jsonl")) == str(tmp_path / ".a.jsonl.fence")


def test_a_fence_record_round_trips_through_its_encoding() -> None:
    record = FenceRecord(path="/srv/sessions/é.jsonl", ceiling=4096)
    data = encode_fence_record(record)
    assert json.loads(data) == {"v": 1, "path": "/srv/sessions/é.jsonl", "ceiling": 4096}
    assert parse_fence_record(data) == record


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b'{"v": 1, "path": "/p", "ceil', "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"v": 2, "path": "/p", "ceiling": 5}', "unknown version 2"),
        (b'{"v": true, "path": "/p", "ceiling": 5}', "unknown version True"),
        (b'{"path": "/p", "ceiling": 5}', "unknown version None"),
        (b'{"v": 1, "ceiling": 5}', "'path'"),
        (b'{"v": 1, "path": "/p"}', "'ceiling'"),
        (b'{"v": 1, "path": "/p", "ceiling": -1}', "'ceiling'"),
        (b'{"v": 1, "path": "/p", "ceiling": 1.5}', "'ceiling'"),
        (b'{"v": 1, "path": "/p", "ceiling": true}', "'ceiling'"),
    ],
)
def test_a_malformed_or_unknown_version_record_is_refused_with_a_reason(
    data: bytes, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_fence_record(data)


def test_a_path_without_a_sidecar_loads_ceiling_zero(transcript: str) -> None:
    store = FenceStore(transcript)
    assert store.load() == 0
    assert store.ceiling == 0


def test_a_reserved_ceiling_survives_a_new_store_object(transcript: str) -> None:
    store = FenceStore(transcript)
    store.load()
    store.reserve(1024)
    assert store.ceiling == 1024
    restarted = FenceStore(transcript)
    assert restarted.load() == 1024
    assert stat.S_IMODE(Path(store.path).stat().st_mode) == 0o600
    assert sorted(p.name for p in Path(transcript).parent.iterdir()) == [".session.jsonl.fence"]


def test_reserve_refuses_to_go_backwards_and_keeps_the_ceiling(transcript: str) -> None:
    store = FenceStore(transcript)
    store.load()
    store.reserve(100)
    with pytest.raises(ValueError, match="backwards"):
        store.reserve(99)
    assert FenceStore(transcript).load() == 100


def test_reserving_the_current_ceiling_writes_nothing(
    transcript: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FenceStore(transcript)
    store.load()
    store.reserve(10)
    writes = count_durable_writes(monkeypatch)
    store.reserve(10)
    assert writes == []


def test_reserve_before_load_is_a_programming_error(transcript: str) -> None:
    with pytest.raises(RuntimeError, match="not loaded"):
        FenceStore(transcript).reserve(5)


def test_a_corrupt_sidecar_is_refused_naming_the_file_and_never_reset(
    transcript: str,
) -> None:
    path = Path(fence_path(transcript))
    path.write_bytes(b'{"v": 1, "path": "/p", "ceil')
    with pytest.raises(CorruptFenceFile) as caught:
        FenceStore(transcript).load()
    assert caught.value.path == str(path)
    assert str(path) in str(caught.value)
    assert "corrupt fence file" in caught.value.detail
    assert path.read_bytes() == b'{"v": 1, "path": "/p", "ceil'


def test_an_unknown_version_sidecar_is_refused(transcript: str) -> None:
    Path(fence_path(transcript)).write_bytes(b'{"v": 9, "path": "x", "ceiling": 3}')
    with pytest.raises(CorruptFenceFile, match="unknown version 9"):
        FenceStore(transcript).load()


def test_the_corrupt_fence_error_survives_pickling() -> None:
    error = CorruptFenceFile("corrupt fence file: not JSON", path="/p/.a.jsonl.fence")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is CorruptFenceFile
    assert (copy.detail, copy.path, copy.code) == (error.detail, error.path, "internal")


def test_a_sidecar_naming_another_path_keeps_its_ceiling_with_a_warning(
    transcript: str, caplog: pytest.LogCaptureFixture
) -> None:
    Path(fence_path(transcript)).write_bytes(
        encode_fence_record(FenceRecord(path="/elsewhere/session.jsonl", ceiling=77))
    )
    with caplog.at_level(logging.WARNING, logger="sessionlane.actors.fencestore"):
        assert FenceStore(transcript).load() == 77
    assert "/elsewhere/session.jsonl" in caplog.text


def test_fences_strictly_increase_across_restarts_with_one_write_per_block(
    transcript: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = count_durable_writes(monkeypatch)
    issued: list[int] = []
    for _activation in range(4):
        store = FenceStore(transcript)  # a restarted actor
        store.load()
        issued += [store.next_fence(block=10) for _ in range(7)]
    assert issued == sorted(set(issued))
    assert issued[0] == 1
    assert len(writes) == 4


def test_a_block_is_reserved_before_the_first_fence_above_the_ceiling(
    transcript: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FenceStore(transcript)
    store.load()
    writes = count_durable_writes(monkeypatch)
    fences = [store.next_fence(block=3) for _ in range(7)]
    assert fences == [1, 2, 3, 4, 5, 6, 7]
    assert len(writes) == 3
    assert store.ceiling == 9
    assert FenceStore(transcript).load() >= fences[-1]


def test_a_failed_reserve_hands_out_no_fence(
    transcript: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FenceStore(transcript)
    store.load()

    def failing(directory: ConfinedDir, name: str, data: bytes, *, mode: int = 0o600) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fencestore, "replace_file", failing)
    with pytest.raises(OSError):
        store.next_fence()
    monkeypatch.undo()
    assert store.next_fence() == 1
    assert FenceStore(transcript).load() >= 1
