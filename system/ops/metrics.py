"""The metrics endpoint: the service's counters in the Prometheus text format.

``sessionlane serve --metrics HOST:PORT`` (config key ``metrics_listen``) serves
``http://HOST:PORT/metrics`` from a thread of the supervisor (the ``serve`` process), with
``prometheus_client``'s HTTP server and a custom collector, :class:`ServiceCollector`.

Where the numbers come from. Each SessionFile counts its own events (grants, waits,
revocations by reason, appends) and keeps fixed-bucket histograms
(``sessionlane.actors.histogram``), all in the ``counters`` of its ``status``. On each scrape the
collector asks the service for ``status`` over an ordinary gateway connection
(``sessionlane.system.client``), never through the actor system: thespian's external endpoint
belongs to the supervisor thread and is not thread-safe. No handler waits for a scrape: a status
query is one more message in each file's mailbox.

Bounded. The query runs in a worker thread; a scrape waits for it at most ``timeout``
seconds and otherwise answers at once with ``sessionlane_up 0`` and the totals of the last
answer. At most one query is in flight: scrapes that arrive meanwhile wait for that one.
The HTTP server (:class:`BoundedServer`) serves each connection in a thread, at most
:data:`MAX_REQUEST_THREADS` at once (one more is answered ``503`` and closed at once), each
socket read or write waits at most :data:`REQUEST_IO_TIMEOUT_S`, and a connection still open
:data:`REQUEST_DEADLINE_S` after it was accepted is shut down: a client that connects and
sends nothing, or trickles, costs a thread for seconds, not forever.

Monotonic. A file's counters start from zero with each actor of the path (a passivated file
comes back as a new one, a dead one is restarted, a restarted system starts them all again).
:class:`Totals` keeps the last counters seen of every (system start, path, incarnation) and
folds them into a running sum once a later actor of the path (or a later system start) shows
that actor is gone, so the exported counters only grow. What a file counted between the last
scrape and its end is not seen.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Final
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import _SilentHandler, make_wsgi_app
from prometheus_client.registry import Collector, CollectorRegistry

from sessionlane.actors.histogram import HistogramData, read_histograms
from sessionlane.messages.wire import FileStatus

if TYPE_CHECKING:
    from sessionlane.system.client import SessionLane
    from sessionlane.system.runtime.service import Service

__all__ = [
    "COUNTERS",
    "HISTOGRAM_HELP",
    "MAX_REQUEST_THREADS",
    "REQUEST_DEADLINE_S",
    "REQUEST_IO_TIMEOUT_S",
    "REVOCATION_REASONS",
    "BoundedServer",
    "MetricsServer",
    "ServiceCollector",
    "Totals",
    "serve_metrics",
]

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT_S: Final = 3.0
"""How long a scrape waits for the service's status before answering ``sessionlane_up 0``."""
MAX_REQUEST_THREADS: Final = 8
"""Connections the metrics endpoint serves at once; one more is answered 503 and closed."""
REQUEST_IO_TIMEOUT_S: Final = 5.0
"""How long one read or write of a metrics connection may wait."""
REQUEST_DEADLINE_S: Final = SCRAPE_TIMEOUT_S + 10.0
"""How long a metrics connection may stay open in all (a scrape waits for the service up to
:data:`SCRAPE_TIMEOUT_S`)."""
_BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

COUNTERS: Final = {
    "grants": ("sessionlane_grants", "Leases granted (a re-entrant grant is not counted)."),
    "queued": ("sessionlane_waits", "Lease requests that had to queue behind a holder."),
    "timeouts": ("sessionlane_wait_timeouts", "Queued requests that gave up (lease_timeout)."),
    "releases": ("sessionlane_releases", "Releases of a lease (one per nesting level)."),
    "abandons": ("sessionlane_abandons", "Leases dropped by an abandon (a lane gone)."),
    "appends": ("sessionlane_appends", "Appends written."),
    "records": ("sessionlane_records", "Records written by appends."),
    "syncs": ("sessionlane_fsyncs", "fdatasync calls on transcripts."),
    "reclaims": (
        "sessionlane_reclaims",
        "Leases taken back by their holder after a service restart (same lease and fence).",
    ),
    "reclaims_expired": (
        "sessionlane_reclaims_expired",
        "Leases held before a restart whose holder did not reclaim them within the grace.",
    ),
    "reclaims_refused": (
        "sessionlane_reclaims_refused",
        "Reclaims refused (the file changed, the fence moved on, a wrong secret).",
    ),
    "restarted": (
        "sessionlane_file_restarts",
        "SessionFile actors restarted after dying (their leases were revoked, actor_restart).",
    ),
}
"""Counters summed over files: status counter key -> (metric name, help)."""

REVOCATION_REASONS: Final = ("max_hold", "recovery", "shutdown", "ownership_lost")
"""The reasons a SessionFile revokes a lease for (``revoked_<reason>`` counters)."""

HISTOGRAM_HELP: Final = {
    "grant_wait": (
        "sessionlane_grant_wait_seconds",
        "Time a queued lease request waited before its grant.",
    ),
    "handoff": (
        "sessionlane_handoff_seconds",
        "From the moment a file frees a path to its grant to the next waiter (the durable"
        " fence reservation included; network hops not).",
    ),
    "fsync": ("sessionlane_fsync_seconds", "Duration of each fdatasync of a transcript."),
}


@dataclass(frozen=True)
class _Snapshot:
    counters: dict[str, int]
    histograms: dict[str, HistogramData]
    live_files: int


class Totals:
    """Running sums of the files' counters that never go down (see the module docstring).

    Pure: ``update`` takes every answer in turn; ``snapshot`` reads the sums.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[int, str, int], dict[str, int]] = {}
        self._gone: dict[str, int] = {}
        self._live = 0

    def update(self, generation: int, files: Iterable[FileStatus]) -> None:
        """Take one status answer of the system started ``generation`` times before.

        A file missing from an answer is not taken for gone (the Registry answers without a
        file that is slow to answer): its last counters stay until a later actor of its path,
        or a later system, shows it cannot come back.
        """
        seen: dict[tuple[int, str, int], dict[str, int]] = {}
        newest: dict[str, int] = {}
        for f in files:
            incarnation = f.counters.get("incarnation", 0)
            seen[(generation, f.path, incarnation)] = dict(f.counters)
            newest[f.path] = max(newest.get(f.path, 0), incarnation)
        for key, last in list(self._last.items()):
            now = seen.get(key)
            _, path, incarnation = key
            if now is not None:
                if any(now.get(k, 0) < v for k, v in last.items() if _summed(k)):
                    _add(self._gone, last)  # the same key started again from zero
            elif key[0] < generation or incarnation < newest.get(path, 0):
                _add(self._gone, last)  # that actor is gone for good
                del self._last[key]
        self._last.update(seen)
        self._live = len(seen)

    def snapshot(self) -> _Snapshot:
        total = dict(self._gone)
        for counters in self._last.values():
            _add(total, counters)
        return _Snapshot(total, read_histograms(total), self._live)


def _summed(key: str) -> bool:
    """Counters that only grow during an actor's life (not sizes, gauges or ids)."""
    return key not in (
        "size",
        "channels",
        "incarnation",
        "in_grace",
        "awaited_fence",
        "grace_left_ms",
    )


def _add(into: dict[str, int], counters: Mapping[str, int]) -> None:
    for key, value in counters.items():
        if _summed(key):
            into[key] = into.get(key, 0) + value


class ServiceCollector(Collector):
    """Converts the service's status into metric families on each scrape (bounded in time).

    ``fetch`` returns every file's status (it runs in a worker thread, one call at a time);
    ``generation`` says how many times the supervisor restarted the actor system;
    ``restarts`` is read with it for ``sessionlane_restarts_total``.
    """

    def __init__(
        self,
        fetch: Callable[[], list[FileStatus]],
        generation: Callable[[], int],
        *,
        timeout: float = SCRAPE_TIMEOUT_S,
    ):
        self.fetch = fetch
        self.generation = generation
        self.timeout = timeout
        self.totals = Totals()
        self._lock = threading.Lock()
        self._pending: Future[None] | None = None
        self.failures = 0

    def refresh(self) -> bool:
        """Ask for a fresh status (or join the query in flight); True if it answered in time."""
        with self._lock:
            if self._pending is None or self._pending.done():
                self._pending = Future()
                worker = threading.Thread(
                    target=self._run, args=(self._pending,), name="sessionlane-metrics", daemon=True
                )
                worker.start()
            pending = self._pending
        try:
            pending.result(timeout=self.timeout)
            return True
        except FutureTimeout:
            log.warning("metrics: the service did not answer status within %.1f s", self.timeout)
        except Exception as exc:
            log.warning("metrics: status failed: %s", exc)
        with self._lock:
            self.failures += 1
        return False

    def _run(self, future: Future[None]) -> None:
        try:
            generation = self.generation()
            files = self.fetch()
            with self._lock:
                self.totals.update(generation, files)
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)

    def collect(self) -> Iterator[Metric]:
        up = self.refresh()
        with self._lock:
            snap = self.totals.snapshot()
            failures = self.failures
        yield GaugeMetricFamily(
            "sessionlane_up",
            "1 if the service answered the last status query within the scrape bound.",
            value=1 if up else 0,
        )
        yield CounterMetricFamily(
            "sessionlane_status_failures",
            "Scrapes whose status query failed or did not answer in time.",
            value=failures,
        )
        yield CounterMetricFamily(
            "sessionlane_restarts",
            "Restarts of the whole actor system by the supervisor.",
            value=self.generation(),
        )
        yield GaugeMetricFamily(
            "sessionlane_live_files", "SessionFile actors alive now.", value=snap.live_files
        )
        for key, (name, text) in COUNTERS.items():
            yield CounterMetricFamily(name, text, value=snap.counters.get(key, 0))
        revoked = CounterMetricFamily(
            "sessionlane_revocations", "Leases revoked by their file, by reason.", labels=["reason"]
        )
        for reason in REVOCATION_REASONS:
            revoked.add_metric([reason], snap.counters.get(f"revoked_{reason}", 0))
        yield revoked
        for key, (name, text) in HISTOGRAM_HELP.items():
            data = snap.histograms.get(key)
            family = HistogramMetricFamily(name, text)
            if data is not None:
                buckets: list[tuple[str, float]] = [
                    (_seconds(bound), n) for bound, n in data.buckets
                ]
                buckets.append(("+Inf", data.count))
                family.add_metric([], buckets, sum_value=data.sum_us / 1e6)
            else:
                family.add_metric([], [("+Inf", 0)], sum_value=0)
            yield family


def _seconds(bound_us: int) -> str:
    return repr(bound_us / 1e6)


class ClientFetch:
    """Fetches the status through one gateway connection, kept open across scrapes.

    Called from the collector's worker, one call at a time; reconnects after a failure.
    """

    def __init__(self, address: Callable[[], str], token: Callable[[], str | None], timeout: float):
        self.address = address
        self.token = token
        self.timeout = timeout
        self._client: SessionLane | None = None
        self._client_address = ""

    def __call__(self) -> list[FileStatus]:
        from sessionlane.system.client import connect

        address = self.address()
        if self._client is not None and self._client_address != address:
            self.close()  # the system restarted on another port
        if self._client is None:
            self._client = connect(address, self.token(), timeout=self.timeout, reconnect_for=0)
            self._client_address = address
        try:
            return list(self._client.status().files)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception as exc:  # closing a dead connection: nothing left to do
                log.debug("metrics: closing the status connection: %s", exc)


class _Handler(_SilentHandler):
    timeout = REQUEST_IO_TIMEOUT_S  # StreamRequestHandler: set on the connection's socket


class BoundedServer(ThreadingMixIn, WSGIServer):
    """prometheus_client's threaded WSGI server, with a thread cap and a deadline per connection.

    The deadline is enforced by the serving thread (``service_actions`` runs each pass of
    ``serve_forever``, every half second): it shuts an overdue socket down, which ends the
    blocked read or write of the thread serving it.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._active: dict[socket.socket, float] = {}
        self._active_lock = threading.Lock()
        self.refused = 0
        super().__init__(*args, **kwargs)

    def active(self) -> int:
        with self._active_lock:
            return len(self._active)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._active_lock:
            busy = len(self._active) >= MAX_REQUEST_THREADS
            if not busy:
                self._active[request] = time.monotonic()  # accepted at
        if busy:
            self.refused += 1
            with contextlib.suppress(OSError):
                request.setblocking(False)
                request.send(_BUSY)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._active_lock:
                self._active.pop(request, None)

    def service_actions(self) -> None:
        oldest = time.monotonic() - REQUEST_DEADLINE_S
        with self._active_lock:
            overdue = [sock for sock, accepted in self._active.items() if accepted <= oldest]
        for sock in overdue:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _family(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    """The address family to bind ``host`` with (IPv6 for an IPv6 host), as prometheus_client
    picks it."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = next(iter(infos))
    return family, str(sockaddr[0])


def _start_server(
    host: str, port: int, registry: CollectorRegistry
) -> tuple[BoundedServer, threading.Thread]:
    class Server(BoundedServer):
        pass

    Server.address_family, host = _family(host, port)
    server = make_server(host, port, make_wsgi_app(registry), Server, handler_class=_Handler)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return server, thread


class MetricsServer:
    """The running HTTP endpoint; :meth:`stop` closes its socket."""

    def __init__(
        self, collector: ServiceCollector, fetch: ClientFetch | None, host: str, port: int
    ):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self.collector = collector
        self._fetch = fetch
        self._server, self._thread = _start_server(host, port, self.registry)
        bound: Any = self._server.server_address
        self.host, self.port = host, int(bound[1])

    @property
    def http(self) -> BoundedServer:
        """The HTTP server: its connections in service and how many it refused."""
        return self._server

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)
        if self._fetch is not None:
            self._fetch.close()


def _reachable(address: str) -> str:
    """The address to dial for a gateway that listens on every interface: loopback."""
    for wildcard, loopback in (
        ("tcp://0.0.0.0:", "tcp://127.0.0.1:"),
        ("tcp://[::]:", "tcp://[::1]:"),
    ):
        if address.startswith(wildcard):
            return loopback + address[len(wildcard) :]
    return address


def serve_metrics(service: Service, *, timeout: float = SCRAPE_TIMEOUT_S) -> MetricsServer:
    """Serve ``service``'s metrics on its ``metrics_listen`` (which must be set)."""
    from sessionlane.system.config import parse_metrics_listen, read_token

    listen = service.settings.metrics_listen
    if listen is None:
        raise ValueError("metrics_listen is not set")
    host, port = parse_metrics_listen(listen)

    def address() -> str:
        running = service.running  # read, never called into: it belongs to the supervisor
        if running is None:
            raise ConnectionError("the service is restarting")
        return _reachable(running.addresses[0])

    fetch = ClientFetch(address, lambda: read_token(service.settings), timeout)
    collector = ServiceCollector(fetch, lambda: service.restarts, timeout=timeout)
    return MetricsServer(collector, fetch, host, port)
