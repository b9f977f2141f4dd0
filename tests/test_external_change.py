"""External changes: another process appends to, truncates and replaces a transcript while a
lane holds a prompt lease through the service. The holder is told each kind, its turn goes on,
and the file stays one JSON object per line (a torn tail left by a truncation is quarantined).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sessionlane.actors.transcript import quarantine_path
from sessionlane.system.client import connect
from sessionlane.system.runtime.service import embedded_service

OUTSIDE = r"""
import json, os, sys
op, path = sys.argv[1], sys.argv[2]
if op == "append":
    with open(path, "a") as f:
        f.write(json.dumps({"outside": "appended"}) + "\n")
elif op == "truncate":
    os.truncate(path, int(sys.argv[3]))
elif op == "replace":
    tmp = path + ".outside"
    with open(tmp, "w") as f:
        f.write(json.dumps({"outside": "replaced", "n": 1}) + "\n")
        f.write(json.dumps({"outside": "replaced", "n": 2}) + "\n")
    os.replace(tmp, path)
"""


def outside(*args: str) -> None:
    """Change the file from another process, the way another tool would."""
    subprocess.run([sys.executable, "-c", OUTSIDE, *args], check=True, timeout=60)


@pytest.mark.tcp
def test_the_holder_is_told_of_an_outside_append_truncate_and_replace_and_its_turn_goes_on(
    root: Path, tmp_path: Path
) -> None:
    path = root / "session.jsonl"
    with (
        embedded_service([str(root)], log_file=tmp_path / "svc.log") as svc,
        connect(svc.address) as sl,
    ):
        with sl.lane("agent:main:chat").lease(str(path), purpose="prompt") as lease:
            assert lease is not None
            lease.append({"turn": 0})
            outside("append", str(path))
            lease.append({"turn": 1})
            first_line = len(path.read_bytes().splitlines(keepends=True)[0])
            outside("truncate", str(path), str(first_line))
            lease.append({"turn": 2})
            outside("replace", str(path))
            lease.append({"turn": 3})
            size = path.stat().st_size
            outside("truncate", str(path), str(size - 2))  # mid-line: leaves a torn tail
            lease.append({"turn": 4})
            assert lease.external_changes == ["append", "truncate", "replace", "truncate"]
            assert lease.revoked is None
        (status,) = sl.status(str(path)).files
        assert status.holder is None  # the turn completed and released normally
        assert status.counters["external_changes"] == 4
    records = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert records == [
        {"outside": "replaced", "n": 1},
        {"outside": "replaced", "n": 2},
        {"turn": 4},
    ]
    # The bytes the mid-line truncation left behind were quarantined, not dropped or glued on.
    torn = Path(quarantine_path(str(path))).read_bytes()
    assert torn == b'{"turn":3' + b"\n"
