"""``memory_merge``: every SessionFile's process (and the zygote it is forked from) opts in to
the kernel's samepage merging; the service never changes the kernel's own switch, and says
at start why nothing would be merged.

Real services, real file processes: what the kernel records for each process is read from
``/proc/PID/ksm_stat`` (Linux 6.4+; skipped where the kernel has none).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from sessionlane.actors import page_merge
from sessionlane.system.bench._memory import holders
from sessionlane.system.client import connect
from sessionlane.system.runtime import zygote
from sessionlane.system.runtime.service import embedded_service

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/ksm_stat").exists(), reason="this kernel has no per-process KSM state"
)


def merge_any(pid: int) -> str:
    """What the kernel says of ``pid``: ``yes`` once it opted in to merging."""
    for line in Path(f"/proc/{pid}/ksm_stat").read_text().splitlines():
        if line.startswith("ksm_merge_any:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no ksm_merge_any in /proc/{pid}/ksm_stat")


def file_and_zygote(root: Path, merge: bool) -> tuple[str, str, str]:
    """Open a file on a service with ``memory_merge = merge``: what the kernel says of the
    file's process, of the zygote, and of the Registry (which never opts in)."""
    path = str(root / f"merge-{merge}.jsonl")
    with (
        embedded_service([str(root)], memory_merge=merge) as service,
        connect(service.address) as sl,
        sl.lane("merge").lease(path, purpose="write") as lease,
    ):
        assert lease is not None
        lease.append({"type": "probe"})
        members = service.running.system.members()
        (file_pid,) = holders(members, {os.path.realpath(path)})
        titled = {p for p in members if "zygote" in cmdline(p)}
        # The zygote forks through short-lived intermediates, which carry its title too.
        zygotes = [p for p in titled if (up := _parent(p)) is not None and up not in titled]
        assert len(zygotes) == 1, (titled, zygotes)
        registry = _parent(zygotes[0])  # the zygote is the Registry's fork
        assert registry is not None
        return merge_any(file_pid), merge_any(zygotes[0]), merge_any(registry)


def cmdline(pid: int) -> str:
    """``pid``'s title ("" once it exited: the zygote's intermediates are short-lived)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _parent(pid: int) -> int | None:
    """``pid``'s parent, or None once it exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_with_memory_merge_the_file_processes_and_the_zygote_opt_in(root: Path) -> None:
    if page_merge.opt_in_supported() is not None:
        pytest.skip(page_merge.opt_in_supported())
    assert file_and_zygote(root, merge=True) == ("yes", "yes", "no")


def test_without_it_no_process_of_the_service_opts_in(root: Path) -> None:
    assert file_and_zygote(root, merge=False) == ("no", "no", "no")
    assert zygote.MEMORY_MERGE is False  # the next service of this process starts unmerged


def test_a_stopped_merging_thread_is_named_with_the_command_that_starts_it(tmp_path: Path) -> None:
    switch = tmp_path / "run"
    switch.write_text("0\n")
    if page_merge.opt_in_supported() is not None:
        pytest.skip(page_merge.opt_in_supported())
    why = page_merge.unavailable(switch)
    assert why is not None and f"echo 1 > {switch}" in why and "is 0" in why
    switch.write_text("1\n")
    assert page_merge.unavailable(switch) is None
    switch.unlink()
    assert "no samepage merging" in (page_merge.unavailable(switch) or "")


def test_the_service_warns_at_start_when_nothing_would_be_merged(
    root: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(page_merge, "unavailable", lambda: "the kernel's merging thread is off")
    with caplog.at_level(logging.WARNING), embedded_service([str(root)], memory_merge=True):
        pass
    assert "memory_merge is set, but the kernel's merging thread is off" in caplog.text
