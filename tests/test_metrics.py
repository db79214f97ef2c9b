"""What an operator sees of a running relay, over real HTTP: ``/metrics`` moving with the work, the
backlog gauges read from the table, ``/readyz`` following the database and the broker, and logs that
never show a password.

The relays run in-process (``Relay`` with ``RelayMetrics`` and ``relay.health.serve``, as ``outbox relay
--metrics-port`` wires them) or as ``outbox relay`` subprocesses; every scrape is a real HTTP request.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

import outbox
from consumers import Registry
from consumers._metrics import ConsumerMetrics, consumer_checks
from outbox import Message
from outbox._clock import utcnow
from outbox._dialects import dialect_for
from outbox._runtime.ops_server import OpsServer
from outbox.cli._config import Settings
from relay import Relay
from relay._claim import ClaimedRow, ClaimQueries
from relay._outcomes import RecordedOutcome
from relay.health import serve
from relay.metrics import RelayMetrics
from relay.observers import RelayObserver
from relay.publishers.kafka import KafkaSettings
from tests.conftest import PYTHON, ROOT, status_counts, wait_until
from tests.kafka_broker import Broker
from tests.pgcluster import throwaway_cluster


class Scraper:
    """Reads one ops server over HTTP, as Prometheus and a Kubernetes probe would."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=10) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), bytes(exc.read())

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, body = self.get("/metrics")
        assert status == 200
        return {
            (s.name, frozenset(s.labels.items())): float(s.value)
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        """The sample ``name{labels}``; 0 when it is not there (yet)."""
        return self.samples().get((name, frozenset(labels.items())), 0.0)

    def ready(self) -> tuple[int, dict[str, Any]]:
        status, body = self.get("/readyz")
        return status, json.loads(body)


@contextmanager
def served(relay: Relay, metrics: RelayMetrics) -> Iterator[Scraper]:
    server = serve(relay, metrics, host="127.0.0.1", port=0)
    try:
        yield Scraper(server.port)
    finally:
        server.stop()


def add(engine: sa.Engine, topic: str, payload: Any, *, key: str | None = None) -> uuid.UUID:
    with engine.begin() as conn:
        return outbox.add(conn, topic, payload, key=key)


def test_counters_move_and_oldest_pending_age_rises_while_paused_then_falls_to_zero(
    engine: sa.Engine,
) -> None:
    gate = threading.Event()
    blocked = threading.Event()
    registry = Registry()

    @registry.handler("metrics.work")
    def work(message: Message) -> None:
        if message.payload.get("block"):
            blocked.set()
            assert gate.wait(30), "the test never opened the gate"

    @registry.handler("metrics.poison", max_attempts=1)
    def poison(message: Message) -> None:
        raise ValueError("poison")

    metrics = RelayMetrics(interval=0.1)
    # one worker and one message in flight at most: a handler that blocks pauses the whole relay
    relay = Relay(engine, registry, observers=[metrics], workers=1, max_in_flight=1, poll_interval=0.1)
    with relay, served(relay, metrics) as scrape:
        for i in range(10):
            add(engine, "metrics.work", {"i": i})
        add(engine, "metrics.poison", {})
        wait_until(
            lambda: (
                scrape.value("outbox_messages_delivered_total", topic="metrics.work") == 10
                and scrape.value("outbox_messages_dead_total", topic="metrics.poison") == 1
            ),
            timeout=30,
            what="the counters to show 10 delivered and 1 dead",
        )
        samples = scrape.samples()
        assert (
            samples[("outbox_delivery_latency_seconds_count", frozenset({("topic", "metrics.work")}))] == 10
        )
        assert samples[("outbox_claim_batch_size_count", frozenset())] >= 11
        assert samples[("outbox_claim_duration_seconds_count", frozenset())] >= 11
        wait_until(
            lambda: scrape.value("outbox_dead_messages", topic="metrics.poison") == 1, what="the dead gauge"
        )

        # pause: the only worker blocks on the first message; what is written after it waits
        add(engine, "metrics.work", {"block": True})
        assert blocked.wait(30)
        for i in range(5):
            add(engine, "metrics.work", {"i": 100 + i})
        wait_until(
            lambda: (
                scrape.value("outbox_pending_messages", topic="metrics.work") == 5
                and scrape.value("outbox_inflight_messages", topic="metrics.work") == 1
                and scrape.value("outbox_oldest_pending_age_seconds", topic="metrics.work") > 0
            ),
            what="5 pending behind 1 in flight",
        )
        ages = [scrape.value("outbox_oldest_pending_age_seconds", topic="metrics.work")]
        for _ in range(3):
            previous = ages[-1]
            wait_until(
                lambda previous=previous: (
                    scrape.value(  # type: ignore[misc]
                        "outbox_oldest_pending_age_seconds", topic="metrics.work"
                    )
                    > previous + 0.2
                ),
                timeout=10,
                what="the oldest pending age to rise while the relay is paused",
            )
            ages.append(scrape.value("outbox_oldest_pending_age_seconds", topic="metrics.work"))
        assert ages == sorted(ages) and ages[-1] > ages[0]
        assert scrape.value("outbox_messages_delivered_total", topic="metrics.work") == 10, "paused"

        # resume: everything drains and the gauge falls to zero
        gate.set()
        wait_until(
            lambda: (
                scrape.value("outbox_messages_delivered_total", topic="metrics.work") == 16
                and scrape.value("outbox_pending_messages", topic="metrics.work") == 0
                and scrape.value("outbox_inflight_messages", topic="metrics.work") == 0
                and scrape.value("outbox_oldest_pending_age_seconds", topic="metrics.work") == 0
            ),
            timeout=30,
            what="the backlog to drain and the age to fall to zero",
        )
        assert (
            "outbox_oldest_pending_age_seconds",
            frozenset({("topic", "metrics.work")}),
        ) in scrape.samples()
    assert status_counts(engine) == {"delivered": 16, "dead": 1}


def test_failing_and_parked_messages_show_as_held_keys(engine: sa.Engine) -> None:
    registry = Registry()

    @registry.handler("metrics.flaky", max_attempts=3, backoff_initial=60)
    def flaky(message: Message) -> None:
        raise RuntimeError("down")

    @registry.handler("metrics.strict", max_attempts=1, strict_order=True)
    def strict(message: Message) -> None:
        raise RuntimeError("refused")

    metrics = RelayMetrics(interval=0.1)
    with (
        Relay(engine, registry, observers=[metrics], poll_interval=0.1) as relay,
        served(relay, metrics) as s,
    ):
        for key in ("a", "b"):
            add(engine, "metrics.flaky", {}, key=key)
            add(engine, "metrics.flaky", {}, key=key)  # waits behind the failing one
        add(engine, "metrics.strict", {}, key="c")
        add(engine, "metrics.strict", {}, key="c")
        wait_until(
            lambda: (
                s.value("outbox_held_keys", topic="metrics.flaky") == 2
                and s.value("outbox_held_keys", topic="metrics.strict") == 1
                and s.value("outbox_messages_failed_total", topic="metrics.flaky") == 2
                and s.value("outbox_dead_messages", topic="metrics.strict") == 1
                and s.value("outbox_pending_messages", topic="metrics.flaky") == 4
            ),
            what="two keys held by failed messages, one by a parked one",
        )


def test_reclaimed_leases_are_counted(engine: sa.Engine) -> None:
    """A row claimed under a lease that expired (its relay died) is counted once it is taken back."""
    abandoned = add(engine, "metrics.reclaim", {"n": 1})
    claims = ClaimQueries(outbox.tables_for(), dialect_for(engine))
    with engine.begin() as conn:  # a relay that claims and dies at once: its lease runs out at once
        (row,) = claims.claim_batch(conn, limit=10, lease_seconds=0.001, now=utcnow())
    assert not row.reclaimed
    fresh = add(engine, "metrics.reclaim", {"n": 2})

    handled: list[uuid.UUID] = []
    registry = Registry()
    registry.add("metrics.reclaim", lambda m: handled.append(m.id))
    metrics = RelayMetrics(interval=60)
    with (
        Relay(engine, registry, observers=[metrics], poll_interval=0.1) as relay,
        served(relay, metrics) as s,
    ):
        wait_until(lambda: sorted(handled) == sorted([abandoned, fresh]), what="both delivered")
        wait_until(lambda: s.value("outbox_messages_delivered_total", topic="metrics.reclaim") == 2)
        assert s.value("outbox_messages_reclaimed_total") == 1


def test_readyz_follows_the_database() -> None:
    """``/readyz`` answers 503 naming the database while PostgreSQL is down, 200 once it is back."""
    with throwaway_cluster() as cluster:
        url = cluster.create_database("ready")
        engine = outbox.create_engine(url)
        with engine.begin() as conn:
            outbox.upgrade(conn)
        registry = Registry()
        registry.add("ready.ok", lambda m: None)
        metrics = RelayMetrics(interval=0.2)
        relay = Relay(engine, registry, observers=[metrics], poll_interval=0.1)
        server = serve(relay, metrics, host="127.0.0.1", port=0)
        scrape = Scraper(server.port)
        try:
            status, report = scrape.ready()
            assert status == 503 and not report["checks"]["relay"]["ok"], "not ready before it starts"
            with relay:
                wait_until(lambda: scrape.ready()[0] == 200, timeout=20, what="ready")
                cluster.stop()
                wait_until(lambda: scrape.ready()[0] == 503, timeout=20, what="unready without the database")
                status, report = scrape.ready()
                assert report["ready"] is False
                assert report["checks"]["database"]["ok"] is False
                assert report["checks"]["database"]["detail"]
                assert report["checks"]["relay"]["ok"] is True
                assert scrape.get("/healthz")[0] == 200, "alive all the same"
                assert scrape.get("/metrics")[0] == 200
                cluster.start()
                wait_until(lambda: scrape.ready()[0] == 200, timeout=30, what="ready again")
                add(engine, "ready.ok", {})  # and the relay delivers again
                wait_until(lambda: status_counts(engine) == {"delivered": 1}, timeout=30)
            assert scrape.ready()[0] == 503, "a stopped relay is not ready"
        finally:
            server.stop()
            engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_readyz_follows_the_broker(engine: sa.Engine, tmp_path: Path, client: str) -> None:
    broker = Broker(tmp_path).start()
    try:
        metrics = RelayMetrics(interval=60)
        kafka = KafkaSettings(broker.bootstrap, client=client)
        relay = Relay(engine, Registry(), kafka=kafka, observers=[metrics])
        with relay, served(relay, metrics) as scrape:
            wait_until(lambda: scrape.ready()[0] == 200, timeout=20, what="ready")
            assert "broker" in scrape.ready()[1]["checks"]
            broker.stop()
            wait_until(lambda: scrape.ready()[0] == 503, timeout=20, what="unready without the broker")
            report = scrape.ready()[1]
            assert report["checks"]["broker"]["ok"] is False, report
            assert report["checks"]["database"]["ok"] is True
            broker.start()
            wait_until(lambda: scrape.ready()[0] == 200, timeout=20, what="ready again")
    finally:
        broker.stop()


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_readyz_sees_a_frozen_broker_by_its_last_answer(
    engine: sa.Engine, tmp_path: Path, client: str
) -> None:
    """A frozen broker still accepts TCP connections (the kernel answers for it): readiness then comes
    from what the publisher last heard, a send that timed out, until an acknowledgement says otherwise."""
    broker = Broker(tmp_path).start()
    try:
        metrics = RelayMetrics(interval=60)
        kafka = KafkaSettings(
            broker.bootstrap, client=client, request_timeout_ms=2000, delivery_timeout_ms=3000
        )
        relay = Relay(engine, Registry(), kafka=kafka, observers=[metrics], poll_interval=0.1)
        with relay, served(relay, metrics) as scrape:
            add(engine, "frozen.before", {})
            wait_until(lambda: status_counts(engine) == {"delivered": 1}, timeout=30, what="acknowledged")
            assert scrape.ready()[0] == 200
            broker.freeze()
            add(engine, "frozen.during", {})
            wait_until(lambda: scrape.ready()[0] == 503, timeout=30, what="unready once the send timed out")
            checks = scrape.ready()[1]["checks"]
            assert checks["broker"]["ok"] is False and "broker unavailable" in checks["broker"]["detail"]
            broker.thaw()
            wait_until(lambda: status_counts(engine) == {"delivered": 2}, timeout=60, what="delivered after")
            wait_until(lambda: scrape.ready()[0] == 200, timeout=20, what="ready again")
    finally:
        broker.stop()


def test_metrics_port_in_use_is_a_configuration_error() -> None:
    first = OpsServer(None, {}, host="127.0.0.1", port=0).start()
    try:
        with pytest.raises(outbox.ConfigError, match="cannot serve metrics"):
            OpsServer(None, {}, host="127.0.0.1", port=first.port).start()
    finally:
        first.stop()


# --- logs ------------------------------------------------------------------------------------------------

DB_SECRET = "Db-Secret-4711"
SASL_SECRET = "Sasl-Secret-0815"


@pytest.mark.parametrize("backend", ["postgresql"])
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_logs_never_show_passwords(engine: sa.Engine, db_url: str, tmp_path: Path, log_format: str) -> None:
    """A relay run with a database password and a SASL password, at DEBUG, with a broker it cannot reach
    and its metrics port on: neither password appears in any log line (trust auth ignores the database
    password, so the relay really runs)."""
    url = sa.engine.make_url(db_url).set(password=DB_SECRET).render_as_string(hide_password=False)
    add(engine, "to.kafka", {"n": 1})  # no handler: published to a broker that is not there
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(
        PYTHONPATH=str(ROOT),
        OUTBOX_DATABASE_URL=url,
        OUTBOX_KAFKA_SASL_PASSWORD=SASL_SECRET,
        OUTBOX_LOG_FORMAT=log_format,
    )
    log_path = tmp_path / "relay.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *(PYTHON, "-m", "outbox", "relay", "--log-level", "DEBUG", "--stop-timeout", "1"),
                *("--kafka-bootstrap-servers", "127.0.0.1:9", "--kafka-security-protocol", "SASL_PLAINTEXT"),
                *("--kafka-sasl-mechanism", "PLAIN", "--kafka-sasl-username", "relay"),
                *("--metrics-port", "0", "--metrics-host", "127.0.0.1"),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: (
                "started on" in log_path.read_text(errors="replace")
                and "kafka." in log_path.read_text(errors="replace")
            ),
            timeout=30,
            what="the relay to start and its producer to try the broker",
        )
        text = log_path.read_text(errors="replace")
        # the same port serves the probes: the broker is down, so the relay is alive but not ready
        port = int(re.search(r"serving /metrics.* on http://127\.0\.0\.1:(\d+)", text)[1])  # type: ignore[index]
        scrape = Scraper(port)
        assert scrape.get("/healthz")[0] == 200
        wait_until(lambda: scrape.ready()[0] == 503, timeout=20, what="unready without its broker")
        checks = scrape.ready()[1]["checks"]
        assert checks["broker"]["ok"] is False and checks["database"]["ok"] is True, checks
        assert "outbox_relay_in_flight" in scrape.get("/metrics")[1].decode()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log_path.read_text(errors="replace")
    assert "relay " in text and "started on" in text, text[-3000:]
    assert "serving /metrics" in text
    assert DB_SECRET not in text and SASL_SECRET not in text
    lines = [line for line in text.splitlines() if line.strip()]
    if log_format == "json":
        entries = [json.loads(line) for line in lines]  # every line is a JSON object
        assert {"outbox.relay", "outbox.ops"} <= {e["logger"] for e in entries}
    started = next(line for line in lines if "started on" in line)
    assert ":***@" in started, started


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_log_lines_of_any_library_are_scrubbed(
    log_format: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second guard: whatever a library logs (a URL with its password, a SASL config, an exception
    message) goes through the same scrubbing as the CLI's one-line errors."""
    from outbox import redaction
    from outbox.cli import _options as cli_options

    monkeypatch.setattr(redaction, "_known", set())
    settings = Settings.load(
        {
            "database_url": f"postgresql://app:{DB_SECRET}@db.example/shop",
            "kafka_sasl_password": SASL_SECRET,
            "log_format": log_format,
        }
    )
    root = logging.getLogger()
    level = root.level
    try:
        assert set(settings.secrets) == {DB_SECRET, SASL_SECRET}
        redaction.remember(settings.secrets)
        cli_options.configure_logging(settings)
        other = logging.getLogger("some.library")
        other.warning("connecting with %s", {"sasl_plain_password": SASL_SECRET})
        other.warning("engine url mysql://root:Other-Url-Pw@127.0.0.1/db failed")
        try:
            raise RuntimeError(f"auth failed for postgresql://app:{DB_SECRET}@db.example/shop")
        except RuntimeError:
            other.exception("boom")
    finally:
        for handler in [h for h in root.handlers if isinstance(h, cli_options._StderrHandler)]:
            root.removeHandler(handler)
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "{'sasl_plain_password': '***'}" in err
    assert "mysql://root:***@127.0.0.1/db" in err
    assert "RuntimeError: auth failed for postgresql://app:***@db.example/shop" in err
    for secret in (DB_SECRET, SASL_SECRET, "Other-Url-Pw"):
        assert secret not in err


@pytest.mark.parametrize("backend", ["sqlite"])
def test_consumer_hooks_are_served_like_the_relays(engine: sa.Engine) -> None:
    """What ``outbox consume`` serves: its counters and histograms, and readiness from its runner's state
    (here a stand-in with the attributes the checks read, on a real database)."""
    metrics = ConsumerMetrics("billing", process=False)
    message = Message(uuid.uuid4(), "order.paid", None, {}, {}, 1, utcnow())
    metrics.attempt("order.paid", 0.02, failed=True)
    metrics.attempt("order.paid", 0.01, failed=False)
    metrics.finished("order.paid", "handled", message)
    metrics.finished("order.paid", "dead_lettered")
    runner = SimpleNamespace(running=True, engine=engine, last_progress=time.monotonic())
    with OpsServer(metrics.registry, consumer_checks(runner), host="127.0.0.1", port=0) as server:
        scrape = Scraper(server.port)
        group = {"group": "billing", "topic": "order.paid"}
        assert scrape.value("outbox_consumer_records_total", **group, result="handled") == 1
        assert scrape.value("outbox_consumer_records_total", **group, result="dead_lettered") == 1
        assert scrape.value("outbox_consumer_failed_attempts_total", **group) == 1
        assert scrape.value("outbox_consumer_handler_seconds_count", **group) == 2
        assert scrape.value("outbox_consumer_latency_seconds_count", **group) == 1
        status, report = scrape.ready()
        assert status == 200 and set(report["checks"]) == {"consumer", "database", "progress"}
        runner.running = False
        status, report = scrape.ready()
        assert status == 503 and report["checks"]["consumer"]["ok"] is False


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_failing_observer_never_disturbs_delivery(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(RelayObserver):
        def on_claimed(self, rows: Sequence[ClaimedRow], seconds: float) -> None:
            raise RuntimeError("observer bug")

        def on_outcomes(self, outcomes: Sequence[RecordedOutcome]) -> None:
            raise RuntimeError("observer bug")

    registry = Registry()
    registry.add("observed", lambda m: None)
    for n in range(5):
        add(engine, "observed", {"n": n})
    with Relay(engine, registry, observers=[Broken()], poll_interval=0.1):
        wait_until(lambda: status_counts(engine) == {"delivered": 5}, what="delivered all the same")
    assert "relay observer" in caplog.text and "observer bug" in caplog.text
