"""What a release publishes (docs/releasing.md): one version everywhere, and packages that
``python -m build`` makes from this tree and ``twine check`` passes.

The build runs as a release would: the sdist from the repository, then the wheel from the
sdist (``python -m build``'s default), so a file the sdist forgot fails here and not on a
user's machine. It needs the package index for its isolated build environment (setuptools).
"""

from __future__ import annotations

import email
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from sessionlane.system._version import __version__

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("actors", "messages", "system")


def test_the_python_package_the_node_package_and_the_changelog_name_one_version() -> None:
    node = json.loads((REPO / "clients" / "node" / "package.json").read_text())
    assert node["version"] == __version__
    changelog = (REPO / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\]", changelog, flags=re.MULTILINE)
    assert headings[0] == "Unreleased", headings
    assert __version__ in headings, f"CHANGELOG.md has no section for {__version__}"
    for heading in headings:  # Keep a Changelog: every heading has its link at the bottom
        assert re.search(rf"^\[{re.escape(heading)}\]: https://", changelog, re.MULTILINE)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out


def only(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    assert len(found) == 1, found
    return found[0]


@pytest.mark.slow
def test_the_sdist_and_the_wheel_pass_twine_check(dist: Path) -> None:
    files = [only(dist, "*.tar.gz"), only(dist, "*.whl")]
    done = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASSED") == 2, done.stdout


@pytest.mark.slow
def test_the_wheel_installs_one_package_with_every_module_and_full_metadata(dist: Path) -> None:
    wheel = only(dist, f"sessionlane-{__version__}-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = email.message_from_bytes(
            zf.read(f"sessionlane-{__version__}.dist-info/METADATA")
        )
    assert {name.split("/", 1)[0] for name in names} == {
        "sessionlane",
        f"sessionlane-{__version__}.dist-info",
    }
    for layer in LAYERS:  # every module of the source tree, under sessionlane/
        for source in (REPO / layer).rglob("*.py"):
            if "__pycache__" not in source.parts:
                relative = source.relative_to(REPO).as_posix()
                assert f"sessionlane/{relative}" in names, relative
    assert "sessionlane/py.typed" in names
    assert f"sessionlane-{__version__}.dist-info/licenses/LICENSE" in names

    assert metadata["Name"] == "sessionlane" and metadata["Version"] == __version__
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert metadata["Requires-Python"] == ">=3.11"
    assert metadata["Keywords"] and "lease" in metadata["Keywords"]
    urls = metadata.get_all("Project-URL") or []
    assert all("://" in u for u in urls), "a URL, or none until there is a public repository"
    classifiers = metadata.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    assert any(c.startswith("Development Status ::") for c in classifiers)
    assert "thespian==4.0.1" in (metadata.get_all("Requires-Dist") or [])
    assert metadata.get_payload().startswith("# sessionlane")  # the README is the description


@pytest.mark.slow
def test_the_sdist_has_no_links_and_carries_what_a_packager_needs(dist: Path) -> None:
    sdist = only(dist, f"sessionlane-{__version__}.tar.gz")
    top = f"sessionlane-{__version__}"
    with tarfile.open(sdist) as tar:
        members = tar.getmembers()
    links = [m.name for m in members if m.issym() or m.islnk()]
    assert links == []  # the wheel was built from it: package-dir, not the source-tree links
    names = {m.name for m in members}
    for needed in (
        "CHANGELOG.md",
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "MANIFEST.in",
        "deploy/sessionlane.service",
        "docs/releasing.md",
        "examples/sync_client.py",
        "tests/conftest.py",
        "system/client/_core.py",
    ):
        assert f"{top}/{needed}" in names, needed
    assert not any(
        part in name for name in names for part in ("/clients/", "/examples/node", "__pycache__")
    )
