"""The npm package as a user gets it: ``npm pack``, installed into a fresh project.

The tarball ships the built ``dist/`` (built by ``prepack``; no ``prepare`` script runs, or
warns, at install), takes its version from ``package.json``, and is usable from an ES module,
from CommonJS, and from TypeScript under ``moduleResolution`` ``node16`` and ``node`` (node10,
where ``sessionlane/openclaw`` resolves through ``typesVersions``). The install takes its one
dependency from npm's cache (filled by ``npm ci`` in ``clients/node``, as ``.ci/run`` does) or
the registry. Then ``examples/node/append.mjs`` runs from that project against a real serve.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodejs import NODE_DIR
from processes import run_in_session

from sessionlane import __version__
from sessionlane.system.runtime.service import embedded_service

pytestmark = [pytest.mark.tcp, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "node" / "append.mjs"
STEP_TIMEOUT_S = 300.0


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``args`` in its own session, killed with its children if it outlives the timeout."""
    return run_in_session(args, cwd=cwd, env={**os.environ, **env}, timeout=STEP_TIMEOUT_S)


@pytest.fixture(scope="module")
def consumer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh npm project with the packed tarball installed; yields its directory."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.skip("node and npm are needed for the npm package tests")
    if not (NODE_DIR / "node_modules" / "typescript").is_dir():
        pytest.skip(f"the package's dev dependencies are not installed: run `npm ci` in {NODE_DIR}")
    out = tmp_path_factory.mktemp("pack")
    packed = run([npm, "pack", "--json", "--pack-destination", str(out)], NODE_DIR)
    assert packed.returncode == 0, packed.stderr
    (info,) = json.loads(packed.stdout)
    files = {entry["path"] for entry in info["files"]}
    assert {"package.json", "dist/index.js", "dist/index.mjs", "dist/index.d.ts"} <= files
    assert {"dist/openclaw.js", "dist/openclaw.mjs", "dist/openclaw.d.ts"} <= files
    assert not [f for f in files if f.startswith(("src/", "test/", "build/", "node_modules/"))]
    project = tmp_path_factory.mktemp("consumer")
    (project / "package.json").write_text('{"name": "consumer", "private": true}\n')
    tarball = str(out / info["filename"])
    install = [npm, "install", "--prefer-offline", "--no-audit", "--no-fund", tarball]
    installed = run(install, project)
    assert installed.returncode == 0, installed.stderr
    # npm 11 warns when an installed tarball would need its `prepare` build: nothing to build.
    assert "prepare" not in installed.stderr, installed.stderr
    yield project


def test_the_package_version_is_its_package_json_and_the_python_distribution(
    consumer: Path,
) -> None:
    meta = json.loads((consumer / "node_modules" / "sessionlane" / "package.json").read_text())
    assert meta["version"] == __version__
    assert "prepare" not in meta.get("scripts", {})
    for src in (NODE_DIR / "src").glob("*.ts"):
        assert __version__ not in src.read_text(), f"{src.name} hard-codes the version"


def test_the_package_loads_from_an_es_module_and_from_commonjs(consumer: Path) -> None:
    esm = (
        "import { VERSION, connect, SessionLaneError } from 'sessionlane';"
        "import { createSessionWriteLocks } from 'sessionlane/openclaw';"
        "console.log(JSON.stringify([VERSION, typeof connect, typeof createSessionWriteLocks,"
        " SessionLaneError.name]));"
    )
    cjs = (
        "const { VERSION, connect, SessionLaneError } = require('sessionlane');"
        "const { createSessionWriteLocks } = require('sessionlane/openclaw');"
        "console.log(JSON.stringify([VERSION, typeof connect, typeof createSessionWriteLocks,"
        " SessionLaneError.name]));"
    )
    expected = [__version__, "function", "function", "SessionLaneError"]
    (consumer / "esm.mjs").write_text(esm)
    (consumer / "cjs.cjs").write_text(cjs)
    for script in ("esm.mjs", "cjs.cjs"):
        result = run(["node", script], consumer)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == expected, script


@pytest.mark.parametrize(("resolution", "module"), [("node16", "node16"), ("node10", "commonjs")])
def test_the_package_type_checks_under_node16_and_node10_resolution(
    consumer: Path, resolution: str, module: str
) -> None:
    # The consumer files `npm test` compiles in the repository, here against the tarball.
    case = consumer / f"ts-{resolution}"
    case.mkdir()
    shutil.copy(NODE_DIR / "test" / "types-consumer.ts", case / "consumer.ts")
    sources = ["consumer.ts"]
    if resolution == "node16":  # node10 knows no .mts
        shutil.copy(NODE_DIR / "test" / "types-consumer-esm.mts", case / "consumer-esm.mts")
        sources.append("consumer-esm.mts")
    tsconfig = {
        "compilerOptions": {
            "target": "ES2022",
            "lib": ["ES2023", "ESNext.Disposable"],
            "module": module,
            "moduleResolution": resolution,
            "strict": True,
            "noEmit": True,
            "skipLibCheck": False,
            "esModuleInterop": True,
            "types": ["node"],
            "typeRoots": [str(NODE_DIR / "node_modules" / "@types")],
        },
        "files": sources,
    }
    (case / "tsconfig.json").write_text(json.dumps(tsconfig, indent=2))
    tsc = NODE_DIR / "node_modules" / "typescript" / "bin" / "tsc"
    result = run(["node", str(tsc), "-p", "tsconfig.json"], case)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_node_example_appends_under_a_lease_through_a_real_serve(
    consumer: Path, tmp_path: Path
) -> None:
    root = tmp_path / "sessions"
    root.mkdir()
    token_file = tmp_path / "token"
    token_file.write_text("example-token-0123456789\n")  # as `echo ... > token` writes it
    token_file.chmod(0o600)
    path = root / "demo.jsonl"
    shutil.copy(EXAMPLE, consumer / "append.mjs")
    with embedded_service(
        [str(root)], log_file=tmp_path / "a.log", token_file=str(token_file)
    ) as svc:
        # The address comes from $SESSIONLANE_LISTEN, as the Python client's does.
        result = run(
            ["node", "append.mjs", str(path), "agent:example"],
            consumer,
            SESSIONLANE_LISTEN=svc.address,
            SESSIONLANE_TOKEN_FILE=str(token_file),
        )
    assert result.returncode == 0, result.stderr
    appended = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(a["offset"] > 0, a["lines"]) for a in appended] == [(False, 1), (True, 1)]
    assert appended[0]["fence"] == appended[1]["fence"]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == [
        {"type": "message", "lane": "agent:example", "text": "hello"},
        {"type": "message", "lane": "agent:example", "text": "world"},
    ]
