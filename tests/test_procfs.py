"""``sessionlane.actors.procfs`` reads process and socket facts from a real ``/proc``."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sessionlane.actors import procfs

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="no /proc")


def test_our_own_stat_names_our_parent_group_and_a_stable_start_time() -> None:
    mine = procfs.stat(os.getpid())
    assert mine is not None and mine.live
    assert (mine.pid, mine.ppid, mine.pgrp) == (os.getpid(), os.getppid(), os.getpgid(0))
    assert mine.session == os.getsid(0)
    assert mine.start > 0 and procfs.start_time(os.getpid()) == mine.start
    assert procfs.all_stats()[os.getpid()] == mine


def test_a_reaped_process_has_no_stat_cmdline_or_uid() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert procfs.stat(child.pid) is None
    assert procfs.start_time(child.pid) is None
    assert procfs.cmdline(child.pid) is None
    assert procfs.command_line(child.pid) == ""
    assert procfs.uid(child.pid) is None
    assert procfs.fd_targets(child.pid) == []
    assert procfs.memory_kb(child.pid) is None


def test_cpu_seconds_counts_this_process_and_skips_a_pid_that_is_gone() -> None:
    spent = procfs.cpu_seconds([os.getpid()])
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    assert procfs.cpu_seconds([os.getpid()]) > spent
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert procfs.cpu_seconds([int(gone.stdout)]) == 0.0


def test_a_child_shows_its_argv_and_our_uid_and_a_zombie_is_not_live() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", "two words", ""],
        stdin=subprocess.PIPE,
    )
    argv = [sys.executable, "-c", "import sys; sys.stdin.read()", "two words", ""]
    try:
        # Popen returns once the child is forked; its argv is ours until it has exec'd.
        deadline = time.monotonic() + 10
        while procfs.cmdline(child.pid) != argv and time.monotonic() < deadline:
            time.sleep(0.005)  # a bounded wait for the exec, not an ordering
        assert procfs.cmdline(child.pid) == argv
        assert procfs.uid(child.pid) == os.getuid()
        assert (procfs.memory_kb(child.pid) or {}).get("Rss", 0) > 0
    finally:
        assert child.stdin is not None
        child.stdin.close()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
        zombie = procfs.stat(child.pid)
        child.wait()
    assert zombie is not None and zombie.state == "Z" and not zombie.live


def test_a_socket_we_listen_on_is_listed_with_its_address_and_held_by_us() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        ours = procfs.socket_inodes(os.getpid())
        listed = {inode: addr for inode, addr in procfs.listening_tcp().items() if inode in ours}
        assert ("127.0.0.1", port) in listed.values()
        assert listener.fileno() in procfs.fd_numbers()
    assert ("127.0.0.1", port) not in procfs.listening_tcp().values()


@pytest.mark.parametrize(
    ("host", "family"), [("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)]
)
def test_the_tcp_table_address_codec_round_trips(host: str, family: int) -> None:
    encoded = procfs.encode_address(ipaddress.ip_address(host), 7420)
    hex_host, hex_port = encoded.decode().split(":")
    assert procfs.decode_host(hex_host, family) == host and int(hex_port, 16) == 7420
    if family == socket.AF_INET and sys.byteorder == "little":
        assert encoded == b"0100007F:1CFC"
