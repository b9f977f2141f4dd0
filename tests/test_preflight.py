"""``serve``'s start checks (``sessionlane.system.ops.preflight``): what this process cannot
read or write, with the ``chown`` that fixes it. Run as uid 65534 in a forked child (root
only), against files root owns."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_gateway_trust import as_stranger

from sessionlane.system.ops.preflight import check_paths

STRANGER = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory every user may search (pytest's own tmp_path is root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="sl-preflight-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_an_unreadable_secret_and_an_unwritable_root_are_named_with_their_fix(
    shared: Path,
) -> None:
    token = shared / "token"
    token.write_text("x" * 32)
    token.chmod(0o600)
    root = shared / "root"
    root.mkdir(mode=0o755)
    mine = shared / "mine"
    mine.mkdir()
    os.chown(mine, STRANGER, STRANGER)
    key = shared / "key"
    key.write_text("k")
    os.chown(key, STRANGER, STRANGER)
    key.chmod(0o600)

    def check() -> dict[str, object]:
        found = check_paths([("token_file", str(token)), ("cluster_key_file", str(key))],
                            [str(root), str(mine)])  # fmt: skip
        return {"problems": [[p.key, p.path, p.message] for p in found]}

    result = as_stranger(check)
    assert result["problems"] == [
        [
            "token_file",
            str(token),
            f"cannot read {token}: owned by uid 0 mode 0600; this service runs as uid"
            f" {STRANGER}: chown {STRANGER} {token} (or run the service as uid 0)",
        ],
        [
            "roots",
            str(root),
            f"cannot write the root {root}: owned by uid 0 mode 0755; this service runs as uid"
            f" {STRANGER}: chown -R {STRANGER} {root} (or run the service as uid 0)",
        ],
    ], json.dumps(result, indent=1)
