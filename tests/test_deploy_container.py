"""``deploy/Containerfile``'s steps, run as far as this machine allows (no container runtime).

The image's user is uid 10001; what it must read (the token) and write (the data volume, its
state directories) is checked by ``serve`` at start (``sessionlane.system.ops.preflight``). Here
the image's layout is rebuilt under a temporary directory, and ``serve`` runs from a venv as
uid 10001, as the image's ``ENTRYPOINT``/``CMD`` run it: first with a host-owned 0600 token
and a root-owned volume (each refused, saying which ``chown`` fixes it), then with both
fixed (it serves; a client with the token is admitted; the health check's URL answers).
Needs root (to become uid 10001) and a system ``python3.11`` that uid 10001 may execute.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from ports import listen_port
from waiting import eventually

from sessionlane.system.client import connect

pytestmark = [pytest.mark.tcp, pytest.mark.slow]

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UID = 10001
TOKEN = "6f1c0d7e9a8b4c2d3e5f60718293a4b5"  # as `openssl rand -hex 16` makes one
SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
START_S = 30.0


def containerfile(instruction: str) -> list[str]:
    """An exec-form instruction of the Containerfile (``CMD``, ``ENTRYPOINT``)."""
    for line in (DEPLOY / "Containerfile").read_text().splitlines():
        if line.startswith(instruction + " "):
            value: list[str] = json.loads(line[len(instruction) + 1 :])
            return value
    raise AssertionError(f"no {instruction} in the Containerfile")


if os.geteuid() != 0:
    pytest.skip("becoming uid 10001 needs root", allow_module_level=True)
if not SYSTEM_PYTHON.exists():
    pytest.skip(f"no {SYSTEM_PYTHON} for uid {UID} to run", allow_module_level=True)


def test_the_image_runs_as_uid_10001() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    assert f"--uid {UID}" in text and "USER 10001:10001" in text
    assert f"chown {UID}" in text  # the header says how to hand the token to the image's user


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The image's layout, readable by uid 10001: a venv (the system interpreter, this
    environment's packages), /etc/sessionlane, /var/lib/sessionlane, /srv/sessionlane, /tmp."""
    top = Path(tempfile.mkdtemp(prefix="sl-image-", dir="/tmp"))
    try:
        top.chmod(0o755)
        venv = top / "opt" / "sessionlane"
        subprocess.run(
            [str(SYSTEM_PYTHON), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
        )
        import site

        packages = next(p for p in site.getsitepackages() if p.endswith("site-packages"))
        ours = next(venv.glob("lib/python*/site-packages"))
        # This environment's packages (sessionlane's checkout included, through its .pth).
        (ours / "image.pth").write_text(f"import site; site.addsitedir({packages!r})\n")
        home = top / "var" / "lib" / "sessionlane"  # useradd --create-home
        home.mkdir(parents=True)
        os.chown(home, UID, UID)
        (top / "var" / "lib").chmod(0o755)
        run = top / "tmp"
        run.mkdir(mode=0o1777)
        run.chmod(0o1777)
        (top / "etc" / "sessionlane").mkdir(parents=True)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def configure(image: Path, port: int, metrics: int) -> Path:
    """``COPY deploy/container.toml /etc/sessionlane/sessionlane.toml``, with the image's
    paths under ``image`` and ports of this machine's loopback."""
    text = (DEPLOY / "container.toml").read_text()
    text = text.replace('"/srv/sessionlane"', f'"{image}/srv/sessionlane"')
    text = text.replace('"/run/secrets/sessionlane-token"', f'"{image}/run/secrets/token"')
    text = text.replace('"tcp://0.0.0.0:7420"', f'"tcp://127.0.0.1:{port}"')
    text = text.replace('"0.0.0.0:9420"', f'"127.0.0.1:{metrics}"')
    config = image / "etc" / "sessionlane" / "sessionlane.toml"
    config.write_text(text)
    return config


def entrypoint(image: Path, output: Path) -> subprocess.Popen[bytes]:
    """``ENTRYPOINT ["tini", "--", "sessionlane"]`` ``CMD ["serve", "--config", ...]`` as
    ``USER 10001`` with the image's ``ENV``."""
    env = {
        "PATH": f"{image}/opt/sessionlane/bin:/usr/bin:/bin",
        "XDG_STATE_HOME": f"{image}/var/lib",
        "XDG_RUNTIME_DIR": f"{image}/tmp",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": f"{image}/var/lib/sessionlane",
    }
    if "SESSIONLANE_TEST_TAG" in os.environ:
        env["SESSIONLANE_TEST_TAG"] = os.environ["SESSIONLANE_TEST_TAG"]
    entry = containerfile("ENTRYPOINT")
    assert entry[:2] == ["tini", "--"] and entry[2:] == ["sessionlane"], entry
    entry = entry[2:]  # tini: PID 1's signal forwarding; start_new_session stands in for it
    command = [a.replace("/etc/", f"{image}/etc/") for a in containerfile("CMD")]
    with output.open("wb") as out:
        return subprocess.Popen(
            [f"{image}/opt/sessionlane/bin/python", "-m", *entry, *command],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            user=UID,
            group=UID,
            extra_groups=[],
            cwd="/",
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes]) -> int | None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        return None
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_host_owned_token_and_volume_are_refused_with_the_chown_that_fixes_them_then_it_serves(
    image: Path, tmp_path: Path
) -> None:
    port, metrics = listen_port(), listen_port()
    configure(image, port, metrics)
    secrets = image / "run" / "secrets"
    secrets.mkdir(parents=True)
    token = secrets / "token"
    token.write_text(TOKEN + "\n")  # as the header makes it: 0600, owned by the host user
    token.chmod(0o600)
    volume = image / "srv" / "sessionlane"
    volume.mkdir(parents=True)  # a bind mount of a host directory: root's, 0755
    volume.chmod(0o755)
    (image / "srv").chmod(0o755)
    (image / "run").chmod(0o755)
    secrets.chmod(0o755)

    def refused(n: int) -> str:
        """Start the container (its ``n``-th try); it must refuse, exit 2: what it said."""
        proc = entrypoint(image, tmp_path / f"{n}.out")
        assert proc.wait(60) == 2, (tmp_path / f"{n}.out").read_text()
        return (tmp_path / f"{n}.out").read_text()

    said = refused(1)
    assert (
        f"cannot read {token}: owned by uid 0 mode 0600; this service runs as uid {UID}:"
        f" chown {UID} {token} (or run the service as uid 0)"
    ) in said, said
    os.chown(token, UID, UID)  # what the message said

    said = refused(2)
    assert (
        f"sessionlane: cannot start: cannot write the root {volume}: owned by uid 0 mode 0755;"
        f" this service runs as uid {UID}: chown -R {UID} {volume}"
    ) in said, said
    os.chown(volume, UID, UID)  # what the message said

    serve = entrypoint(image, tmp_path / "3.out")
    try:
        said = tmp_path / "3.out"
        eventually(
            lambda: "sessionlane serving" in said.read_text() or serve.poll() is not None,
            "serve to listen",
            timeout=START_S,
        )
        assert serve.poll() is None, said.read_text()
        with connect(f"tcp://127.0.0.1:{port}", TOKEN) as sl:
            lease = sl.lane("t").acquire(str(volume / "a.jsonl"), "write")
            assert lease is not None
            lease.append({"ok": True})
            lease.release()
        transcript = volume / "a.jsonl"
        assert transcript.stat().st_uid == UID
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
            assert r.status == 200  # the image's HEALTHCHECK
    finally:
        assert stop(serve) == 0, (tmp_path / "3.out").read_text()
