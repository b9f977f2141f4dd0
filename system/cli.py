"""The ``sessionlane`` command: serve, status, stop, doctor, race, bench.

Every subcommand that starts an actor system stops it before returning, whatever happens
(``Service.stop`` ends with a process-group kill). Exit codes: 0 success, 1 the job's own
failure (e.g. ``race`` found sessionlane lost a record), 2 usage or configuration errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from messages.errors import SessionLaneError
from system.config import ConfigError, load_settings

__all__ = ["main"]

log = logging.getLogger("system.cli")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        print(f"sessionlane: {exc}", file=sys.stderr)
        return 2
    except SessionLaneError as exc:
        print(f"sessionlane: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sessionlane",
        description="Actor-model coordination for agent session transcripts.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the service in the foreground")
    serve.add_argument(
        "--root",
        action="append",
        dest="roots",
        metavar="DIR",
        help="a directory whose transcripts this service owns (repeatable)",
    )
    serve.add_argument(
        "--listen",
        metavar="ADDR",
        help="tcp://HOST:PORT or unix:///path (default tcp://127.0.0.1:7420)",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML config file")
    serve.add_argument(
        "--admin-port",
        type=int,
        metavar="P",
        help="thespian admin port (default: a fresh free port); fixed, it lets members join",
    )
    serve.add_argument(
        "--leader",
        metavar="HOST:PORT",
        help="join the convention whose leader's admin port is HOST:PORT",
    )
    serve.add_argument(
        "--bind",
        dest="bind_host",
        metavar="ADDR",
        help="IPv4 address every thespian port (and by default the gateway) listens on"
        " (default 127.0.0.1; anything else needs trusted_network = true)",
    )
    serve.add_argument(
        "--log-file",
        metavar="FILE",
        help="where the actors log: FILE, or - for stderr (default: stderr under systemd,"
        " else serve-<listen>.log in $XDG_STATE_HOME/sessionlane, rotated)",
    )
    serve.add_argument(
        "--metrics",
        dest="metrics_listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (a bare PORT: on"
        " 127.0.0.1; default: off)",
    )
    serve.add_argument("-v", "--verbose", action="store_true")
    serve.set_defaults(func=cmd_serve)

    status = sub.add_parser("status", help="holders, queues, fences and counters")
    status.add_argument("path", nargs="?")
    status.add_argument("--json", action="store_true")
    status.add_argument("--connect", metavar="ADDR", help="service address")
    status.add_argument("--token-file", metavar="FILE")
    status.set_defaults(func=cmd_status)

    stop = sub.add_parser("stop", help="stop a running service")
    stop.add_argument(
        "--listen",
        metavar="ADDR",
        default=None,
        help="the listen address the service was started with",
    )
    stop.add_argument("--timeout", type=float, default=20.0)
    stop.set_defaults(func=cmd_stop)

    doctor = sub.add_parser("doctor", help="check config, leftovers, torn files, lock files")
    doctor.add_argument("--root", action="append", dest="roots", metavar="DIR")
    doctor.add_argument("--config", metavar="FILE")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(func=cmd_doctor)

    race = sub.add_parser("race", help="the multi-lane workload: sessionlane vs lock file")
    _add_race(race)

    bench = sub.add_parser("bench", help="performance against peers, in one run")
    _add_bench(bench)
    return parser


# serve / status / stop ---------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from system.service import Service, ServiceError, install_signal_handlers

    overrides: dict[str, Any] = {
        "roots": args.roots,
        "listen": args.listen,
        "admin_port": args.admin_port,
        "leader": args.leader,
        "bind_host": args.bind_host,
        "metrics_listen": args.metrics_listen,
    }
    settings, warnings = load_settings(args.config, overrides=overrides)
    if not settings.roots:
        raise ConfigError("roots", "no roots configured: pass --root DIR (or roots in the config)")
    for warning in warnings:
        print(f"sessionlane: warning: {warning}", file=sys.stderr)
    service = Service(settings, log_file=args.log_file)
    install_signal_handlers(service)
    print(f"sessionlane: logging to {service.log_file or 'stderr'}", flush=True)
    try:
        service.start()
    except ServiceError as exc:
        print(f"sessionlane: cannot start: {exc}", file=sys.stderr)
        return 2
    try:
        metrics = _start_metrics(service)
    except OSError as exc:
        service.stop()
        print(
            f"sessionlane: cannot serve metrics on {settings.metrics_listen}: {exc}",
            file=sys.stderr,
        )
        return 2
    state = service.write_state()
    print(
        f"sessionlane serving {', '.join(service.running.addresses if service.running else [])}"
        f" for {', '.join(settings.roots)} (pid {os.getpid()})",
        flush=True,
    )
    try:
        service.serve_forever(before_stop=metrics.stop if metrics is not None else None)
    finally:
        state.unlink(missing_ok=True)
        print("sessionlane stopped", flush=True)
    return 0


def _start_metrics(service: Any) -> Any:
    """The metrics endpoint if ``metrics_listen`` is set (prints where), else ``None``."""
    if service.settings.metrics_listen is None:
        return None
    from system.metrics import serve_metrics

    server = serve_metrics(service)
    print(f"sessionlane: metrics at {server.url}", flush=True)
    return server


def cmd_status(args: argparse.Namespace) -> int:
    from system.client import connect

    address = args.connect or _default_address()
    if not args.connect and "SESSIONLANE_LISTEN" not in os.environ:
        running = _running_states()
        if len(running) == 1:  # the one service running here, whatever it listens on
            address = running[0][1]["addresses"][0]
    token = None
    if args.token_file:
        with open(args.token_file) as fh:
            token = fh.read().strip()
    with connect(address, token, reconnect_for=2.0) as sl:
        reply = sl.status(args.path)
    if args.json:
        print(json.dumps(reply.model_dump(mode="json")["files"], indent=2))
        return 0
    if not reply.files:
        print("no active session files")
    for f in reply.files:
        holder = (
            f"{f.holder.lane} ({f.holder.purpose}, {f.holder.held_ms} ms, lease {f.holder.lease})"
            if f.holder
            else "free"
        )
        print(f"{f.path}\n  fence {f.fence}; holder: {holder}")
        for i, q in enumerate(f.queue, 1):
            print(f"  {i}. {q.lane} {q.purpose}/{q.priority} waiting {q.waited_ms} ms")
        shown = {k: v for k, v in f.counters.items() if v and not k.startswith("hist:")}
        print("  " + ", ".join(f"{k}={v}" for k, v in sorted(shown.items())))
    return 0


def _default_address() -> str:
    env = os.environ.get("SESSIONLANE_LISTEN")
    return env or "tcp://127.0.0.1:7420"


def cmd_stop(args: argparse.Namespace) -> int:
    from system.service import state_file

    explicit = args.listen or os.environ.get("SESSIONLANE_LISTEN")
    running = _running_states()
    if explicit:
        path = state_file(explicit)
    elif len(running) == 1:  # the one service running here, whatever it listens on
        path = running[0][0]
    elif running:
        listens = ", ".join(str(state.get("listen")) for _, state in running)
        print(f"sessionlane: several services are running ({listens}): pass --listen")
        return 2
    elif stale := _running_states(live=False):
        # Services whose serve process died without cleaning up (e.g. SIGKILLed).
        for stale_path, state in stale:
            _kill_actor_group(state)
            stale_path.unlink(missing_ok=True)
            print(f"sessionlane: service pid {state.get('pid')} was not running; cleaned up")
        return 0
    else:
        path = state_file(_default_address())
    if not path.exists():
        print(
            f"sessionlane: no service started with --listen {explicit or _default_address()}"
            " is running",
            file=sys.stderr,
        )
        return 1
    state = json.loads(path.read_text())
    pid = int(state["pid"])
    if not _is_serve_process(pid):
        _kill_actor_group(state)
        path.unlink(missing_ok=True)
        print(f"sessionlane: service pid {pid} was not running; removed its state file")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if not _is_serve_process(pid):
            _kill_actor_group(state)  # normally already gone: serve stops its actors
            print(f"sessionlane: stopped service pid {pid}")
            return 0
        time.sleep(0.05)
    print(
        f"sessionlane: service pid {pid} did not stop within {args.timeout:.0f} s; "
        f"killing it and its actor group {state.get('pgid')}",
        file=sys.stderr,
    )
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _kill_actor_group(state)
    return 1


def _running_states(*, live: bool = True) -> list[tuple[Path, dict[str, Any]]]:
    """State files (this user's) of the services running here; with ``live=False``, of
    the services whose serve process is gone."""
    from system.service import state_dir

    found = []
    for path in sorted(state_dir().glob("serve-*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and _is_serve_process(int(state.get("pid", 0))) == live:
            found.append((path, state))
    return found


def _is_serve_process(pid: int) -> bool:
    """Whether ``pid`` is alive and is a ``serve`` (a recycled pid must not be signalled)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            zombie = fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return False
    return not zombie and b"serve" in argv


def _kill_actor_group(state: dict[str, Any]) -> None:
    """SIGKILL the actor group of a service whose serve process is gone (e.g. SIGKILLed).

    Only if the group is still that service's: its admin still listens on the recorded port.
    """
    from system.launch import _admin_pid

    pgid, port = state.get("pgid"), state.get("admin_port")
    if not pgid or not port:
        return
    admin = _admin_pid(int(port))
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if admin is not None and os.getpgid(admin) == int(pgid):
            os.killpg(int(pgid), signal.SIGKILL)
            print(f"sessionlane: killed the actor group {pgid} left behind", file=sys.stderr)


def cmd_doctor(args: argparse.Namespace) -> int:
    from system.doctor import run_doctor

    return run_doctor(args)


# race / bench ------------------------------------------------------------------------------


def _add_race(parser: argparse.ArgumentParser) -> None:
    try:
        from system.race import add_race_arguments
    except ImportError:  # pragma: no cover - during development only
        parser.set_defaults(func=lambda a: _missing("race"))
        return
    add_race_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.set_defaults(func=cmd_race)


def cmd_race(args: argparse.Namespace) -> int:
    from system.race.main import run

    return run(args)


def _add_bench(parser: argparse.ArgumentParser) -> None:
    try:
        from system.bench import add_bench_arguments
    except ImportError:
        parser.set_defaults(func=lambda a: _missing("bench"))
        return
    add_bench_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from system.bench import run_bench

    result: int = run_bench(args)
    return result


def _missing(what: str) -> int:
    print(f"sessionlane: {what} is not available in this build", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
