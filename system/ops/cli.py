"""The ``sessionlane`` command: serve, status, stop, doctor, race, bench.

Every subcommand that starts an actor system stops it before returning, whatever happens
(``Service.stop`` ends with a process-group kill). Exit codes: 0 success, 1 the job's own
failure (e.g. ``race`` found sessionlane lost a record, ``status`` found no service
answering), 2 usage or configuration errors (including "which service?": ``status`` and
``stop`` never guess between several, see ``sessionlane.system.ops.running``).

An address is ``HOST:PORT``, ``tcp://HOST:PORT`` or ``unix:///path`` everywhere; the option
naming the service is ``--listen`` on every command (``status --connect`` is a deprecated
alias).
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
from typing import TYPE_CHECKING, Any

from sessionlane.messages.errors import SessionLaneError, Unavailable
from sessionlane.system.config import ConfigError, load_settings
from sessionlane.system.ops.notify import notify
from sessionlane.system.ops.running import StateDirError

if TYPE_CHECKING:
    from sessionlane.system.ops.running import Choice

__all__ = ["main"]

log = logging.getLogger("sessionlane.system.ops.cli")

_LEFTOVER_WAIT_S = 5.0
"""How long ``serve`` waits for the actor processes of a dead service on its address to go."""


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
    except (ConfigError, StateDirError) as exc:
        print(f"sessionlane: {exc}", file=sys.stderr)
        return 2
    except SessionLaneError as exc:
        print(f"sessionlane: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


_ADDRESS_HELP = "HOST:PORT, tcp://HOST:PORT or unix:///path"
_VERBOSE_HELP = "log progress (INFO) to stderr"


def build_parser() -> argparse.ArgumentParser:
    from sessionlane.system._version import __version__

    parser = argparse.ArgumentParser(
        prog="sessionlane",
        description="Actor-model coordination for agent session transcripts.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"sessionlane {__version__}",
        help="print the version and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_serve(sub)
    _add_status_and_stop(sub)
    _add_doctor(sub)
    race = sub.add_parser("race", help="the multi-lane workload: sessionlane vs lock file")
    _add_race(race)

    bench = sub.add_parser("bench", help="performance against peers, in one run")
    _add_bench(bench)
    return parser


def _add_serve(sub: Any) -> None:
    """The ``serve`` subcommand and its options."""
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
        help=f"where clients connect: {_ADDRESS_HELP} (default tcp://127.0.0.1:7420)",
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
        " (default 127.0.0.1; anything else needs cluster_key_file or trusted_network = true)",
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
    serve.add_argument(
        "--allow-overlap",
        action="store_true",
        default=None,
        help="start even if a live service serves an equal, containing or nested root"
        " (each file is still served by one service at a time)",
    )
    serve.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    serve.set_defaults(func=cmd_serve)


def _add_status_and_stop(sub: Any) -> None:
    """The ``status`` and ``stop`` subcommands (they find a running service alike)."""
    which = (
        f"the service started with (or listening on) ADDR: {_ADDRESS_HELP}; default"
        " $SESSIONLANE_LISTEN, else the only service of this user that is running"
    )
    status = sub.add_parser("status", help="holders, queues, fences and counters")
    status.add_argument(
        "path", nargs="?", help="one transcript only (default: every active transcript)"
    )
    status.add_argument("--json", action="store_true", help="print the files as JSON")
    status.add_argument("--listen", metavar="ADDR", help=which)
    status.add_argument(
        "--connect", metavar="ADDR", help="deprecated alias of --listen", dest="connect"
    )
    status.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding the service's token (default $SESSIONLANE_TOKEN_FILE, if set)",
    )
    status.add_argument(
        "--service-user",
        metavar="USER",
        help="the user that must run the service (name, uid, or '*' for anyone); default:"
        " this user without a token, none with one (the service proves the token)",
    )
    status.set_defaults(func=cmd_status)

    stop = sub.add_parser("stop", help="stop a running service")
    stop.add_argument("--listen", metavar="ADDR", default=None, help=which)
    stop.add_argument(
        "--timeout",
        type=float,
        default=20.0,
        metavar="S",
        help="seconds to wait for a clean stop before killing the service (default 20)",
    )
    stop.set_defaults(func=cmd_stop)


def _add_doctor(sub: Any) -> None:
    """The ``doctor`` subcommand and its options."""
    doctor = sub.add_parser("doctor", help="check config, leftovers, torn files, lock files")
    doctor.add_argument(
        "--root",
        action="append",
        dest="roots",
        metavar="DIR",
        help="a directory of transcripts to check (repeatable; default the config's roots)",
    )
    doctor.add_argument("--config", metavar="FILE", help="TOML config file to check")
    doctor.add_argument("--json", action="store_true", help="print the findings as JSON")
    doctor.set_defaults(func=cmd_doctor)


# serve / status / stop ---------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from sessionlane.actors._shell import set_title
    from sessionlane.system.ops.preflight import check_settings
    from sessionlane.system.ops.startup import prepare_log, start_line
    from sessionlane.system.runtime.service import Service, ServiceError, install_signal_handlers

    overrides: dict[str, Any] = {
        "roots": args.roots,
        "listen": args.listen,
        "admin_port": args.admin_port,
        "leader": args.leader,
        "bind_host": args.bind_host,
        "allow_overlap": args.allow_overlap,
        "metrics_listen": args.metrics_listen,
    }
    settings, warnings = load_settings(args.config, overrides=overrides)
    if not settings.roots:
        raise ConfigError("roots", "no roots configured: pass --root DIR (or roots in the config)")
    for warning in warnings:
        print(f"sessionlane: warning: {warning}", file=sys.stderr)
    problems = check_settings(settings)  # unreadable secrets, unwritable roots: say what to do
    for problem in problems:
        print(f"sessionlane: cannot start: {problem.message}", file=sys.stderr)
    if problems:
        return 2
    if not settings.allow_overlap and _refuse_overlap(settings.roots):
        return 2
    _await_leftovers(settings.listen)
    set_title(f"serve {settings.listen}")  # `ps`; `status`/`stop` know the title (running.py)
    service = Service(settings, log_file=args.log_file)
    install_signal_handlers(service)
    started = start_line(settings, args.config)
    print(f"sessionlane: {started}", flush=True)
    print(f"sessionlane: logging to {service.log_file or 'stderr'}", flush=True)
    forget_log = prepare_log(service.log_file, started) if service.log_file else lambda: None
    try:
        service.start()
    except ServiceError as exc:
        print(f"sessionlane: cannot start: {exc}", file=sys.stderr)
        forget_log()
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
    serving = ", ".join(service.running.addresses if service.running else [])
    print(
        f"sessionlane serving {serving} for {', '.join(settings.roots)} (pid {os.getpid()})",
        flush=True,
    )
    notify("READY=1", f"STATUS=serving {serving}")  # Type=notify: the gateway listens now

    def before_stop() -> None:
        notify("STOPPING=1", "STATUS=stopping: draining")
        if metrics is not None:
            metrics.stop()

    try:
        service.serve_forever(before_stop=before_stop)
    finally:
        state.unlink(missing_ok=True)
        print("sessionlane stopped", flush=True)
    return 0


def _refuse_overlap(roots: Sequence[str]) -> bool:
    """Print why, and return True, when a live service already serves an overlapping root."""
    from sessionlane.system.ops.overlap import find_overlaps, live_services
    from sessionlane.system.runtime.service import state_dir

    overlaps = find_overlaps(roots, live_services(state_dir()))
    for overlap in overlaps:
        print(f"sessionlane: cannot start: {overlap.describe()}", file=sys.stderr)
    listens = sorted({o.service.listen for o in overlaps})
    if overlaps:
        stops = " or ".join(f"`sessionlane stop --listen {listen}`" for listen in listens)
        print(
            f"sessionlane: stop it first ({stops}), or pass --allow-overlap"
            " (allow_overlap = true) if the overlap is intended: each file is then served by"
            " one service at a time and the other answers `unavailable`",
            file=sys.stderr,
        )
    return bool(overlaps)


def _await_leftovers(listen: str) -> None:
    """Give a killed service's lifeline a moment to end its actor system (port, file locks)."""
    from sessionlane.system.ops.overlap import await_leftovers
    from sessionlane.system.runtime.service import state_dir

    left = await_leftovers(listen, state_dir(), _LEFTOVER_WAIT_S)
    if left:
        print(
            f"sessionlane: warning: {len(left)} processes of a dead service that listened on"
            f" {listen} are still running (pids {', '.join(map(str, left))})",
            file=sys.stderr,
        )


def _start_metrics(service: Any) -> Any:
    """The metrics endpoint if ``metrics_listen`` is set (prints where), else ``None``."""
    if service.settings.metrics_listen is None:
        return None
    from sessionlane.system.ops.metrics import serve_metrics

    server = serve_metrics(service)
    print(f"sessionlane: metrics at {server.url}", flush=True)
    return server


def cmd_status(args: argparse.Namespace) -> int:
    from sessionlane.system.client import connect
    from sessionlane.system.client._verify import resolve_user
    from sessionlane.system.config import normalize_listen, read_token_file

    named = args.listen
    if args.connect:
        print("sessionlane: status --connect is deprecated; use --listen", file=sys.stderr)
        if named and normalize_listen(named) != normalize_listen(args.connect):
            raise ConfigError("listen", "--listen and --connect name different services")
        named = named or args.connect
    choice = _choose(named, live_only=True)
    if choice.kind == "one":
        address = (choice.found.addresses or [choice.found.listen])[0]
    elif named is not None:
        address = normalize_listen(named)  # not started by `serve` here: ask it directly
    else:
        hint = _other_users_service(None, "status")
        return 1 if hint else _refuse_to_guess("status", choice)
    token_file = args.token_file or os.environ.get("SESSIONLANE_TOKEN_FILE") or None
    token = read_token_file(token_file) if token_file else None
    try:
        service_user = resolve_user(args.service_user)
    except ValueError as exc:
        raise ConfigError("service_user", str(exc)) from None
    try:
        sl = connect(address, token, service_user=service_user)
    except Unavailable as exc:
        if _other_users_service(address, "status"):
            return 1
        cause = exc.__cause__
        why = cause.strerror if isinstance(cause, OSError) and cause.strerror else exc.detail
        print(f"sessionlane: no service answers at {address} ({why})", file=sys.stderr)
        return 1
    except SessionLaneError as exc:  # refused, either way: say whose the address is too
        print(f"sessionlane: {exc}", file=sys.stderr)
        _other_users_service(address, "status")
        return 1
    with sl:
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
        if f.counters.get("in_grace") and f.holder:
            awaited = f.holder.lane.removesuffix(" (awaiting reclaim)")
            print(
                f"  in the restart grace: awaiting {awaited}"
                f" (lease {f.holder.lease}, fence {f.counters.get('awaited_fence')},"
                f" {f.holder.purpose}) for {f.counters.get('grace_left_ms')} ms more;"
                " nobody else is granted until it is back or the grace ends"
            )
        for i, q in enumerate(f.queue, 1):
            print(f"  {i}. {q.lane} {q.purpose}/{q.priority} waiting {q.waited_ms} ms")
        shown = {k: v for k, v in f.counters.items() if v and not k.startswith("hist:")}
        print("  " + ", ".join(f"{k}={v}" for k, v in sorted(shown.items())))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop the service meant (see ``running``); idempotent: nothing running is exit 0.

    State files left by dead services (a SIGKILLed serve) are cleaned up on the way: their
    leftover actor group killed, the file removed. Several live services that could be meant
    are refused (exit 2), never guessed between. A service of another user, which this user
    cannot stop, is named with how to stop it (exit 1).
    """
    from sessionlane.system.ops.running import found_services, plan_stop
    from sessionlane.system.runtime.service import state_dir

    named = _named(args.listen)
    plan = plan_stop(found_services(state_dir()), named)
    if plan.live.kind == "several":
        return _refuse_to_guess("stop", plan.live)
    for stale in plan.stale:  # its serve died without cleaning up (e.g. SIGKILLed)
        _kill_actor_group(stale.state)
        stale.path.unlink(missing_ok=True)
        print(f"sessionlane: service pid {stale.pid} was not running; cleaned up after it")
    if plan.live.kind == "none":
        return _nothing_to_stop(named)
    state, pid = plan.live.found.state, plan.live.found.pid
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


def _other_users_service(address: str | None, command: str) -> bool:
    """If ``address`` (default: the clients' default address) is served by another user's
    process, print who and how to reach it (``systemctl``, or run as that user); whether so."""
    from sessionlane.system.client._core import default_address
    from sessionlane.system.ops.holders import service_hint

    address = address or default_address()
    hint = service_hint(address, f"{command} --listen {address}")
    if hint is None:
        return False
    print(f"sessionlane: {hint}", file=sys.stderr)
    return True


def _nothing_to_stop(named: str | None) -> int:
    """No live service of this user is meant: 0, unless another user's serves the address."""
    if _other_users_service(named, "stop"):
        return 1
    what = f"started with --listen {named}" if named else "of this user"
    print(f"sessionlane: no service {what} is running; nothing to stop")
    return 0


def _named(listen: str | None) -> str | None:
    """The address the user named: ``--listen``, else ``$SESSIONLANE_LISTEN``; a malformed
    one is a ``ConfigError``."""
    from sessionlane.system.config import normalize_listen

    named = listen or os.environ.get("SESSIONLANE_LISTEN") or None
    if named is not None:
        normalize_listen(named)
    return named


def _choose(named: str | None, *, live_only: bool) -> Choice:
    """The service a command means (``sessionlane.system.ops.running.choose``);
    ``$SESSIONLANE_LISTEN`` names one when the command line does not. A malformed address is a
    ``ConfigError``."""
    from sessionlane.system.ops.running import choose, found_services
    from sessionlane.system.runtime.service import state_dir

    return choose(found_services(state_dir()), _named(named), live_only=live_only)


def _refuse_to_guess(command: str, choice: Choice) -> int:
    """No service (exit 1) or several (exit 2) could be meant: say which, ask for ``--listen``."""
    if choice.kind == "none":
        print(
            "sessionlane: no service of this user is running (for one started elsewhere,"
            f" pass {command} --listen ADDR)",
            file=sys.stderr,
        )
        return 1
    print(
        f"sessionlane: {len(choice.candidates)} services could be meant; pass --listen ADDR"
        " to choose one:",
        file=sys.stderr,
    )
    for found in choice.candidates:
        print(f"  {found.describe()}", file=sys.stderr)
    return 2


def _is_serve_process(pid: int) -> bool:
    """Whether ``pid`` is a live ``serve`` of this user (a recycled pid must not be signalled)."""
    from sessionlane.system.ops.running import is_serve_process

    return is_serve_process(pid)


def _kill_actor_group(state: dict[str, Any]) -> None:
    """SIGKILL the actor group of a service whose serve process is gone (e.g. SIGKILLed).

    Only if the group is still that service's: its admin still listens on the recorded port.
    """
    from sessionlane.system.runtime.launch import _admin_pid

    pgid, port = state.get("pgid"), state.get("admin_port")
    if not pgid or not port:
        return
    admin = _admin_pid(int(port))
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if admin is not None and os.getpgid(admin) == int(pgid):
            os.killpg(int(pgid), signal.SIGKILL)
            print(f"sessionlane: killed the actor group {pgid} left behind", file=sys.stderr)


def cmd_doctor(args: argparse.Namespace) -> int:
    from sessionlane.system.ops.doctor import run_doctor

    return run_doctor(args)


# race / bench ------------------------------------------------------------------------------


def _add_race(parser: argparse.ArgumentParser) -> None:
    try:
        from sessionlane.system.race import add_race_arguments
    except ImportError:  # pragma: no cover - during development only
        parser.set_defaults(func=lambda a: _missing("race"))
        return
    add_race_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    parser.set_defaults(func=cmd_race)


def cmd_race(args: argparse.Namespace) -> int:
    from sessionlane.system.race.main import run

    return run(args)


def _add_bench(parser: argparse.ArgumentParser) -> None:
    try:
        from sessionlane.system.bench import add_bench_arguments
    except ImportError:
        parser.set_defaults(func=lambda a: _missing("bench"))
        return
    add_bench_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    parser.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from sessionlane.system.bench import run_bench

    result: int = run_bench(args)
    return result


def _missing(what: str) -> int:
    print(f"sessionlane: {what} is not available in this build", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
