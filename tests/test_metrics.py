"""The metrics endpoint: monotonic totals, a bounded scrape, and a real service scraped."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sessionlane.actors.histogram import FileMetrics
from sessionlane.messages.wire import FileStatus
from sessionlane.system.config import ConfigError, load_settings, parse_metrics_listen
from sessionlane.system.ops import metrics
from sessionlane.system.ops.metrics import MetricsServer, ServiceCollector, Totals, serve_metrics
from sessionlane.system.runtime.service import embedded_service

SCRAPE_WAIT_S = 30.0  # generous: the machine is shared


def status(path: str, incarnation: int = 1, **counters: int) -> FileStatus:
    return FileStatus(
        path=path,
        fence=1,
        holder=None,
        queue=[],
        counters={"incarnation": incarnation, "size": 10, **counters},
    )


# Totals -------------------------------------------------------------------------------------


def test_totals_keep_what_a_passivated_file_counted_when_it_comes_back_from_zero() -> None:
    totals = Totals()
    totals.update(0, [status("/a", grants=5), status("/b", grants=1)])
    totals.update(0, [status("/b", grants=2)])  # /a passivated
    totals.update(0, [status("/a", incarnation=2, grants=1), status("/b", grants=2)])
    snap = totals.snapshot()
    assert snap.counters["grants"] == 5 + 1 + 2
    assert snap.live_files == 2


def test_a_file_missing_from_one_answer_is_not_counted_twice_when_it_answers_again() -> None:
    totals = Totals()
    totals.update(0, [status("/a", grants=3), status("/b", grants=1)])
    totals.update(0, [status("/b", grants=1)])  # /a was slow: the Registry answered without it
    assert totals.snapshot().counters["grants"] == 4
    totals.update(0, [status("/a", grants=5), status("/b", grants=1)])
    assert totals.snapshot().counters["grants"] == 6


def test_totals_keep_the_counts_of_a_system_the_supervisor_restarted() -> None:
    totals = Totals()
    totals.update(0, [status("/a", grants=4)])
    totals.update(1, [status("/a", grants=1)])  # same path and incarnation, new system
    assert totals.snapshot().counters["grants"] == 5


def test_a_counter_that_went_down_counts_as_a_fresh_start_of_that_file() -> None:
    totals = Totals()
    totals.update(0, [status("/a", grants=4)])
    totals.update(0, [status("/a", grants=1)])  # restarted between the generation and the query
    assert totals.snapshot().counters["grants"] == 5


def test_sizes_and_ids_are_not_summed_and_histograms_add_across_files() -> None:
    one, two = FileMetrics(), FileMetrics()
    one.observe("fsync", 1.0)
    two.observe("fsync", 3.0)
    totals = Totals()
    totals.update(0, [status("/a", **one.counters()), status("/b", **two.counters())])
    snap = totals.snapshot()
    assert "size" not in snap.counters and "incarnation" not in snap.counters
    assert snap.histograms["fsync"].count == 2
    assert snap.histograms["fsync"].sum_us == 4_000


# A bounded scrape ---------------------------------------------------------------------------


class BlockingFetch:
    """A status source that answers only once ``release`` is set; counts its calls."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def __call__(self) -> list[FileStatus]:
        self.calls += 1
        if not self.release.wait(SCRAPE_WAIT_S):
            raise TimeoutError("never released")
        return [status("/a", grants=3)]


def values(collector: ServiceCollector) -> dict[str, float]:
    return {
        sample.name: sample.value
        for family in collector.collect()
        for sample in family.samples
        if not sample.labels
    }


def test_a_scrape_answers_within_its_bound_while_the_service_does_not_answer() -> None:
    fetch = BlockingFetch()
    collector = ServiceCollector(fetch, lambda: 0, timeout=0.2)
    try:
        started = time.monotonic()
        first = values(collector)
        elapsed = time.monotonic() - started
        assert first["sessionlane_up"] == 0
        assert first["sessionlane_status_failures_total"] == 1
        assert elapsed < 5.0, elapsed  # the bound is 0.2 s; generous for a loaded machine
        second = values(collector)
        assert second["sessionlane_up"] == 0
        assert fetch.calls == 1, "a scrape during a query in flight waits for that one"
    finally:
        fetch.release.set()
    third = values(collector)  # joins the released query, or starts one that answers
    fourth = values(collector)
    assert fourth["sessionlane_up"] == 1
    assert fourth["sessionlane_grants_total"] == 3
    assert third["sessionlane_grants_total"] in (0, 3)


def test_a_failing_status_query_reports_down_and_keeps_the_last_totals() -> None:
    answers: list[Callable[[], list[FileStatus]]] = [
        lambda: [status("/a", grants=2)],
        lambda: (_ for _ in ()).throw(ConnectionError("gone")),
    ]
    collector = ServiceCollector(lambda: answers.pop(0)(), lambda: 0, timeout=5.0)
    assert values(collector)["sessionlane_grants_total"] == 2
    down = values(collector)
    assert down["sessionlane_up"] == 0
    assert down["sessionlane_grants_total"] == 2


# Config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9420", ("127.0.0.1", 9420)),
        ("127.0.0.1:9420", ("127.0.0.1", 9420)),
        ("tcp://127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:9420", ("::1", 9420)),
        ("localhost:9420", ("localhost", 9420)),
    ],
)
def test_metrics_listen_takes_host_port_a_tcp_url_or_a_bare_port(
    text: str, expected: tuple[str, int]
) -> None:
    assert parse_metrics_listen(text) == expected


@pytest.mark.parametrize("text", ["", "127.0.0.1", "127.0.0.1:http", "::1:9420", "h:70000"])
def test_a_malformed_metrics_listen_is_refused_naming_the_key(text: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, env={}, overrides={"roots": [str(tmp_path)], "metrics_listen": text})
    assert caught.value.key == "metrics_listen"


def test_metrics_are_off_by_default_and_a_non_loopback_endpoint_is_warned_about(
    tmp_path: Path,
) -> None:
    settings, warnings = load_settings(None, env={}, overrides={"roots": [str(tmp_path)]})
    assert settings.metrics_listen is None
    _, warnings = load_settings(
        None, env={}, overrides={"roots": [str(tmp_path)], "metrics_listen": "0.0.0.0:9420"}
    )
    assert any("metrics_listen" in w for w in warnings)


# A real service -----------------------------------------------------------------------------


@pytest.fixture
def scraped(root: Path, tmp_path: Path) -> Iterator[tuple[Any, MetricsServer]]:
    with embedded_service(
        [str(root)], log_file=tmp_path / "svc.log", metrics_listen="127.0.0.1:0"
    ) as svc:
        server = serve_metrics(svc, timeout=10.0)
        try:
            yield svc, server
        finally:
            server.stop()


def scrape(server: MetricsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(server.url, timeout=30) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape_until(
    server: MetricsServer, done: Callable[[dict[Any, float]], bool]
) -> dict[Any, float]:
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while True:
        samples = scrape(server)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


@pytest.mark.tcp
def test_a_scrape_of_a_real_service_shows_turns_waits_fsyncs_and_a_revocation_by_reason(
    scraped: tuple[Any, MetricsServer], root: Path
) -> None:
    from sessionlane.system.client import connect

    svc, server = scraped
    path = str(root / "turns.jsonl")
    with connect(svc.address) as sl:
        first, second = sl.lane("first"), sl.lane("second")
        lease = first.acquire(path)
        assert lease is not None
        lease.append({"turn": 1})
        lease.append({"turn": 2})
        waiter: list[Any] = []
        thread = threading.Thread(target=lambda: waiter.append(second.acquire(path)))
        thread.start()
        queued = scrape_until(server, lambda s: s[("sessionlane_waits_total", ())] >= 1)
        assert queued[("sessionlane_waits_total", ())] == 1
        lease.release()
        thread.join(SCRAPE_WAIT_S)
        assert waiter and waiter[0] is not None
        waiter[0].release()
        revoked = first.acquire(path, max_hold=0.2)
        assert revoked is not None
        key = ("sessionlane_revocations_total", (("reason", "max_hold"),))
        samples = scrape_until(server, lambda s: s[key] >= 1)
    assert samples[key] == 1
    assert samples[("sessionlane_revocations_total", (("reason", "recovery"),))] == 0
    assert samples[("sessionlane_up", ())] == 1
    assert samples[("sessionlane_live_files", ())] == 1
    assert samples[("sessionlane_grants_total", ())] == 3
    assert samples[("sessionlane_appends_total", ())] == 2
    assert samples[("sessionlane_grant_wait_seconds_count", ())] == 1
    assert samples[("sessionlane_grant_wait_seconds_bucket", (("le", "+Inf"),))] == 1
    assert samples[("sessionlane_grant_wait_seconds_bucket", (("le", "600.0"),))] == 1
    assert samples[("sessionlane_handoff_seconds_count", ())] == 1
    fsyncs = samples[("sessionlane_fsync_seconds_count", ())]
    assert 1 <= fsyncs <= 2  # group commit may cover both appends with one fdatasync
    assert samples[("sessionlane_fsyncs_total", ())] >= fsyncs
    assert samples[("sessionlane_fsync_seconds_sum", ())] > 0
    assert samples[("sessionlane_restarts_total", ())] == 0


@pytest.mark.tcp
def test_a_scraper_polling_status_faster_than_idle_ms_does_not_keep_a_file_alive(
    root: Path, tmp_path: Path
) -> None:
    from sessionlane.system.client import connect

    with (
        embedded_service([str(root)], log_file=tmp_path / "svc.log", idle_ms=500) as svc,
        connect(svc.address) as sl,
    ):
        with sl.lane("writer").lease(str(root / "idle.jsonl")) as lease:
            assert lease is not None
            lease.append({"turn": 1})
        deadline = time.monotonic() + SCRAPE_WAIT_S
        polls = 0
        while sl.status().files:  # every 50 ms: ten times per idle period
            polls += 1
            assert time.monotonic() < deadline, f"still alive after {polls} status queries"
            time.sleep(0.05)
        assert polls >= 1


def answer_of(sock: socket.socket) -> bytes:
    """What the endpoint sent before it closed ``sock`` (fails if it stays open)."""
    data = b""
    sock.settimeout(SCRAPE_WAIT_S)
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


@pytest.mark.tcp
def test_slow_metrics_clients_hold_at_most_the_thread_cap_and_only_until_the_deadline(
    scraped: tuple[Any, MetricsServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "REQUEST_DEADLINE_S", 600.0)  # first: the cap alone
    monkeypatch.setattr(metrics._Handler, "timeout", 600.0)  # and then the deadline alone
    _, server = scraped
    cap, extra = metrics.MAX_REQUEST_THREADS, 12
    threads_before = threading.active_count()
    idle = [socket.create_connection((server.host, server.port), timeout=30) for _ in range(cap)]
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while server.http.active() < cap:
        assert time.monotonic() < deadline, "the first connections were never served"
        time.sleep(0.01)
    past = [socket.create_connection((server.host, server.port), timeout=30) for _ in range(extra)]
    try:
        for sock in past:
            assert answer_of(sock).startswith(b"HTTP/1.0 503 "), "refused at once, answered"
        assert server.http.refused == extra
        assert server.http.active() <= cap
        assert threading.active_count() - threads_before <= cap

        monkeypatch.setattr(metrics, "REQUEST_DEADLINE_S", 2.0)
        for sock in idle:
            assert answer_of(sock) == b"", "an idle connection is closed by the deadline"
        while server.http.active():
            assert time.monotonic() < deadline, "a thread still serves a closed connection"
            time.sleep(0.01)

        stop = threading.Event()
        trickler = socket.create_connection((server.host, server.port), timeout=30)
        sent = [0]

        def trickle() -> None:  # one byte of a request line every 0.5 s, never a whole line
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    trickler.send(b"G")
                    sent[0] += 1
                    stop.wait(0.5)

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        try:
            assert answer_of(trickler) == b"", "a trickling one too"
            assert sent[0] < 20
        finally:
            stop.set()
            thread.join(10)
            trickler.close()
        while server.http.active():
            assert time.monotonic() < deadline, "a thread still serves the trickler"
            time.sleep(0.01)
        assert scrape(server)[("sessionlane_up", ())] == 1, "and a scrape is served after them"
    finally:
        for sock in idle + past:
            sock.close()
