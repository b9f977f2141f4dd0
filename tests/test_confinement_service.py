"""Confinement and quick failures against a real service: real processes, sockets and files.

What the issue reproduced (issue 11, items 3 and 4), each planted in a live root while a client
works on it: a leased transcript swapped for a symlink to a file outside the root, a symlink at
the quarantine name, a dangling symlink, a hard link to a file outside; a name too long to open;
``status`` of a path outside the roots. Decision for a write whose name became unusable: the
client gets ``path_not_allowed`` at once, nothing is written anywhere, and every later write
is refused the same way until the name is a plain file inside the root again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import file_processes

from sessionlane.actors import procfs
from sessionlane.actors.fencestore import fence_path
from sessionlane.system.client import PathNotAllowed, SessionLaneError, connect
from sessionlane.system.runtime.service import Service, embedded_service

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(90)]

PROMPT_S = 5.0
"""'At once' on a loaded 2-core machine (the refused status used to take 40 s)."""


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("confine-service")
    (base / "root").mkdir()
    (base / "outside").mkdir()
    return base / "root", base / "outside"


@pytest.fixture(scope="module")
def service(places: tuple[Path, Path]) -> Iterator[Service]:
    root, _ = places
    with embedded_service([str(root)], log_file=root.parent / "service.log") as svc:
        yield svc


@pytest.fixture
def root(places: tuple[Path, Path]) -> Path:
    return places[0]


@pytest.fixture
def outside(places: tuple[Path, Path], request: pytest.FixtureRequest) -> Path:
    """A fresh directory outside the root holding one file that must never change."""
    path = places[1] / request.node.name
    path.mkdir()
    (path / "precious.jsonl").write_bytes(b'{"keep":"me"}\n')
    return path


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def system_cpu_seconds(service: Service) -> float:
    """User + system CPU time of every process of the service's actor system so far."""
    assert service.running is not None
    return procfs.cpu_seconds(service.running.system.members())


def test_a_leased_transcript_swapped_for_a_symlink_outside_gets_path_not_allowed(
    service: Service, root: Path, outside: Path
) -> None:
    path = root / "swapped.jsonl"
    with connect(service.address) as sl, sl.lane("turn").lease(str(path)) as lease:
        lease.append({"n": 1})
        path.rename(root / "swapped-away.jsonl")
        path.symlink_to(outside / "precious.jsonl")

        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(PathNotAllowed, match="symbolic link"):
                lease.append({"n": 2})
            assert time.monotonic() - started < PROMPT_S

        assert contents(outside) == {"precious.jsonl": b'{"keep":"me"}\n'}
        assert (root / "swapped-away.jsonl").read_bytes() == b'{"n":1}\n'

        path.unlink()  # the operator removes the link: the name is usable again
        lease.append({"n": 3})
    assert path.read_bytes() == b'{"n":3}\n' and not path.is_symlink()


def test_a_leased_transcripts_directory_moved_out_and_linked_back_gets_path_not_allowed(
    service: Service, root: Path, outside: Path
) -> None:
    (root / "team").mkdir()
    path = root / "team" / "moved-dir.jsonl"
    with connect(service.address) as sl, sl.lane("turn").lease(str(path)) as lease:
        lease.append({"n": 1})
        (root / "team").rename(outside / "team")
        (root / "team").symlink_to(outside / "team", target_is_directory=True)

        with pytest.raises(PathNotAllowed, match="team is a symbolic link"):
            lease.append({"n": 2})
        assert (outside / "team" / "moved-dir.jsonl").read_bytes() == b'{"n":1}\n'
        (root / "team").unlink()


def test_a_symlink_planted_at_the_quarantine_name_creates_nothing_outside(
    service: Service, root: Path, outside: Path
) -> None:
    path = root / "torn.jsonl"
    path.write_bytes(b'{"a":1}\n{"torn":')
    (root / "torn.jsonl.torn").symlink_to(outside / "quarantine.torn")

    with connect(service.address) as sl:
        started = time.monotonic()
        with pytest.raises(PathNotAllowed, match=r"torn\.jsonl\.torn is a symbolic link"):
            sl.lane("turn").append(str(path), {"n": 1})
        assert time.monotonic() - started < PROMPT_S

    assert contents(outside) == {"precious.jsonl": b'{"keep":"me"}\n'}
    assert path.read_bytes() == b'{"a":1}\n{"torn":'


def test_a_dangling_symlink_swapped_in_is_refused_at_once_without_spinning(
    service: Service, root: Path, outside: Path
) -> None:
    path = root / "dangling.jsonl"
    with connect(service.address) as sl, sl.lane("turn").lease(str(path)) as lease:
        lease.append({"n": 1})
        path.unlink()
        path.symlink_to(outside / "made-by-the-service.jsonl")

        started = time.monotonic()
        with pytest.raises(PathNotAllowed, match="symbolic link"):
            lease.append({"n": 2})
        assert time.monotonic() - started < PROMPT_S

        # No spin left behind: over a second the whole actor system stays nearly idle (the
        # old loop burnt a full core), and the file still answers.
        before, window = system_cpu_seconds(service), time.monotonic()
        while time.monotonic() - window < 1.0:
            time.sleep(0.05)
        assert system_cpu_seconds(service) - before < 0.5
        assert str(path) in [f.path for f in sl.status().files]
        path.unlink()
    assert not (outside / "made-by-the-service.jsonl").exists()


def test_a_hard_link_to_a_file_outside_is_refused_at_admission_and_at_a_reopen(
    service: Service, root: Path, outside: Path
) -> None:
    linked = root / "linked.jsonl"
    os.link(outside / "precious.jsonl", linked)
    with connect(service.address) as sl:
        with pytest.raises(PathNotAllowed, match="has 2 hard links: refused, because"):
            sl.lane("turn").append(str(linked), {"n": 1})
        linked.unlink()

        path = root / "relinked.jsonl"
        with sl.lane("turn").lease(str(path)) as lease:
            lease.append({"n": 1})
            path.unlink()
            os.link(outside / "precious.jsonl", path)
            with pytest.raises(PathNotAllowed, match="2 hard links"):
                lease.append({"n": 2})
            path.unlink()
    assert contents(outside) == {"precious.jsonl": b'{"keep":"me"}\n'}


def test_a_name_over_name_max_is_refused_and_leaves_no_process_behind(
    service: Service, root: Path
) -> None:
    assert service.running is not None
    system = service.running.system
    files = file_processes(system)
    with connect(service.address) as sl:
        for n in range(5):
            name = root / (f"{n}" + "x" * 300 + ".jsonl")
            started = time.monotonic()
            with pytest.raises(PathNotAllowed, match=r"over NAME_MAX \(255 bytes\)"):
                sl.lane("turn").append(str(name), {"n": 1})
            assert time.monotonic() - started < PROMPT_S
        with pytest.raises(PathNotAllowed, match="NAME_MAX"):
            sl.status(str(root / ("y" * 300 + ".jsonl")))
    # No new file actor (one of an earlier test's files may have been passivated meanwhile).
    assert set(file_processes(system)) <= set(files), "no file actor was started"


@pytest.mark.parametrize("where", ["/etc/passwd.jsonl", "../escape.jsonl", "no-suffix.txt"])
def test_status_of_a_refused_path_answers_its_error_at_once(
    service: Service, root: Path, where: str
) -> None:
    with connect(service.address) as sl:
        started = time.monotonic()
        with pytest.raises(PathNotAllowed):
            sl.status(where)
        assert time.monotonic() - started < PROMPT_S
        assert sl.status().files is not None  # the connection is still fine


@pytest.mark.parametrize("sidecar", ["a symlink", "corrupt"])
def test_a_refused_fence_sidecar_leaves_no_new_empty_transcript_behind(
    service: Service, root: Path, outside: Path, sidecar: str
) -> None:
    path = root / f"new-{sidecar.replace(' ', '-')}.jsonl"
    fence = Path(fence_path(str(path)))
    if sidecar == "a symlink":
        fence.symlink_to(outside / "precious.jsonl")
    else:
        fence.write_text("not a fence record")
    with connect(service.address) as sl:
        with pytest.raises(SessionLaneError) as refused:
            sl.lane("turn").acquire(str(path), wait_timeout=5.0)
        assert refused.value.code in ("path_not_allowed", "unavailable"), refused.value
        with pytest.raises(SessionLaneError):
            sl.lane("turn").append(str(path), {"n": 1})
    assert not path.exists(), "no empty transcript created for a refused request"
    assert contents(outside) == {"precious.jsonl": b'{"keep":"me"}\n'}
    fence.unlink()
