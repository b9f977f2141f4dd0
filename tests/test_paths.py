"""Canonical paths: one name per file, never outside a root, nothing created on refusal."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from sessionlane.actors.paths import canonicalize, root_of
from sessionlane.messages.errors import PathNotAllowed


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return Path(os.path.realpath(path))


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.jsonl").write_text("{}\n")
    return path


def snapshot(*dirs: Path) -> set[str]:
    return {str(p) for d in dirs for p in d.rglob("*")}


def refused(raw: str, roots: list[Path], *dirs: Path) -> PathNotAllowed:
    """Assert ``raw`` is refused and that the refusal created nothing; return the error."""
    before = snapshot(*dirs)
    with pytest.raises(PathNotAllowed) as error:
        canonicalize(raw, [str(r) for r in roots])
    assert snapshot(*dirs) == before, "nothing is created on refusal"
    assert error.value.code == "path_not_allowed"
    assert error.value.path == raw
    return error.value


def test_an_existing_transcript_inside_the_root_is_its_own_canonical_path(root: Path) -> None:
    (root / "s.jsonl").write_text("{}\n")

    assert canonicalize(str(root / "s.jsonl"), [str(root)]) == str(root / "s.jsonl")


def test_a_file_that_does_not_exist_yet_is_accepted_and_not_created(root: Path) -> None:
    canonical = canonicalize(str(root / "new.jsonl"), [str(root)])

    assert canonical == str(root / "new.jsonl")
    assert not (root / "new.jsonl").exists()


def test_a_symlinked_directory_and_a_relative_path_reach_the_same_canonical_path(
    root: Path, tmp_path: Path
) -> None:
    (root / "agents" / "main").mkdir(parents=True)
    (root / "agents" / "main" / "s.jsonl").write_text("{}\n")
    (root / "alias").symlink_to(root / "agents")
    link_root = tmp_path / "root-link"
    link_root.symlink_to(root)
    roots = [str(link_root)]

    spellings = [
        str(root / "agents" / "main" / "s.jsonl"),
        str(root / "alias" / "main" / "s.jsonl"),
        "agents/main/s.jsonl",
        "alias/main/../main/s.jsonl",
        str(link_root / "agents" / "main" / "s.jsonl"),
    ]

    assert {canonicalize(s, roots) for s in spellings} == {str(root / "agents/main/s.jsonl")}


def test_spellings_of_a_file_not_yet_created_agree_too(root: Path) -> None:
    (root / "agents").mkdir()
    (root / "alias").symlink_to(root / "agents")

    spellings = [str(root / "agents" / "n.jsonl"), "alias/n.jsonl", "agents/./n.jsonl"]

    assert {canonicalize(s, [str(root)]) for s in spellings} == {str(root / "agents/n.jsonl")}


def test_dot_dot_escape_is_refused(root: Path, outside: Path) -> None:
    refused(str(root / ".." / "outside" / "secret.jsonl"), [root], root, outside)
    refused("../outside/secret.jsonl", [root], root, outside)
    refused("../outside/new.jsonl", [root], root, outside)


def test_symlink_escape_is_refused_for_files_and_directories(root: Path, outside: Path) -> None:
    (root / "file-link.jsonl").symlink_to(outside / "secret.jsonl")
    (root / "dir-link").symlink_to(outside)

    refused(str(root / "file-link.jsonl"), [root], root, outside)
    refused(str(root / "dir-link" / "secret.jsonl"), [root], root, outside)
    refused(str(root / "dir-link" / "new.jsonl"), [root], root, outside)


def test_a_sibling_directory_sharing_the_roots_prefix_is_outside_it(
    root: Path, tmp_path: Path
) -> None:
    evil = tmp_path / "root-evil"
    evil.mkdir()

    refused(str(evil / "s.jsonl"), [root], root, evil)


def test_a_dangling_symlink_is_refused_even_when_its_target_would_be_inside(root: Path) -> None:
    (root / "dangling.jsonl").symlink_to(root / "missing.jsonl")
    (root / "loop.jsonl").symlink_to(root / "loop.jsonl")

    assert "dangling" in refused(str(root / "dangling.jsonl"), [root], root).detail
    refused(str(root / "loop.jsonl"), [root], root)


def test_a_directory_fifo_or_socket_is_not_a_transcript(root: Path) -> None:
    (root / "dir.jsonl").mkdir()
    os.mkfifo(root / "fifo.jsonl")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock.jsonl"))

        assert "directory" in refused(str(root / "dir.jsonl"), [root], root).detail
        assert "FIFO" in refused(str(root / "fifo.jsonl"), [root], root).detail
        assert "socket" in refused(str(root / "sock.jsonl"), [root], root).detail
    refused("/dev/null", [Path("/dev")])


def test_a_wrong_suffix_is_refused_and_other_suffixes_can_be_allowed(root: Path) -> None:
    (root / "notes.txt").write_text("x")
    (root / "s.jsonl").write_text("{}\n")
    (root / "link.txt").symlink_to(root / "s.jsonl")

    refused(str(root / "notes.txt"), [root], root)
    refused(str(root / "new.json"), [root], root)
    assert canonicalize(str(root / "notes.txt"), [str(root)], suffixes=[".txt"]).endswith(".txt")
    assert canonicalize(str(root / "link.txt"), [str(root)]) == str(root / "s.jsonl"), (
        "the suffix is checked on the resolved file"
    )


def test_a_missing_parent_directory_is_refused_and_not_created(root: Path) -> None:
    (root / "file.jsonl").write_text("{}\n")

    refused(str(root / "missing" / "s.jsonl"), [root], root)
    refused(str(root / "file.jsonl" / "s.jsonl"), [root], root)
    assert not (root / "missing").exists()


@pytest.mark.parametrize("raw", ["", "a\x00b.jsonl", "x" * 4097 + ".jsonl", "dir/", ".", ".."])
def test_empty_nul_overlong_and_non_file_names_are_refused(root: Path, raw: str) -> None:
    (root / "dir").mkdir()

    refused(raw, [root], root)


def test_no_roots_means_every_path_is_refused(root: Path) -> None:
    refused(str(root / "s.jsonl"), [], root)


def test_the_innermost_of_nested_roots_owns_a_path(root: Path, tmp_path: Path) -> None:
    inner = root / "inner"
    inner.mkdir()
    roots = [str(tmp_path / "root"), str(inner)]
    canonical = canonicalize(str(inner / "s.jsonl"), roots)

    assert root_of(canonical, roots) == str(inner)
    assert root_of(canonicalize("top.jsonl", roots), roots) == str(root)
    with pytest.raises(PathNotAllowed):
        root_of("/elsewhere/s.jsonl", roots)
