"""``sessionlane.system.ops.holders``: who listens on an address, read from ``/proc``."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

from sessionlane.system.ops import holders


def test_a_tcp_listener_is_found_by_port_with_its_pid_and_uid_and_a_free_port_has_none() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        assert holders.holders(f"tcp://127.0.0.1:{port}") == []  # bound, not listening
        listener.listen()
        (found,) = holders.holders(f"tcp://127.0.0.1:{port}")
        assert (found.pid, found.uid) == (os.getpid(), os.getuid())
        assert found.describe().startswith(f"pid {os.getpid()} (user {found.user}")
        assert holders.holders(f"tcp://127.0.0.1:{port}".replace("127.0.0.1", "127.0.0.2")) == []


def test_a_wildcard_listener_holds_the_loopback_address_too() -> None:
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert [h.pid for h in holders.holders(f"127.0.0.1:{port}")] == [os.getpid()]


def test_a_unix_listener_is_found_by_its_path() -> None:
    directory = Path(tempfile.mkdtemp(prefix="sl-holders-", dir="/tmp"))
    path = directory / "gw.sock"
    try:
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(path))
            listener.listen()
            (found,) = holders.holders(f"unix://{path}")
            assert found.pid == os.getpid()
        assert holders.holders(f"unix://{directory / 'other.sock'}") == []
    finally:
        path.unlink(missing_ok=True)
        directory.rmdir()


def test_a_service_of_this_user_needs_no_hint() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        assert holders.service_hint(address, "stop") is None


def test_the_unit_is_read_from_the_control_group() -> None:
    assert holders.unit_from_cgroup("0::/system.slice/sessionlane.service\n") == (
        "sessionlane.service"
    )
    assert holders.unit_from_cgroup("0::/user.slice/user-1000.slice/session-3.scope\n") is None
    v1 = "12:pids:/system.slice/sessionlane.service\n1:name=systemd:/system.slice/x.service\n"
    assert holders.unit_from_cgroup(v1) == "sessionlane.service"


def test_another_users_holder_without_a_pid_is_described_by_user() -> None:
    stranger = holders.Holder(uid=0)
    assert stranger.describe() == "a process of user root (this user may not see which)"
    assert holders.Holder(uid=987654).user == "uid 987654"


def test_the_advice_is_for_a_sessionlane_service_only() -> None:
    assert holders._is_sessionlane("sessionlane: serve tcp://127.0.0.1:7420")
    assert holders._is_sessionlane(
        "/opt/sessionlane/bin/python /opt/sessionlane/bin/sessionlane serve"
    )
    assert not holders._is_sessionlane("nc -l 7420")
