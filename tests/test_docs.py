"""The documentation's shape: a short README with a two-command quick start, links that stay inside.

The README is a user's guide (at most 500 lines); design notes, measurements and history live
under ``docs/``. Its quick start has exactly two set-up commands, one that runs the main job
(``sessionlane race``) and one that runs the tests, and ``.ci/run`` runs that same test command.
Every relative link in the repository's Markdown must land on a file inside the repository,
and a link to a heading must name a heading that exists: a reader is never sent to a path
outside the repository (such as the notes shared by a working session) or to a moved section.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MAX_README_LINES = 500
SKIPPED_DIRS = {".git", ".venv", "node_modules", "dist", ".mypy_cache", ".ruff_cache"}

# Pages other branches of this release add (the OpenClaw drop-in's page, the request path).
# A link to one of them is checked like any other once the file exists; until it is merged,
# only its staying inside the repository is. Empty this once they are on main.
PENDING_PAGES: set[str] = set()

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.MULTILINE)


def repository_files() -> list[Path]:
    """Every file of the repository, outside virtual environments, caches and builds."""
    found = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        found.extend(Path(folder, name) for name in sorted(files))
    return found


def markdown_files() -> list[Path]:
    return [path for path in repository_files() if path.suffix == ".md"]


def without_code(text: str) -> str:
    """The text with fenced blocks removed and inline code spans blanked (links survive)."""
    return INLINE_CODE.sub("code", FENCE.sub("", text))


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for match in HEADING.finditer(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def relative_links(path: Path) -> list[str]:
    links = LINK.findall(without_code(path.read_text(encoding="utf-8")))
    return [link for link in links if not re.match(r"^[a-z][a-z0-9+.-]*:", link)]


def quick_start_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert section, "the README has no '## Quick start' section"
    block = re.search(r"^```(?:sh|bash|console)?\n(.*?)^```", section.group(1), re.M | re.S)
    assert block, "the quick start has no shell block"
    lines = [line.strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_the_readme_is_a_guide_of_at_most_500_lines() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines; the guide keeps at most {MAX_README_LINES}: "
        "move design notes, measurements and history under docs/"
    )


def test_the_quick_start_has_exactly_two_commands_the_race_and_the_tests() -> None:
    commands = quick_start_commands()
    assert len(commands) == 2, f"the quick start must have exactly two commands: {commands}"
    race, tests = commands
    assert race.endswith("sessionlane race") and "pip install" in race, race
    assert tests.endswith("-m pytest") and "pip install" in tests and "[test]" in tests, tests


def test_ci_runs_the_quick_starts_test_command() -> None:
    """Each step of the README's test command is a step of ``.ci/run`` (CI adds quiet flags
    and its own options after pytest, nothing else)."""
    _, tests = quick_start_commands()
    ci_lines = [
        " ".join(word for word in line.split() if word != "-q")
        for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    ]
    for step in (part.strip() for part in tests.split("&&")):
        assert any(line.startswith(step) for line in ci_lines), (
            f".ci/run does not run `{step}`, a step of the README's test command"
        )


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_stays_in_the_repository_and_lands_on_a_file_and_heading(page: Path) -> None:
    for link in relative_links(page):
        target, _, fragment = link.partition("#")
        resolved = (page.parent / target).resolve() if target else page
        assert resolved.is_relative_to(REPO), f"{page.name} links outside the repository: {link}"
        name = resolved.relative_to(REPO).as_posix()
        if not resolved.exists():
            assert name in PENDING_PAGES, f"{page.name} links to a missing file: {link}"
            continue
        if fragment and resolved.suffix == ".md":
            assert fragment in anchors(resolved), f"{page.name}: no heading #{fragment} in {name}"


def test_no_file_points_a_reader_at_the_sessions_shared_notes() -> None:
    needle = "../" + "shared"
    offenders = [
        str(path.relative_to(REPO))
        for path in repository_files()
        if path.suffix in {".md", ".py", ".ts", ".toml", ".txt", ".service", ""}
        and needle in path.read_text(encoding="utf-8", errors="replace")
    ]
    assert offenders == []


def test_the_link_checker_catches_what_it_is_for(tmp_path: Path) -> None:
    """The helpers see a link outside, a link in prose but not in code, and GitHub's anchors."""
    page = tmp_path / "page.md"
    page.write_text(
        "# Title: the `race` (one)\n\nSee [notes](../outside/x.md) and `[not](a.md)`.\n"
        "```\n[also not](b.md)\n```\n## Title: the `race` (one)\n",
        encoding="utf-8",
    )
    assert relative_links(page) == ["../outside/x.md"]
    assert anchors(page) == {"title-the-race-one", "title-the-race-one-1"}
    assert slug("Benchmarks (`sessionlane bench`)") == "benchmarks-sessionlane-bench"


def test_the_pages_name_the_logger_the_client_logs_to() -> None:
    """A user configures logging by the name the guide gives: it must be the client's own."""
    from sessionlane.system.client import _core

    logger = _core.log.name
    named = re.compile(r"(?:logs to|logger) `(sessionlane[.\w]*)`")
    for page in (README, REPO / "docs" / "clients.md"):
        names = named.findall(page.read_text())
        assert names, f"{page.name} does not say where the client logs"
        assert set(names) == {logger}, f"{page.name} names {names}, the client logs to {logger}"
