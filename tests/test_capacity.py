"""Capacity: ``max_files`` live files, a refusal past it, descriptors that never run out.

Real services throughout: an embedded one with ``max_files=3``; one whose descriptors are
counted per process to check the numbers ``sessionlane.system.runtime.limits`` sizes the cap with;
and a ``sessionlane serve`` started under ``ulimit -n 1024`` and asked for more files than fit.
Waiting for passivation is a bounded poll on what the client sees, never a sleep.
"""

from __future__ import annotations

import json
import os
import resource
import signal
from pathlib import Path
from typing import Any

import pytest
from ports import listen_port
from test_serve import Serve
from thespian.actors import Actor, ChildActorExited
from waiting import eventually

from sessionlane.actors.capacity import FD_RESERVE, fd_headroom, never_started, open_fds
from sessionlane.messages.errors import TooManyFiles
from sessionlane.system.client import connect
from sessionlane.system.runtime.launch import tcp_system
from sessionlane.system.runtime.limits import (
    GATEWAY_FDS_PER_FILE,
    REGISTRY_FDS_PER_FILE,
    fit_max_files,
)
from sessionlane.system.runtime.service import ServiceError, create_actor, embedded_service

pytestmark = [pytest.mark.tcp]


# Sizing the cap ----------------------------------------------------------------------------


def test_max_files_that_do_not_fit_the_limit_are_lowered_with_the_numbers() -> None:
    cap = fit_max_files(500, max_connections=512, limit=1024)
    assert cap.lowered and cap.effective == cap.fits < 500
    assert cap.fits * GATEWAY_FDS_PER_FILE + 512 <= 1024
    assert cap.fits * REGISTRY_FDS_PER_FILE + FD_RESERVE <= 1024
    warning = cap.warning()
    assert "max_files 500" in warning and "limit 1024" in warning
    assert f"at most {cap.effective} files" in warning


def test_max_files_that_fit_are_kept() -> None:
    cap = fit_max_files(256, max_connections=512, limit=20_000)
    assert not cap.lowered and cap.effective == 256


def test_the_headroom_check_refuses_near_the_soft_limit_and_names_the_numbers() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert fd_headroom() is None
    tight = open_fds() + FD_RESERVE - 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (tight, hard))
    try:
        refusal = fd_headroom()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert refusal is not None and f"of its {tight} file descriptors open" in refusal


# A child thespian could not start ----------------------------------------------------------


class _Child(Actor):  # type: ignore[misc]
    def receiveMessage(self, msg: Any, sender: Any) -> None:
        if msg == "die":
            os.kill(os.getpid(), signal.SIGKILL)


class _Parent(Actor):  # type: ignore[misc]
    """Creates a child with no descriptor to spare ("starve") or normally, then reports."""

    def receiveMessage(self, msg: Any, sender: Any) -> None:
        if msg in ("starve", "normal"):
            self.boss = sender
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if msg == "starve":
                resource.setrlimit(resource.RLIMIT_NOFILE, (open_fds() + 1, hard))
            try:
                child = self.createActor(_Child)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            self.send(child, "die")
        elif isinstance(msg, ChildActorExited):
            self.send(self.boss, ("exited", never_started(msg.childAddress)))


def test_a_child_that_never_started_is_told_apart_from_one_that_died(tmp_path: Path) -> None:
    with tcp_system(log_file=tmp_path / "actors.log") as system:
        parent = system.asys.createActor(_Parent)
        for ask, expected in (("starve", True), ("normal", False)):
            system.asys.tell(parent, ask)
            answer = system.asys.listen(30)
            assert answer == ("exited", expected), ask


def test_an_admin_out_of_descriptors_is_reported_as_such_not_as_a_bad_actor_class(
    tmp_path: Path,
) -> None:
    with tcp_system(log_file=tmp_path / "actors.log") as system:
        soft, hard = resource.prlimit(system.admin_pid, resource.RLIMIT_NOFILE)
        full = len(os.listdir(f"/proc/{system.admin_pid}/fd"))
        resource.prlimit(system.admin_pid, resource.RLIMIT_NOFILE, (full, hard))
        try:
            with pytest.raises(ServiceError, match="could not start the child: out of file"):
                create_actor(system.asys, _Child, "the child")
        finally:
            resource.prlimit(system.admin_pid, resource.RLIMIT_NOFILE, (soft, hard))
        create_actor(system.asys, _Child, "the child")  # and it recovers once there is room


# The cap on a live service -----------------------------------------------------------------


def test_past_max_files_a_new_file_is_refused_while_live_ones_work_until_one_passivates(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    paths = [str(root / f"f{n}.jsonl") for n in range(4)]
    with (
        embedded_service(
            [str(root)], log_file=tmp_path / "svc.log", max_files=3, idle_ms=4000
        ) as service,
        connect(service.address) as sl,
    ):
        lane = sl.lane("agent")
        for path in paths[:3]:
            lane.append(path, {"first": True})

        with pytest.raises(TooManyFiles, match="3 files are live, max_files is 3") as refused:
            lane.append(paths[3], {"n": 4})
        assert refused.value.code == "too_many_files"
        for path in paths[:3]:
            lane.append(path, {"again": True})
        assert not Path(paths[3]).exists()

        def fourth_served() -> bool:
            try:
                lane.append(paths[3], {"n": 4})
            except TooManyFiles:
                return False
            return True

        eventually(
            fourth_served, "the 4th file to be served once one passivated", timeout=30, every=0.2
        )
    assert Path(paths[3]).read_text() == '{"n":4}\n'


def _children(pids: list[int]) -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        kids.setdefault(ppid, []).append(pid)
    return kids


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fds_of(pids: list[int]) -> dict[int, int]:
    """Descriptors of each process still there: a member may exit between the listing and the
    count (a forked child that found nothing to do), and the test needs only the long-lived
    registry's and gateway's."""
    counts: dict[int, int] = {}
    for pid in pids:
        try:
            counts[pid] = _fds(pid)
        except FileNotFoundError:
            continue
    return counts


def test_descriptors_per_live_file_match_what_the_cap_assumes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with embedded_service([str(root)], log_file=tmp_path / "svc.log") as service:
        system = service.running.system if service.running else None
        assert system is not None
        port = int(service.address.rsplit(":", 1)[1])
        gateway = next(pid for _, p, pid in system.listening_addresses() if p == port)
        with connect(service.address) as sl:
            lane = sl.lane("agent")
            lane.append(str(root / "first.jsonl"), {"n": 0})
            base = _fds_of(system.members())
            files = 20
            for n in range(files):
                lane.append(str(root / f"f{n}.jsonl"), {"n": n})

            def all_there() -> dict[int, list[int]] | None:
                # every file's actor (first.jsonl too), the zygote they are forked from and the
                # child it forks ahead for the next file (asked for once the Registry has
                # answered the last first contact: it may still be forking it)
                kids = _children(system.members())
                parent = max(kids, key=lambda pid: len(kids[pid]))  # the parent of every file
                return kids if len(kids[parent]) == files + 3 else None

            kids = eventually(all_there, "every file's actor, the zygote and the parked child")
            registry = max(kids, key=lambda pid: len(kids[pid]))
            grown = {"registry": _fds(registry) - base[registry]}
            grown["gateway"] = _fds(gateway) - base[gateway]
    print(
        f"descriptors per live file: registry {grown['registry'] / files:.2f}, "
        f"gateway {grown['gateway'] / files:.2f}"
    )
    assert grown["registry"] <= REGISTRY_FDS_PER_FILE * files
    assert grown["gateway"] <= GATEWAY_FDS_PER_FILE * files


# A service under ulimit -n 1024 ------------------------------------------------------------


class LimitedServe(Serve):
    """``sessionlane serve`` started under ``ulimit -n 1024`` (soft and hard)."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str]) -> None:
        super().__init__(tmp, *args, env=env, nofile=1024)

    def current_state(self) -> dict[str, Any]:
        (state_file,) = self.run_dir.glob("sessionlane-*/serve-*.json")
        loaded: dict[str, Any] = json.loads(state_file.read_text())
        return loaded


def test_a_service_under_ulimit_1024_refuses_what_does_not_fit_and_never_restarts(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    listen = f"tcp://127.0.0.1:{listen_port()}"
    env = {"SESSIONLANE_MAX_FILES": "500", "SESSIONLANE_IDLE_MS": "12000"}
    serve = LimitedServe(
        tmp_path,
        "--root", str(root), "--listen", listen, "--log-file", str(tmp_path / "a.log"),
        env=env,
    )  # fmt: skip
    try:
        state = serve.wait_ready()
        assert "max_files 500 does not fit in the open-file limit 1024" in serve.text
        cap = fit_max_files(500, max_connections=512, limit=1024).effective

        with connect(serve.address) as sl:
            held = sl.lane("turn").lease(str(root / "held.jsonl"), purpose="prompt")
            with held as lease:
                assert lease is not None
                lease.append({"before": True})
                lane = sl.lane("many")
                served: list[str] = []
                refused: dict[str, str] = {}
                for n in range(400):
                    path = str(root / f"f{n:03}.jsonl")
                    try:
                        lane.append(path, {"n": n})
                        served.append(path)
                    except TooManyFiles as exc:
                        refused[path] = exc.detail
                # All the cap allows (the held file is live too); more only if early files
                # passivated already, on a machine slower than idle_ms per 400 requests.
                assert cap - 1 <= len(served) < 400
                assert len(served) + len(refused) == 400  # every refusal was too_many_files
                assert all(f"max_files is {cap}" in detail for detail in refused.values())

                lease.append({"after": True})  # the lease taken before still works
                first_refused = next(iter(refused))

                def served_again() -> bool:
                    try:
                        lane.append(first_refused, {"later": True})
                    except TooManyFiles:
                        return False
                    return True

                eventually(
                    served_again, "files to passivate and free slots", timeout=40, every=0.25
                )
        assert serve.proc.poll() is None
        assert "unhealthy" not in serve.text and "restart" not in serve.text
        now = serve.current_state()  # a restarted actor system gets a new group and admin
        assert (now["pgid"], now["admin_port"]) == (state["pgid"], state["admin_port"])
        assert (root / "held.jsonl").read_text() == '{"before":true}\n{"after":true}\n'
    finally:
        serve.kill()
