"""Every process of a service is titled by its role (and file) in ``ps``.

A real ``multiprocTCPBase`` service: the titles are read from ``/proc/PID/cmdline``, as ``ps``
reads them; the environment block (``/proc/PID/environ``, where ``tests/leftovers.py`` finds a
test's processes by their tag) must survive the retitling.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from leftovers import TAG_VARIABLE

from sessionlane.actors import procfs
from sessionlane.actors._shell import TITLE_PREFIX
from sessionlane.system.client import connect
from sessionlane.system.runtime.service import embedded_service

pytestmark = [pytest.mark.tcp]


def titles_of_group(pgid: int) -> dict[int, str]:
    return {
        pid: procfs.command_line(pid)
        for pid, st in procfs.all_stats().items()
        if st.pgrp == pgid and st.live
    }


def environ(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        return fh.read().split(b"\0")


def test_the_gateway_the_registry_and_each_file_are_titled_and_keep_their_environment(
    root: Path, tmp_path: Path
) -> None:
    path = root / "titled.jsonl"
    with (
        embedded_service([str(root)], log_file=tmp_path / "actors.log") as svc,
        connect(svc.address) as sl,
        sl.lane("t").lease(str(path)) as lease,
    ):
        assert lease is not None
        assert svc.running is not None
        titles = titles_of_group(svc.running.system.pgid)
        address = svc.address
        environs = {}
        for pid in list(titles):
            try:
                environs[pid] = environ(pid)
            except (ProcessLookupError, FileNotFoundError):
                # gone since it was listed: the zygote's short-lived first child while it forks
                # the next file actor ahead
                del titles[pid]
    roles = sorted(t for t in titles.values() if t.startswith(TITLE_PREFIX))
    # Titled in the space of this pytest's command line: a long path keeps its end.
    files = [t for t in roles if t.startswith("sessionlane: file ")]
    assert len(files) == 1 and files[0].endswith(f"/sessions/{path.name}"), titles
    assert f"sessionlane: gateway {address}" in roles, titles
    assert any(t.startswith("sessionlane: registry") for t in roles), titles
    # thespian's own processes carry its titles (setproctitle installed): none is left as a
    # copy of this pytest's command line, which told nothing about what a process was.
    assert not [t for t in titles.values() if t.split(" ", 1)[0] == sys.argv[0]], titles
    assert not [t for t in titles.values() if "python" in t.split(" ", 1)[0]], titles
    tag = os.environ.get(TAG_VARIABLE)
    if tag:
        for pid, env in environs.items():
            assert f"{TAG_VARIABLE}={tag}".encode() in env, titles[pid]


def test_a_title_longer_than_the_command_line_keeps_the_role_and_the_files_name() -> None:
    script = (
        "import sys; from sessionlane.actors._shell import set_title; "
        "print(set_title('file /' + 'd/' * 200 + 'name.jsonl'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    title = done.stdout.strip()
    assert title.startswith("sessionlane: file ...") and title.endswith("/d/name.jsonl"), title
    assert len(title) <= len(sys.executable) + len(script) + 4
