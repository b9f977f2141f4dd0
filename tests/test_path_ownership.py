"""Ownership follows the path (issue 19, finding 5): two real services, real files, real locks.

Service A serves a root; service B (overlapping roots allowed) serves a folder inside it. A holds
a lease on ``d/z.jsonl``. Then the directory is restored from a backup (``mv d d.old; mkdir d;
cp d.old/z.jsonl d/``) or the owner sidecar is deleted: the lock A holds is no longer the one at
the path. Before this fix A went on writing while B granted the same path (both at fence 1, the
file read A, A, B, A). Now whichever service writes or grants first after the swap owns the path;
the other is refused, and a holder whose owner lost the file is told (``revoked``,
``ownership_lost``) and writes nothing more.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from sessionlane.actors.ownership import owner_path, read_owner
from sessionlane.messages.errors import SessionLaneError, Unavailable
from sessionlane.system.client import connect
from sessionlane.system.runtime.service import Service, embedded_service

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(150)]


@pytest.fixture
def services(root: Path, tmp_path: Path) -> Iterator[tuple[Service, Service, Path]]:
    """A on ``root``, B on ``root/d`` (nested: overlap intended), and the path ``d/z.jsonl``."""
    inner = root / "d"
    inner.mkdir()
    with (
        embedded_service([str(root)], log_file=tmp_path / "a.log") as a,
        embedded_service([str(inner)], log_file=tmp_path / "b.log") as b,
    ):
        yield a, b, inner / "z.jsonl"


def restore_from_backup(directory: Path) -> None:
    """``mv d d.old; mkdir d; cp d.old/z.jsonl d/``: the transcript only, not its sidecars."""
    old = directory.with_name(directory.name + ".old")
    directory.rename(old)
    directory.mkdir()
    shutil.copy(old / "z.jsonl", directory / "z.jsonl")


def writers(path: Path) -> list[str]:
    return [json.loads(line)["by"] for line in path.read_text().splitlines()]


def test_a_restored_directory_goes_to_the_service_that_grants_first_and_the_other_holder_is_revoked(
    services: tuple[Service, Service, Path],
) -> None:
    a, b, path = services
    with connect(a.address) as sa, connect(b.address) as sb:
        lease_a = sa.lane("a").acquire(str(path))
        assert lease_a is not None
        lease_a.append({"by": "A"})
        lease_a.append({"by": "A"})
        restore_from_backup(path.parent)

        with sb.lane("b").lease(str(path), wait_timeout=10.0) as lease_b:
            assert lease_b is not None
            lease_b.append({"by": "B"})
            with pytest.raises(SessionLaneError) as refused:
                lease_a.append({"by": "A"})
            assert isinstance(refused.value, Unavailable) or refused.value.code == "revoked"
            assert lease_a.revoked == "ownership_lost"
            lease_b.append({"by": "B"})
            owner = read_owner(str(path))
            assert owner is not None and owner.gateway == b.address

        # A's file actor retired; a new request through A is refused, naming B.
        with pytest.raises(Unavailable, match="served by another sessionlane service"):
            sa.lane("a2").acquire(str(path), wait_timeout=5.0)

    assert writers(path) == ["A", "A", "B", "B"]


def test_a_restored_directory_stays_with_the_service_that_writes_first_and_fences_are_carried(
    services: tuple[Service, Service, Path],
) -> None:
    a, b, path = services
    with connect(a.address) as sa, connect(b.address) as sb:
        with sa.lane("a").lease(str(path)) as lease_a:
            assert lease_a is not None
            lease_a.append({"by": "A"})
            restore_from_backup(path.parent)
            lease_a.append({"by": "A"})  # takes the lock at the path, adopts the copy
            assert lease_a.revoked is None
            assert lease_a.fence >= 1
            first = lease_a.fence
            with pytest.raises(Unavailable, match="served by another sessionlane service"):
                sb.lane("b").acquire(str(path), wait_timeout=5.0)
            lease_a.append({"by": "A"})
        owner = read_owner(str(path))
        assert owner is not None and owner.gateway == a.address
        assert not Path(owner_path(str(path.parent.with_name("d.old") / "z.jsonl"))).read_bytes()
        # A carried its fence reservation into the restored directory: whoever serves the
        # path next starts above every fence A granted.
        a.stop()
        with sb.lane("b").lease(str(path), wait_timeout=30.0) as lease_b:
            assert lease_b is not None and lease_b.fence > first
            lease_b.append({"by": "B"})
    assert writers(path) == ["A", "A", "A", "B"]


def test_a_deleted_owner_sidecar_lets_nobody_write_beside_the_owner(
    services: tuple[Service, Service, Path],
) -> None:
    a, b, path = services
    with connect(a.address) as sa, connect(b.address) as sb:
        lease_a = sa.lane("a").acquire(str(path))
        assert lease_a is not None
        lease_a.append({"by": "A"})
        os.unlink(owner_path(str(path)))

        with sb.lane("b").lease(str(path), wait_timeout=10.0) as lease_b:
            assert lease_b is not None
            assert lease_b.fence > lease_a.fence  # B read A's fence store under the lock
            lease_b.append({"by": "B"})
            with pytest.raises(SessionLaneError):
                lease_a.append({"by": "A"})
            assert lease_a.revoked == "ownership_lost"
    assert writers(path) == ["A", "B"]


def test_an_owner_sidecar_replaced_by_a_symlink_ends_the_serving_and_writes_nothing_outside(
    root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep")
    path = root / "z.jsonl"
    with (
        embedded_service([str(root)], log_file=tmp_path / "a.log") as a,
        connect(a.address) as sa,
    ):
        lease = sa.lane("a").acquire(str(path))
        assert lease is not None
        lease.append({"by": "A"})
        os.unlink(owner_path(str(path)))
        os.symlink(outside / "precious", owner_path(str(path)))
        with pytest.raises(SessionLaneError) as refused:
            lease.append({"by": "A"})
        assert refused.value.code == "path_not_allowed", refused.value
        assert "owner is a symbolic link" in refused.value.detail
        assert lease.revoked == "ownership_lost"
    assert (outside / "precious").read_bytes() == b"keep"
    assert writers(path) == ["A"]
