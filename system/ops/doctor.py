"""``sessionlane doctor``: what on this machine needs an operator's attention.

Reports, and changes nothing:

* the effective config (file, ``SESSIONLANE_*`` environment, ``--root``) and its warnings; an
  invalid config is a problem;
* under every root: transcripts whose last line is torn (no final newline: sessionlane moves
  those bytes to ``<name>.torn`` when it next opens the file), quarantine files (``*.torn``,
  with their byte and tear counts: torn data waiting for a human), temp files of an interrupted
  compaction or fence reservation, unreadable fence sidecars, and legacy lock files
  (``<transcript>.lock``) with their stale reasons (``sessionlane.actors.openclaw_lock.inspect``);
* the addresses ``serve`` would bind (``listen``, ``metrics_listen``, a fixed ``admin_port``):
  a process other than this user's running service holding one is a problem, named by pid,
  user and command line;
* state files of ``sessionlane serve`` (``sessionlane.system.runtime.service.state_dir()``) whose
  process is dead,
  and the actor processes of that service still running;
* live services whose roots overlap (equal, nested or containing:
  ``sessionlane.system.ops.overlap``); each of their files is served by whichever opens it first,
  and the other answers ``unavailable``;
* leftover actor processes of any sessionlane/thespian system whose admin is gone.

How a leftover actor process is recognised (Linux ``/proc``; measured on thespian 4.0.1 and
CPython 3.11). Thespian daemonises a system: an intermediate process calls ``setsid()``,
forks the admin and exits, and the admin forks its logger and every actor. So all of them
share one session and process group whose leader (``pid == pgid``) is gone or a zombie, and
every member listens on a TCP port of its own (thespian's transport; sessionlane's forks drop
every inherited socket, so the admin's port is not shared). While the admin lives every other
member is its child; when it dies they are re-parented (to PID 1 or a subreaper). The signal
used is therefore: *a group led by a vanished session leader, whose members are Python
processes each holding a listening TCP socket, and in which no member's parent is a member*.
The cmdline is not enough on its own: a forked process keeps the argv of whatever started the
system (``python -m pytest``, ``sessionlane race``) until it is titled (thespian titles its
admin and logger ``MultiProcAdmin ActorAddr-...``, ``logger ActorAddr-...``; sessionlane's
actors title themselves ``sessionlane: <role>``). A system started by ``serve`` normally dies
with it (``sessionlane.system.runtime.lifeline``);
what is found here outlived its lifeline (a starter killed in the instant before it armed it,
or a system of an older version).

``run_doctor`` exits 0 when nothing is a problem and 1 otherwise; ``--json`` prints the report
as one JSON object (``ok``, ``config``, ``findings``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from sessionlane.actors import procfs
from sessionlane.actors.fencestore import parse_fence_record
from sessionlane.actors.openclaw_lock import inspect as inspect_lock
from sessionlane.actors.openclaw_lock import parse_lock_payload, reclaimable
from sessionlane.system.config import ConfigError, Settings, load_settings
from sessionlane.system.ops.holders import describe_holders, holders
from sessionlane.system.ops.overlap import find_overlaps, live_services
from sessionlane.system.ops.running import Found, found_services, is_live
from sessionlane.system.runtime.service import state_dir

__all__ = ["Finding", "Report", "diagnose", "leftover_processes", "run_doctor"]

Check = Literal["config", "port", "torn", "quarantine", "temp", "fence", "lock", "state", "process"]

_TEMP = re.compile(r"\.(?P<base>.+)\.[0-9a-f]{12}\.tmp")
_FENCE = re.compile(r"\.(?P<base>.+)\.fence")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Finding:
    """One thing the doctor noticed."""

    check: Check
    problem: bool
    """True when it needs attention (makes the exit status 1); False for information."""
    detail: str
    path: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    config: dict[str, Any]
    findings: list[Finding]

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.problem]

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": not self.problems,
            "config": self.config,
            "findings": [asdict(f) for f in self.findings],
        }

    def human(self) -> str:
        lines = ["sessionlane doctor"]
        cfg = self.config
        lines.append(f"config: {cfg.get('source') or 'defaults and environment'}")
        for key, value in (cfg.get("settings") or {}).items():
            lines.append(f"  {key} = {json.dumps(value)}")
        for warning in cfg.get("warnings", []):
            lines.append(f"  warning: {warning}")
        titles: dict[Check, str] = {
            "config": "config",
            "port": "addresses serve wants",
            "torn": "transcripts",
            "quarantine": "quarantine files",
            "temp": "leftover temp files",
            "fence": "fence files",
            "lock": "legacy lock files",
            "state": "service state files",
            "process": "actor processes",
        }
        for check, title in titles.items():
            found = [f for f in self.findings if f.check == check]
            if not found:
                continue
            lines.append(f"{title}:")
            for f in found:
                mark = "PROBLEM" if f.problem else "ok"
                lines.append(f"  {mark}: {f.detail}")
        n = len(self.problems)
        lines.append(f"{n} problem{'s' if n != 1 else ''} found" if n else "healthy")
        return "\n".join(lines)


def run_doctor(args: argparse.Namespace) -> int:
    """The ``doctor`` subcommand: print the report; 0 when healthy, 1 when problems were found."""
    report = diagnose(getattr(args, "roots", None), getattr(args, "config", None))
    if getattr(args, "json", False):
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        print(report.human())
    return 1 if report.problems else 0


def diagnose(
    roots: Sequence[str] | None, config: str | None, *, now: float | None = None
) -> Report:
    """Every check; ``now`` (Unix seconds) is injectable for tests."""
    now = time.time() if now is None else now
    findings: list[Finding] = []
    cfg: dict[str, Any] = {"source": config or os.environ.get("SESSIONLANE_CONFIG")}
    suffixes = [".jsonl"]
    scan_roots = [os.path.realpath(r) for r in roots or [] if os.path.isdir(r)]
    try:
        settings, warnings = load_settings(config, overrides={"roots": list(roots or []) or None})
    except ConfigError as exc:
        findings.append(Finding("config", True, f"invalid config: {exc}"))
        cfg["error"] = str(exc)
    else:
        cfg["settings"] = settings.model_dump(mode="json")
        cfg["warnings"] = warnings
        suffixes = list(settings.suffixes)
        scan_roots = list(settings.roots)
        if not scan_roots:
            findings.append(Finding("config", False, "no roots configured: nothing to scan"))
        findings += check_ports(wanted_addresses(settings), state_dir())
    for root in scan_roots:
        findings += check_root(root, suffixes, now)
    findings += check_state_files(state_dir())
    findings += check_overlaps(state_dir())
    findings += [
        Finding(
            "process",
            True,
            f"leftover actor processes (admin gone), process group {g['pgid']}: pids "
            f"{', '.join(map(str, g['pids']))}; ports {g['ports']}; {g['cmdline']}",
            data=g,
        )
        for g in leftover_processes()
    ]
    return Report(cfg, findings)


# Addresses ---------------------------------------------------------------------------------


def wanted_addresses(settings: Settings) -> list[tuple[str, str]]:
    """``(what, address)`` of every address ``serve`` with ``settings`` would bind (port 0,
    a fresh port each time, is never busy)."""
    wanted = [("listen", settings.listen)]
    if settings.metrics_listen:
        metrics = settings.metrics_listen
        wanted.append(("metrics_listen", metrics if "://" in metrics else f"tcp://{metrics}"))
    if settings.admin_port:
        wanted.append(("admin_port", f"tcp://{settings.bind_host}:{settings.admin_port}"))
    return wanted


def check_ports(wanted: Sequence[tuple[str, str]], directory: Path) -> list[Finding]:
    """Who holds each wanted address: a running service of this user (information), or
    anything else (a problem: ``serve`` would fail to bind), named by pid, user and command
    line (``sessionlane.system.ops.holders``)."""
    ours: dict[int, int] = {}  # pid -> the serve pid it belongs to
    for found in live_services_found(directory):
        ours[found.pid] = found.pid
        pgid = found.state.get("pgid")
        for pid, st in procfs.all_stats().items():
            if isinstance(pgid, int) and st.pgrp == pgid:
                ours[pid] = found.pid
    findings = []
    for what, address in wanted:
        held = holders(address)
        if not held:
            continue
        serving = {ours[h.pid] for h in held if h.pid in ours}
        if serving:
            detail = f"{address} ({what}) is served by this user's sessionlane pid {min(serving)}"
            findings.append(Finding("port", False, detail, data={"address": address}))
            continue
        detail = (
            f"{address} ({what}), which serve wants, is held by {describe_holders(held)}:"
            " stop that, or choose another address"
        )
        data = {
            "address": address,
            "holders": [
                {"pid": h.pid, "uid": h.uid, "user": h.user, "command": h.command, "unit": h.unit}
                for h in held
            ],
        }
        findings.append(Finding("port", True, detail, data=data))
    return findings


def live_services_found(directory: Path) -> list[Found]:
    return [f for f in found_services(directory) if f.live]


# Files under the roots ---------------------------------------------------------------------


def check_root(root: str, suffixes: Sequence[str], now: float) -> list[Finding]:
    findings: list[Finding] = []
    for directory, names in _walk(root):
        for name in sorted(names):
            path = os.path.join(directory, name)
            findings += _check_file(path, name, suffixes, now)
    return findings


def _walk(root: str) -> Iterator[tuple[str, list[str]]]:
    for directory, _dirs, files in os.walk(root, onerror=None, followlinks=False):
        yield directory, files


def _check_file(path: str, name: str, suffixes: Sequence[str], now: float) -> list[Finding]:
    try:
        if any(name.endswith(s) for s in suffixes):
            torn = torn_bytes(path)
            if torn:
                detail = f"{path}: torn last line, {torn} bytes after the last newline"
                return [Finding("torn", True, detail, path, {"torn_bytes": torn})]
        elif any(name.endswith(s + ".torn") for s in suffixes):
            data = Path(path).read_bytes()
            info = {"bytes": len(data), "tears": data.count(b"\n")}
            detail = (
                f"{path}: {info['bytes']} quarantined bytes in {info['tears']} torn line(s);"
                " review, then remove"
            )
            return [Finding("quarantine", True, detail, path, info)]
        elif any(name.endswith(s + ".lock") for s in suffixes):
            return [_check_lock(path, now)]
        elif _TEMP.fullmatch(name):
            detail = f"{path}: temp file of an interrupted compaction or fence reservation"
            return [Finding("temp", True, detail, path, {"bytes": os.path.getsize(path)})]
        elif (m := _FENCE.fullmatch(name)) and any(m["base"].endswith(s) for s in suffixes):
            try:
                parse_fence_record(Path(path).read_bytes())
            except ValueError as exc:
                detail = f"{path}: unreadable fence file ({exc}); the file's actor cannot start"
                return [Finding("fence", True, detail, path)]
    except OSError as exc:
        return [Finding("torn", True, f"{path}: cannot read: {exc}", path)]
    return []


def torn_bytes(path: str) -> int:
    """How many bytes follow the last newline of ``path`` (0 when it ends with one)."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - _CHUNK)
            fh.seek(start)
            chunk = fh.read(end - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                return size - (start + newline + 1)
            end = start
        return size


def _check_lock(path: str, now: float) -> Finding:
    reasons = inspect_lock(path, now)
    try:
        st = os.stat(path)
        payload = parse_lock_payload(Path(path).read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return Finding("lock", False, f"{path}: released while being inspected", path)
    pid = payload.pid if payload else None
    age_s = now - st.st_mtime
    data = {"pid": pid, "stale_reasons": list(reasons), "age_s": round(age_s, 1)}
    if not reasons:
        return Finding("lock", False, f"{path}: held by live pid {pid}", path, data)
    removable = reclaimable(reasons, age_s * 1000)
    data["reclaimable"] = removable
    detail = f"{path}: stale ({', '.join(reasons)}), pid {pid}, {age_s:.0f} s old; " + (
        "the next writer may remove it" if removable else "a live owner: left alone"
    )
    return Finding("lock", True, detail, path, data)


# Services and processes --------------------------------------------------------------------


def check_state_files(directory: Path) -> list[Finding]:
    findings: list[Finding] = []
    for state in sorted(directory.glob("serve-*.json")):
        try:
            data = json.loads(state.read_text())
            pid, pgid = int(data["pid"]), data.get("pgid")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            findings.append(Finding("state", True, f"{state}: unreadable: {exc}", str(state)))
            continue
        if is_live(data):
            detail = f"{state}: service pid {pid} running ({data.get('listen')})"
            findings.append(Finding("state", False, detail, str(state), data))
            continue
        detail = f"{state}: stale, service pid {pid} is dead ({data.get('listen')})"
        findings.append(Finding("state", True, detail, str(state), data))
        members = _group_members(int(pgid)) if isinstance(pgid, int) else []
        if members:
            detail = (
                f"actor processes of the dead service {pid} still run in process group "
                f"{pgid}: pids {', '.join(map(str, members))}"
            )
            info = {"pgid": pgid, "pids": members}
            findings.append(Finding("process", True, detail, str(state), info))
    return findings


def check_overlaps(directory: Path) -> list[Finding]:
    """Live services (by their state files) whose roots overlap: a problem each pair."""
    services = live_services(directory)
    findings = []
    for i, first in enumerate(services):
        for second in services[i + 1 :]:
            for overlap in find_overlaps(first.roots, [second]):
                detail = (
                    f"live services pid {first.pid} ({first.address}) and pid {second.pid}"
                    f" ({second.address}) serve overlapping roots: {overlap.sentence}; each file"
                    " there is served by whichever opens it first and the other answers"
                    " `unavailable`: stop one of them"
                )
                data = {
                    "pids": [first.pid, second.pid],
                    "addresses": [first.address, second.address],
                    "roots": [overlap.mine, overlap.theirs],
                    "relation": overlap.relation,
                }
                findings.append(Finding("state", True, detail, data=data))
    return findings


def _live_procs() -> dict[int, procfs.ProcStat]:
    return {pid: st for pid, st in procfs.all_stats().items() if st.live}


def _group_members(pgid: int) -> list[int]:
    return sorted(p.pid for p in _live_procs().values() if p.pgrp == pgid)


def leftover_processes() -> list[dict[str, Any]]:
    """Thespian system groups whose admin is gone (see the module docstring for the signal)."""
    procs = _live_procs()
    own = os.getpgid(0)
    groups: dict[int, list[procfs.ProcStat]] = {}
    for proc in procs.values():
        leader = procs.get(proc.pgrp)
        if proc.pgrp == proc.session and proc.pgrp != own and leader is None:
            groups.setdefault(proc.pgrp, []).append(proc)
    sockets = procfs.listening_tcp()
    found = []
    for pgid, members in sorted(groups.items()):
        pids = {p.pid for p in members}
        if any(p.ppid in pids for p in members):
            continue  # a live admin still parents its actors
        commands = [procfs.command_line(p.pid) for p in members]
        if not all(_is_python(c) for c in commands):
            continue
        held = [procfs.socket_inodes(p.pid) & sockets.keys() for p in members]
        if not all(held):
            continue  # not the shape of a thespian system: every member listens
        ports = sorted({sockets[i][1] for inodes in held for i in inodes})
        found.append(
            {"pgid": pgid, "pids": sorted(pids), "ports": ports, "cmdline": commands[0][:200]}
        )
    return found


def _is_python(cmdline: str) -> bool:
    argv0 = os.path.basename(cmdline.split(" ", 1)[0]) if cmdline else ""
    # Titled processes: ours (``sessionlane: file ...``), thespian's (``logger ActorAddr-...``).
    return argv0.startswith("python") or "sessionlane" in cmdline or "ActorAddr-" in cmdline
