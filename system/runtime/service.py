"""The running service: actor system + Registry + Gateway, supervised, always stopped.

``Service`` is what ``sessionlane serve`` runs in the foreground and what ``race``, ``bench``
and the tests embed. The process that creates it is the supervisor: it checks every second
that the admin is alive and that the gateway answers a ping, and if not, kills the whole actor
process group and starts again on a fresh admin port (fences continue upward: they are
persisted per path). ``stop()`` drains first (queued requests are answered
``shutting_down``), then shuts the system down with a process-group kill as the backstop.

Only the supervisor thread may call into the actor system (thespian's external endpoint is not
thread-safe); signal handlers just set a flag.

Conventions (``sessionlane.actors.convention``): a service with ``leader`` set joins the convention
led by that admin; a service with a fixed ``admin_port`` and no ``leader`` can lead one (it runs the
Directory). Either way every thespian port listens on ``bind_host``, and the service does not
open its gateway until the directory has admitted its roots; a refusal is a ``ServiceError``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thespian.actors import ActorSystemException

from sessionlane.actors import page_merge, procfs
from sessionlane.actors.convention import DIRECTORY_NAME, Directory, member_capabilities
from sessionlane.actors.registry import REGISTRY_NAME, Registry
from sessionlane.messages.convention import Join, Joined, JoinRefused
from sessionlane.messages.internal import (
    AwaitHolders,
    Configure,
    Configured,
    Drain,
    Drained,
    FileSettings,
    GatewayFailed,
    GatewayStarted,
    HoldersAwaited,
    Ping,
    Pong,
    ServiceIdentity,
    StartGateway,
)
from sessionlane.system.config import (
    ConfigError,
    Settings,
    load_settings,
    parse_leader,
    read_cluster_key,
    read_token,
)
from sessionlane.system.gateway.gateway import Gateway
from sessionlane.system.ops import logs
from sessionlane.system.ops.overlap import busy_listener_hint as _busy_listener_hint
from sessionlane.system.ops.running import private_dir, process_start
from sessionlane.system.runtime import zygote
from sessionlane.system.runtime.held_scan import scan_held
from sessionlane.system.runtime.launch import TcpSystem, start_tcp_system
from sessionlane.system.runtime.limits import explain_create_failure, fit_max_files

__all__ = [
    "Service",
    "ServiceError",
    "create_actor",
    "embedded_service",
    "state_dir",
    "state_file",
]

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 15.0
_JOIN_TIMEOUT_S = 15.0
_PING_TIMEOUT_S = 3.0
_PING_FAILURES = 3


class ServiceError(RuntimeError):
    """The service could not start (a bound port, a bad root, an actor that would not come up)."""


def state_dir() -> Path:
    """Where running services leave their state file: per user, private
    (``$XDG_RUNTIME_DIR/sessionlane-<uid>``, else in the temporary directory). Raises
    ``StateDirError`` (``sessionlane.system.ops.running.private_dir``) if it is not this
    user's private directory."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return private_dir(base / f"sessionlane-{os.getuid()}")


def state_file(listen: str) -> Path:
    digest = hashlib.sha256(listen.encode()).hexdigest()[:12]
    return state_dir() / f"serve-{digest}.json"


def busy_listener_hint(listen: list[str]) -> str:
    """What is known about who holds a gateway address (see ``sessionlane.system.ops.overlap``)."""
    return _busy_listener_hint(listen, state_dir())


def file_settings_from(
    settings: Settings, owner: ServiceIdentity | None = None, started_ms: float = 0.0
) -> FileSettings:
    """The SessionFiles' settings; ``started_ms``: when the service started (monotonic ms)."""
    return FileSettings(
        owner=owner,
        reclaim_until_ms=started_ms + settings.reclaim_grace_ms if started_ms else 0.0,
        max_hold_ms=settings.max_hold_ms,
        wait_timeout_ms=settings.wait_timeout_ms,
        aging_ms=settings.aging_ms,
        max_queue=settings.max_queue,
        idle_ms=settings.idle_ms,
        durability=settings.durability,
        max_record_bytes=settings.max_record_bytes,
        legacy_lock=settings.legacy_lock,
        memory_merge=settings.memory_merge,
        channel_loop_ms=settings.channel_loop_ms,
    )


def create_actor(asys: Any, cls: type, what: str, **kwargs: Any) -> Any:
    """``asys.createActor``, with thespian's failures turned into a ``ServiceError``.

    Running out of descriptors surfaces from thespian as ``InvalidActorSpecification``
    (``[Errno 24] Too many open files`` in its text): said plainly here, so that neither a
    start nor the supervisor's restart mistakes it for a bad actor class.
    """
    try:
        return asys.createActor(cls, **kwargs)
    except ActorSystemException as exc:
        raise ServiceError(f"could not start {what}: {explain_create_failure(exc)}") from exc


@dataclass
class _Running:
    system: TcpSystem
    registry: Any
    gateway: Any
    addresses: list[str]
    registry_process: tuple[int, int] | None = None
    """The Registry's pid and start time, once found: the supervisor watches it."""

    def registry_died(self) -> bool:
        """Whether the Registry's process is gone (``False`` when it was never found)."""
        if self.registry_process is None:
            return False
        pid, start = self.registry_process
        stat = procfs.stat(pid)
        return stat is None or not stat.live or stat.start != start


def _find_process(system: TcpSystem, address: Any) -> tuple[int, int] | None:
    """The pid and start time of the member listening on ``address``'s port, or ``None``."""
    try:
        port = int(address.addressDetails.connectArgs[0][1])
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    pids = [pid for _, p, pid in system.listening_addresses() if p == port]
    stat = procfs.stat(pids[0]) if len(pids) == 1 else None
    return (stat.pid, stat.start) if stat is not None else None


class Service:
    """One sessionlane service. Not thread-safe: drive it from one thread."""

    def __init__(
        self,
        settings: Settings,
        *,
        log_file: str | Path | None = None,
        extra_listen: list[str] | None = None,
    ):
        if not settings.roots:
            raise ServiceError("no roots configured: pass --root DIR (or roots in the config)")
        self.settings = settings
        self.listen = [settings.listen, *(extra_listen or [])]
        self.log_file = logs.log_target(log_file, settings.listen)
        """Where the actors log (``None``: stderr); see :mod:`sessionlane.system.ops.logs`."""
        self.running: _Running | None = None
        self.restarts = 0
        self._cap_warned = False
        self._started_ms = 0.0
        self._held: list[str] = []
        """Transcripts found with a holder at this start (``_scan_held``)."""
        self._nonce = itertools.count(1)
        self._failures = 0
        self._stop = threading.Event()
        self.state_path: Path | None = None
        """The state file ``write_state`` wrote, kept current across restarts."""
        self.incarnation = ""
        """This start's id in the convention (a fresh one at every (re)start)."""

    # Lifecycle -----------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The first address the gateway listens on (the real port, if 0 was asked)."""
        assert self.running is not None, "the service is not running"
        return self.running.addresses[0]

    @property
    def convention(self) -> bool:
        """Whether this service joins (``leader``) or may lead (a fixed ``admin_port``) one."""
        return self.settings.leader is not None or self.settings.admin_port is not None

    @property
    def member_key(self) -> str:
        """This member's identity in a convention: ``bind_host:admin_port``."""
        return f"{self.settings.bind_host}:{self.settings.admin_port}"

    def capabilities(self) -> dict[str, Any]:
        if not self.convention:
            return {}
        settings = self.settings
        caps = member_capabilities(
            self.member_key, self.incarnation, settings.roots, leader=settings.leader is None
        )
        if settings.leader is not None:
            caps["Convention Address.IPv4"] = parse_leader(settings.leader)
        return caps

    def transport_secret(self) -> dict[str, Any]:
        """How thespian's frames are authenticated: with ``cluster_key_file``'s key; without
        one, with this process's random secret, unless ``trusted_network`` asks for none.

        The key is read at each (re)start and only held in memory; a key file that became
        unusable is a ``ServiceError`` (a restart then tries again at the next check).
        """
        settings = self.settings
        try:
            key = read_cluster_key(settings)
        except ConfigError as exc:
            raise ServiceError(str(exc)) from None
        return {"secret": key, "authenticate": key is not None or not settings.trusted_network}

    def start(self) -> Service:
        self.incarnation = uuid.uuid4().hex
        self._started_ms = time.monotonic() * 1000.0  # the reclaim grace counts from here
        self._held = self._scan_held()
        if self.settings.memory_merge and (why := page_merge.unavailable()) is not None:
            log.warning("memory_merge is set, but %s: no page will be merged", why)
        zygote.MEMORY_MERGE = self.settings.memory_merge  # read in the zygote, forked below
        system = start_tcp_system(
            self.settings.admin_port,
            log_file=self.log_file or logs.STDERR,
            bind_host=self.settings.bind_host,
            capabilities=self.capabilities(),
            log_level=self.settings.log_level,
            **self.transport_secret(),
        )
        try:
            self.running = self._bring_up(system)
        except BaseException:
            system.stop()
            raise
        log.info(
            "sessionlane serving %s (admin port %d, pgid %d, reclaim grace %d ms)",
            ", ".join(self.running.addresses),
            system.admin_port,
            system.pgid,
            self.settings.reclaim_grace_ms,
        )
        return self

    def _bring_up(self, system: TcpSystem) -> _Running:
        asys = system.asys
        if self.convention and self.settings.leader is None:
            create_actor(asys, Directory, "the directory", globalName=DIRECTORY_NAME)
        registry = create_actor(asys, Registry, "the registry", globalName=REGISTRY_NAME)
        self._configure(asys, registry, self.settings.listen, system.admin_port)
        if self.convention:
            self._join(asys, registry)
        gateway = create_actor(asys, Gateway, "the gateway")
        asys.tell(
            gateway,
            StartGateway(
                listen=self.listen,
                registry=registry,
                token=read_token(self.settings),
                max_frame_bytes=self.settings.max_frame_bytes,
                keepalive_ms=self.settings.keepalive_ms,
                roots=list(self.settings.roots),
                suffixes=list(self.settings.suffixes),
                idle_ms=self.settings.idle_ms,
                max_connections=self.settings.max_connections,
                hello_timeout_ms=self.settings.hello_timeout_ms,
                allow_other_users=self.settings.allow_other_users,
                direct_channels=self.settings.direct_channels,
            ),
        )
        answer = self._expect(asys, (GatewayStarted, GatewayFailed), "the gateway")
        if isinstance(answer, GatewayFailed):
            raise ServiceError(answer.reason + busy_listener_hint(self.listen))
        if answer.addresses[0] != self.settings.listen:  # port 0: name the real one in sidecars
            self._configure(asys, registry, answer.addresses[0], system.admin_port)
        self._await_holders(asys, registry)
        return _Running(
            system, registry, gateway, answer.addresses, _find_process(system, registry)
        )

    def _configure(self, asys: Any, registry: Any, gateway: str, admin_port: int) -> None:
        """(Re)configure the Registry; its SessionFiles name this service by ``gateway``."""
        owner = ServiceIdentity(pid=os.getpid(), gateway=gateway, admin_port=admin_port)
        cap = fit_max_files(self.settings.max_files, self.settings.max_connections)
        if cap.lowered and not self._cap_warned:
            self._cap_warned = True
            log.warning("%s", cap.warning())
        configure = Configure(
            roots=list(self.settings.roots),
            suffixes=list(self.settings.suffixes),
            file=file_settings_from(self.settings, owner, self._started_ms),
            max_files=cap.effective,
        )
        asys.tell(registry, configure)
        self._expect(asys, Configured, "the registry")

    def _scan_held(self) -> list[str]:
        """Transcripts whose lease record names a holder, when this start has a reclaim grace
        (walked here, before any actor takes requests; see ``held_scan``)."""
        if self.settings.reclaim_grace_ms <= 0:
            return []
        limit = fit_max_files(self.settings.max_files, self.settings.max_connections).effective
        found = scan_held(list(self.settings.roots), limit)
        if found.truncated:
            log.warning(
                "looked for lease records under the roots and stopped early (%s): the files "
                "not seen await their holder from their first request",
                found.truncated,
            )
        return found.paths

    def _await_holders(self, asys: Any, registry: Any) -> None:
        """Have the Registry activate the files found with a holder: each awaits it now, and
        ``status`` lists it in grace until the holder is back or the grace ends."""
        if not self._held:
            return
        asys.tell(registry, AwaitHolders(paths=self._held))
        done = self._expect(asys, HoldersAwaited, "the registry")
        log.info(
            "awaiting the holders of %d files for the reclaim grace (%d not activated)",
            done.activated,
            done.skipped,
        )

    def _join(self, asys: Any, registry: Any) -> None:
        """Have the leader's directory admit our roots; a refusal stops the start."""
        directory_file = None
        if self.settings.leader is None:  # the leader keeps the convention's table
            digest = hashlib.sha256(self.member_key.encode()).hexdigest()[:12]
            directory_file = str(state_dir() / f"directory-{digest}.json")
        join = Join(
            key=self.member_key,
            incarnation=self.incarnation,
            member_timeout_ms=self.settings.member_timeout_ms,
            reclaim_grace_ms=max(0, self.settings.reclaim_grace_ms),
            directory_file=directory_file,
        )
        asys.tell(registry, join)
        leader = self.settings.leader or "this member (the leader)"
        what = f"the convention leader at {leader}"
        if self.settings.leader is not None:
            # A leader that drops our frames looks exactly like one that is not there.
            what += (
                " (is it running, with the same cluster_key_file? frames authenticated with"
                " another key are dropped)"
            )
        answer = self._expect(asys, (Joined, JoinRefused), what, _JOIN_TIMEOUT_S)
        if isinstance(answer, JoinRefused):
            raise ServiceError(f"the convention refused this member: {answer.reason}")
        log.info("member %s admitted to a convention of %d", self.member_key, answer.members)

    def _expect(self, asys: Any, kinds: Any, what: str, timeout: float = _START_TIMEOUT_S) -> Any:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = asys.listen(left)
            if isinstance(message, kinds):
                return message
        raise ServiceError(f"{what} did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        """Drain, shut down, kill what is left. Idempotent."""
        running, self.running = self.running, None
        if running is None:
            return
        try:
            if running.system.alive():
                running.system.asys.tell(running.registry, Drain())
                with contextlib.suppress(ServiceError):
                    self._expect(running.system.asys, Drained, "the drain", timeout=5.0)
        finally:
            running.system.stop()

    def healthy(self) -> bool:
        """Are the admin and the Registry alive, and does the gateway answer a ping?

        A dead Registry stops every new file for good (its SessionFiles serve on, orphaned):
        the supervisor then restarts the whole system, which retires those SessionFiles, and
        every holder's connection closes, so each client reports its leases lost.
        """
        running = self.running
        if running is None or not running.system.alive():
            return False
        if running.registry_died():
            log.error("the registry process died; its files are retired with the system")
            return False
        nonce = next(self._nonce)
        running.system.asys.tell(running.gateway, Ping(nonce=nonce))
        deadline = time.monotonic() + _PING_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            message = running.system.asys.listen(left)
            if isinstance(message, Pong) and message.nonce == nonce:
                return True
        return False

    def supervise_once(self) -> None:
        """One supervision check: restart everything after repeated failures."""
        if self.healthy():
            self._failures = 0
            return
        self._failures += 1
        dead_admin = self.running is None or not self.running.system.alive()
        dead_registry = self.running is not None and self.running.registry_died()
        if not dead_admin and not dead_registry and self._failures < _PING_FAILURES:
            return
        why = (
            "admin dead"
            if dead_admin
            else "registry dead"
            if dead_registry
            else "gateway not answering"
        )
        log.error("actor system unhealthy (%s); restarting it", why)
        old = self.running
        self.running = None
        if old is not None:
            old.system.stop()
        self.restarts += 1
        self._failures = 0
        try:
            self.start()
        except (ServiceError, RuntimeError, OSError) as exc:
            log.error("restart failed (%s); trying again at the next check", exc)
            return
        if self.state_path is not None:
            self.write_state()  # new admin port and process group: `stop` must find them

    def request_stop(self) -> None:
        """Ask ``serve_forever`` to return (safe from a signal handler or another thread)."""
        self._stop.set()

    def serve_forever(
        self, interval: float = 1.0, *, before_stop: Callable[[], None] | None = None
    ) -> None:
        """Supervise until ``request_stop``; then stop. The caller installs signal handlers.

        ``before_stop`` runs first, while the service still answers (the metrics endpoint
        closes its connection to the gateway there).
        """
        try:
            while not self._stop.wait(interval):
                self.supervise_once()
        finally:
            try:
                if before_stop is not None:
                    before_stop()
            finally:
                self.stop()

    def write_state(self) -> Path:
        running = self.running
        assert running is not None
        path = state_file(self.settings.listen)
        data = {
            "pid": os.getpid(),
            "pid_start": process_start(os.getpid()),
            "listen": self.settings.listen,
            "addresses": running.addresses,
            "admin_port": running.system.admin_port,
            "pgid": running.system.pgid,
            "log_file": str(self.log_file) if self.log_file else None,
            "roots": list(self.settings.roots),
            "bind_host": self.settings.bind_host,
            "leader": self.settings.leader,
            "member": self.member_key if self.convention else None,
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
        self.state_path = path
        return path


@contextlib.contextmanager
def embedded_service(
    roots: list[str],
    *,
    listen: str = "tcp://127.0.0.1:0",
    log_file: str | Path | None = None,
    **overrides: Any,
) -> Iterator[Service]:
    """A service in this process, on a free loopback port, stopped on exit whatever happens."""
    settings, warnings = load_settings(
        None, env={}, overrides={"roots": roots, "listen": listen, **overrides}
    )
    for warning in warnings:
        log.warning("config: %s", warning)
    service = Service(settings, log_file=log_file)
    service.start()
    try:
        yield service
    finally:
        service.stop()


def install_signal_handlers(service: Service) -> None:
    """SIGINT/SIGTERM/SIGHUP stop the service cleanly (the supervisor loop notices)."""

    def handler(signum: int, frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        service.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
