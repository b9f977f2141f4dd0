"""Disk errors on a real full (or read-only) file system, through a real service (issue 19, item 8).

A tmpfs of 64 KiB is mounted for the test (root only; skipped where mounting is not allowed).
Before this fix every append on a full disk reached the client as ``internal``, logged a
traceback and an "external replace ... adopted" warning, and sent the holder an
``external_change`` event for its own failed write.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sessionlane.messages.errors import DiskFull, ReadOnly
from sessionlane.system.client import connect
from sessionlane.system.runtime.service import embedded_service

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(120)]


@contextlib.contextmanager
def small_tmpfs(where: Path, *options: str) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted at ``where`` (skips the test when it cannot be mounted)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    where.mkdir()
    mounted = subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            ",".join(["size=64k", "mode=0700", *options]),
            "tmpfs",
            str(where),
        ],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill_up(directory: Path) -> Path:
    """Take every free byte of ``directory``'s file system with one file; return it."""
    filler = directory / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                os.write(fd, b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_answers_disk_full_logs_one_line_and_reports_no_external_change(
    tmp_path: Path,
) -> None:
    log_file = tmp_path / "service.log"
    with (
        small_tmpfs(tmp_path / "small") as small,
        embedded_service([str(small)], log_file=log_file) as service,
        connect(service.address) as sl,
    ):
        path = small / "s.jsonl"
        record = {"pad": "x" * 1500}
        with sl.lane("turn").lease(str(path)) as lease:
            assert lease is not None
            acked = [lease.append(record).offset]  # transcript and sidecars now take pages
            filler = fill_up(small)
            failures = 0
            for _ in range(8):  # the page the transcript has fills up, then each append fails
                try:
                    acked.append(lease.append(record).offset)
                except DiskFull as exc:
                    assert exc.code == "disk_full" and "No space left" in exc.detail
                    failures += 1
            assert failures >= 5
            size_when_full = path.stat().st_size
            line = len(json.dumps(record, separators=(",", ":"))) + 1
            assert size_when_full == len(acked) * line  # partial bytes cut

            filler.unlink()  # the operator frees space: writes succeed again
            acked.append(lease.append(record).offset)
            assert lease.external_changes == [], "a failed write is not an external change"
        lines = path.read_bytes().splitlines()  # before the file system goes

    assert len(lines) == len(acked) and all(json.loads(line) == record for line in lines)
    log = log_file.read_text()
    assert log.count("disk_full: append of") == 1, "logged once per episode"
    assert f"writes succeed again after {failures} failed (disk_full)" in log
    assert "Traceback" not in log
    assert "external replace" not in log and "external change" not in log


def test_a_read_only_file_system_answers_read_only(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small") as small:
        (small / "s.jsonl").write_bytes(b'{"n":1}\n')
        remounted = subprocess.run(
            ["mount", "-o", "remount,ro", str(small)], capture_output=True, text=True
        )
        assert remounted.returncode == 0, remounted.stderr
        with (
            embedded_service([str(small)], log_file=tmp_path / "service.log") as service,
            connect(service.address) as sl,
        ):
            with pytest.raises(ReadOnly) as refused:
                sl.lane("turn").acquire(str(small / "s.jsonl"), wait_timeout=5.0)
            assert refused.value.code == "read_only"
            assert "Read-only file system" in refused.value.detail
        assert (small / "s.jsonl").read_bytes() == b'{"n":1}\n'
