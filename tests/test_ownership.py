"""One owner per file across services: two real services on one root (or nested roots).

Each service here is a real ``multiprocTCPBase`` system with its gateway, embedded in the test
process (``embedded_service``) and stopped at the end whatever happens. Two embedded services
share the test's pid, so these tests name the owner by its gateway address and admin port;
``test_lifeline.py`` runs ``sessionlane serve`` subprocesses and checks the pid.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from processes import file_processes
from test_actor_scenarios import EVENT_TIMEOUT_S, MakeDriver, acquire, grant, refused
from test_ownership_unit import Holder
from waiting import eventually

from sessionlane.actors.ownership import owner_path, read_owner
from sessionlane.messages.errors import PathNotAllowed, SessionLaneError, TooManyFiles, Unavailable
from sessionlane.messages.wire import Append
from sessionlane.system.client import connect
from sessionlane.system.runtime.launch import TcpSystem
from sessionlane.system.runtime.service import Service, embedded_service

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(150)]

POLL_S = 30.0


def owner_named(service: Service) -> str:
    assert service.running is not None
    return f"{service.address} (admin port {service.running.system.admin_port}"


def refusal(address: str, path: Path, lane: str = "b") -> SessionLaneError:
    """Acquire ``path`` through ``address``; the error it must get (never a grant)."""
    with connect(address) as sl:
        try:
            lease = sl.lane(lane).acquire(str(path), wait_timeout=5.0)
        except SessionLaneError as exc:
            return exc
    raise AssertionError(f"{address} granted {path} (fence {lease.fence if lease else None})")


def grant_when_free(address: str, path: Path) -> int:
    """Acquire ``path`` through ``address`` until the other owner is gone; the fence granted."""

    def attempt() -> int | None:
        with connect(address) as sl:
            try:
                with sl.lane("late").lease(str(path), wait_timeout=5.0) as lease:
                    assert lease is not None
                    lease.append({"by": "second"})
                    return lease.fence
            except Unavailable:
                return None

    fence: int = eventually(attempt, f"{address} to serve {path}", timeout=POLL_S)
    return fence


def test_a_second_service_on_the_same_root_gets_unavailable_naming_the_owner_then_serves_above_its_fences(  # noqa: E501
    root: Path, tmp_path: Path
) -> None:
    path = root / "s.jsonl"
    with (
        embedded_service([str(root)], log_file=tmp_path / "one.log") as one,
        embedded_service([str(root)], log_file=tmp_path / "two.log") as two,
    ):
        fences = []
        with connect(one.address) as sl:
            lane = sl.lane("a")
            for _ in range(3):
                with lane.lease(str(path)) as lease:
                    assert lease is not None
                    lease.append({"by": "first", "fence": lease.fence})
                    fences.append(lease.fence)
            # Twice through the second service: the first refusal retires its file actor, the
            # second request activates a new one, which is refused the same way.
            for _ in range(2):
                error = refusal(two.address, path)
                assert isinstance(error, Unavailable), error
                assert error.detail.startswith("served by another sessionlane service: pid ")
                assert owner_named(one) in error.detail
            with lane.lease(str(path)) as lease:  # the first still serves it
                assert lease is not None
                fences.append(lease.fence)

        one.stop()

        fence = grant_when_free(two.address, path)
        assert fence > max(fences)
        lines = path.read_text().splitlines()
        assert len(lines) == 4 and '"second"' in lines[-1]


def test_a_service_on_a_nested_root_is_refused_until_the_owner_passivates_the_file(
    root: Path, tmp_path: Path
) -> None:
    inner = root / "team"
    inner.mkdir()
    path = inner / "s.jsonl"
    with (
        embedded_service([str(root)], log_file=tmp_path / "outer.log", idle_ms=300) as outer,
        embedded_service([str(inner)], log_file=tmp_path / "inner.log") as nested,
    ):
        with connect(outer.address) as sl, sl.lane("a").lease(str(path)) as lease:
            assert lease is not None
            first = lease.fence
            error = refusal(nested.address, path)
            assert isinstance(error, Unavailable) and owner_named(outer) in error.detail
            owner = read_owner(str(path))
            assert owner is not None and owner.gateway == outer.address

        # The outer service's file goes idle and is passivated: its lock goes with its process.
        fence = grant_when_free(nested.address, path)
        assert fence > first
        owner = read_owner(str(path))
        assert owner is not None and owner.gateway == nested.address


def test_refusing_a_file_owned_elsewhere_is_quick_and_leaves_no_process_behind(
    root: Path, tmp_path: Path
) -> None:
    paths = [root / f"s{i}.jsonl" for i in range(4)]
    with (
        embedded_service([str(root)], log_file=tmp_path / "one.log") as one,
        embedded_service([str(root)], log_file=tmp_path / "two.log") as two,
        connect(one.address) as sl,
    ):
        for path in paths:
            with sl.lane("a").lease(str(path)) as lease:
                assert lease is not None
        assert two.running is not None
        files = file_processes(two.running.system)
        timings = []
        with connect(two.address) as other:
            for path in paths * 3:
                started = time.perf_counter()
                with pytest.raises(Unavailable):
                    other.lane("b").acquire(str(path), wait_timeout=5.0)
                timings.append(time.perf_counter() - started)
        system = two.running.system
        eventually(
            lambda: file_processes(system) == files, "the refused actors to retire", timeout=POLL_S
        )
        timings.sort()
        print(
            f"\nrefusal of a file owned elsewhere: median {timings[len(timings) // 2] * 1000:.1f}"
            f" ms, max {timings[-1] * 1000:.1f} ms over {len(timings)} requests"
        )


def test_a_file_that_cannot_be_opened_answers_its_error_and_its_actor_retires(
    root: Path, tmp_path: Path
) -> None:
    corrupt = root / "c.jsonl"
    Path(str(corrupt.parent / ".c.jsonl.fence")).write_text("not a fence record")
    with embedded_service([str(root)], log_file=tmp_path / "one.log") as one:
        assert one.running is not None
        system = one.running.system
        files = file_processes(system)
        with connect(one.address) as sl:
            for _ in range(3):
                with pytest.raises(SessionLaneError) as failed:
                    sl.lane("a").acquire(str(corrupt), wait_timeout=5.0)
                assert not isinstance(failed.value, PathNotAllowed | TooManyFiles)
                assert failed.value.code == "unavailable", failed.value
            with pytest.raises(Unavailable):  # lease-less appends too
                sl.lane("w").append(str(corrupt), {"x": 1})
        eventually(
            lambda: file_processes(system) == files, "the broken actors to retire", timeout=POLL_S
        )
        assert not Path(owner_path(str(corrupt))).read_bytes(), "nobody named as the owner"


def test_a_name_too_long_for_its_sidecars_is_refused_at_admission_and_starts_no_actor(
    root: Path, tmp_path: Path
) -> None:
    # 249 bytes fit in NAME_MAX, but the owner lock ".<name>.owner" would not.
    long_name = root / ("x" * 243 + ".jsonl")
    with embedded_service([str(root)], log_file=tmp_path / "one.log") as one:
        assert one.running is not None
        system = one.running.system
        with connect(one.address) as sl:
            for _ in range(3):
                with pytest.raises(PathNotAllowed, match="NAME_MAX"):
                    sl.lane("a").acquire(str(long_name), wait_timeout=5.0)
            assert file_processes(system) == [], "no file actor was started"
    assert not list(root.iterdir()), "nothing created beside a refused name"


@pytest.mark.parametrize("name", ["simple", "tcp"])
def test_through_lane_actors_a_file_held_by_another_process_is_refused_and_then_served(
    name: str, request: pytest.FixtureRequest, driver_factory: MakeDriver, root: Path
) -> None:
    system: TcpSystem | None = None
    if name == "tcp":
        system = request.getfixturevalue("tcp_system")
        asys = system.asys
    else:
        asys = request.getfixturevalue("simple_asys")
    paths = [root / f"s{i}.jsonl" for i in range(3)]
    holders = [Holder(path) for path in paths]  # another process owns each file
    try:
        d = driver_factory(asys)
        lane = d.open_lane("a")
        files = file_processes(system) if system else []
        for path in paths * 2:
            error = refused(acquire(d, lane, path), "unavailable")
            assert error.detail.startswith(
                "served by another sessionlane service: pid 4242, tcp://127.0.0.1:7521"
            )
            write = Append(lane="a", path=str(path), records=[{"x": 1}])
            refused(d.call(lane, write), "unavailable")
        if system is not None:
            eventually(
                lambda: file_processes(system) == files,
                "refused actors retired",
                timeout=EVENT_TIMEOUT_S,
            )
        holders[0].release()
        lease = grant(d, lane, paths[0])
        assert lease.fence >= 1
        assert not paths[1].exists(), "a refused file is never opened"
    finally:
        for holder in holders:
            holder.kill()
