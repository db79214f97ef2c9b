"""What an operator sees of a running ``outbox consume``: ``/metrics`` counting handled, duplicate and
dead-lettered records, ``/readyz`` following the consumer and its broker, and the writer's trace going
on, through the relay's send span, into the span the consumer runs the handler in.

Records are published by the real relay to a real broker; the consumers are in-process runners served
by :class:`outbox._runtime.ops_server.OpsServer` (as ``outbox consume --metrics-port`` wires them) or a real
``outbox consume`` subprocess. Every scrape is a real HTTP request.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import outbox
from consumers import Registry
from consumers._kafka import ConsumerSettings, KafkaConsumerRunner
from consumers._metrics import ConsumerMetrics, consumer_checks
from outbox._message import Message
from outbox._runtime.ops_server import OpsServer
from outbox.admin._operations import Operations
from relay import Relay
from relay.publishers.kafka import KafkaSettings
from tests.apps import RelayProcess
from tests.apps.consumer_app import create_effects_table, effect_handler, effect_rows
from tests.conftest import ROOT, status_counts, wait_until
from tests.kafka_broker import Broker
from tests.test_metrics import Scraper
from tests.test_tracing import finished, traceparent

SESSION_MS = 6000  # the test broker hands a group its records about half a session timeout after joining
FAST_RETRY = outbox.RetryPolicy(max_attempts=3, backoff_initial=0.05, backoff_max=0.2, jitter=0)
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])


def unique(prefix: str) -> str:
    return f"{prefix}.{uuid.uuid4().hex[:8]}"


def relay_publishes(engine: sa.Engine, bootstrap: str) -> None:
    """Let the real relay publish every message not delivered yet."""
    with Relay(engine, Registry(), kafka=KafkaSettings(bootstrap), poll_interval=0.1):
        wait_until(
            lambda: set(status_counts(engine)) == {"delivered"}, timeout=30, what="the relay published all"
        )


def add_all(engine: sa.Engine, items: list[tuple[str, dict[str, Any]]]) -> list[uuid.UUID]:
    with engine.begin() as conn:
        return [outbox.add(conn, topic, payload, key=f"k{n}") for n, (topic, payload) in enumerate(items)]


def consumer(
    engine: sa.Engine, registry: Registry, bootstrap: str, group: str, **kwargs: Any
) -> tuple[KafkaConsumerRunner, ConsumerMetrics]:
    metrics = ConsumerMetrics(group, process=False)
    settings = ConsumerSettings(bootstrap, group=group, session_timeout_ms=SESSION_MS, **kwargs)
    runner = KafkaConsumerRunner(
        engine, registry, settings, retry=FAST_RETRY, stop_timeout=10, metrics=metrics
    )
    return runner, metrics


@contextmanager
def served(runner: KafkaConsumerRunner, metrics: ConsumerMetrics) -> Iterator[Scraper]:
    server = OpsServer(metrics.registry, consumer_checks(runner), host="127.0.0.1", port=0).start()
    try:
        yield Scraper(server.port)
    finally:
        server.stop()


@sqlite_only
def test_counters_follow_handled_duplicate_and_dead_lettered_records(
    engine: sa.Engine, kafka_bootstrap: str
) -> None:
    paid, broken, group = unique("paid"), unique("broken"), unique("g")
    create_effects_table(engine)
    registry = Registry()
    registry.add(paid, effect_handler("metrics"))

    @registry.handler(broken, max_attempts=2)
    def always_fails(message: Message) -> None:
        raise ValueError("cannot handle this")

    ids = add_all(engine, [(paid, {"i": i}) for i in range(3)] + [(broken, {"i": 9})])
    relay_publishes(engine, kafka_bootstrap)
    runner, metrics = consumer(engine, registry, kafka_bootstrap, group)
    labels = {"group": group, "topic": paid}

    with served(runner, metrics) as scrape:
        status, report = scrape.ready()
        assert status == 503 and report["checks"]["consumer"]["ok"] is False, "not ready before it starts"
        with runner:

            def records(topic: str, result: str) -> float:
                return scrape.value("outbox_consumer_records_total", group=group, topic=topic, result=result)

            wait_until(lambda: records(paid, "handled") == 3, timeout=60, what="three handled")
            wait_until(lambda: records(broken, "dead_lettered") == 1, timeout=30, what="one dead-lettered")
            assert scrape.value("outbox_consumer_failed_attempts_total", group=group, topic=broken) == 2
            assert scrape.value("outbox_consumer_handler_seconds_count", group=group, topic=broken) == 2
            assert scrape.value("outbox_consumer_handler_seconds_count", **labels) == 3
            assert scrape.value("outbox_consumer_latency_seconds_count", **labels) == 3
            assert records(paid, "duplicate") == 0

            status, report = scrape.ready()
            assert status == 200, report
            assert set(report["checks"]) == {"consumer", "database", "broker", "progress"}

            # Kafka delivers the first message again (an operator replays it): the inbox has it
            Operations(engine).replay_ids([ids[0]], include_delivered=True)
            relay_publishes(engine, kafka_bootstrap)
            wait_until(lambda: records(paid, "duplicate") == 1, timeout=30, what="the duplicate skipped")
            assert records(paid, "handled") == 3, "a duplicate is not handled again"
            assert scrape.value("outbox_consumer_handler_seconds_count", **labels) == 3, "nor attempted"
            assert runner.stats()["duplicates"] == 1 and runner.stats()["dead_lettered"] == 1
        status, report = scrape.ready()
        assert status == 503 and report["checks"]["consumer"]["ok"] is False, "a stopped consumer is not"
    assert sorted(r.message_id for r in effect_rows(engine)) == sorted(str(i) for i in ids[:3])


@sqlite_only
def test_readyz_follows_the_consumers_broker(engine: sa.Engine, tmp_path: Path) -> None:
    broker = Broker(tmp_path).start()
    try:
        registry = Registry()
        registry.add(unique("idle"), lambda message: None)
        runner, metrics = consumer(engine, registry, broker.bootstrap, unique("g"), request_timeout_ms=5000)
        with served(runner, metrics) as scrape, runner:
            wait_until(lambda: scrape.ready()[0] == 200, timeout=60, what="ready")
            broker.stop()
            wait_until(lambda: scrape.ready()[0] == 503, timeout=60, what="unready without the broker")
            checks = scrape.ready()[1]["checks"]
            assert checks["broker"]["ok"] is False, checks
            # whichever saw it first: the consumer's own poll, or the handshake of an idle client
            detail = checks["broker"]["detail"]
            assert "no Kafka bootstrap server reachable" in detail or "Kafka poll failed" in detail, detail
            assert checks["consumer"]["ok"] and checks["database"]["ok"] and checks["progress"]["ok"], checks
            broker.start()
            wait_until(lambda: scrape.ready()[0] == 200, timeout=60, what="ready again")
    finally:
        broker.stop()


@sqlite_only
def test_outbox_consume_serves_metrics_on_its_metrics_port(
    engine: sa.Engine, db_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """``outbox consume --metrics-port 0``: the port it logs serves its counters and readiness while it
    consumes, and closes when SIGTERM stops it."""
    topic, group = unique("shipped"), unique("g")
    create_effects_table(engine)
    add_all(engine, [(topic, {"i": i}) for i in range(4)])
    relay_publishes(engine, kafka_bootstrap)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OUTBOX_TEST_TOPIC=topic)
    log_path = tmp_path / "consumer.log"
    with log_path.open("wb") as log:
        process = RelayProcess(
            subprocess.Popen(
                [
                    *(sys.executable, "-m", "outbox", "consume", "--app", "tests.apps.consumer_app:registry"),
                    *("--group", group, "--database-url", db_url),
                    *("--kafka-bootstrap-servers", kafka_bootstrap, "--session-timeout-ms", str(SESSION_MS)),
                    *("--metrics-port", "0", "--metrics-host", "127.0.0.1"),
                ],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            ),
            log_path,
        )
    try:
        found = wait_until(
            lambda: re.search(r"serving /metrics.* on http://127\.0\.0\.1:(\d+)", log_path.read_text()),
            timeout=30,
            what="the metrics port in the log",
        )
        assert isinstance(found, re.Match)
        scrape = Scraper(int(found[1]))
        handled = {"group": group, "topic": topic, "result": "handled"}
        wait_until(lambda: scrape.value("outbox_consumer_records_total", **handled) == 4, timeout=60)
        assert len(effect_rows(engine)) == 4
        status, report = scrape.ready()
        assert status == 200 and set(report["checks"]) == {"consumer", "database", "broker", "progress"}
        assert scrape.get("/healthz")[0] == 200
        assert "process_cpu_seconds_total" in scrape.get("/metrics")[1].decode(), "with the process metrics"
        process.send(signal.SIGTERM)
        assert process.wait_exit(30) == 0, process.log_tail()
        with pytest.raises(OSError):
            scrape.get("/healthz")
    finally:
        if process.alive():
            process.kill()


@sqlite_only
def test_writer_trace_continues_into_the_consumers_handler(
    engine: sa.Engine, kafka_bootstrap: str, spans: InMemorySpanExporter
) -> None:
    """The writer's span -> the relay's ``send`` span -> the consumer's ``process`` span -> the handler's
    own spans: one trace, each the child of the one before."""
    topic, group = unique("traced"), unique("g")
    tracer = trace.get_tracer("test.app")
    registry = Registry()
    seen: list[Message] = []

    @registry.handler(topic)
    def handle(message: Message, session: sa.orm.Session) -> None:
        seen.append(message)
        with tracer.start_as_current_span("handler work"):
            pass

    with tracer.start_as_current_span("place order") as writer_span, engine.begin() as conn:
        outbox.add(conn, topic, {"n": 1}, key="order-1")
    writer = writer_span.get_span_context()
    relay_publishes(engine, kafka_bootstrap)
    send = finished(spans, f"send {topic}")

    runner, _metrics = consumer(engine, registry, kafka_bootstrap, group)
    with runner:
        wait_until(lambda: runner.stats()["handled"] == 1, timeout=60, what="the record handled")
    process = finished(spans, f"process {topic}")
    assert process.kind is SpanKind.CONSUMER
    assert process.context.trace_id == writer.trace_id
    assert process.parent is not None and process.parent.span_id == send.context.span_id
    assert process.attributes is not None
    assert process.attributes["messaging.system"] == "kafka"
    assert process.attributes["messaging.message.id"] == str(seen[0].id)
    work = finished(spans, "handler work")
    assert work.parent is not None and work.parent.span_id == process.context.span_id
    assert seen[0].headers["traceparent"] == traceparent(send.context), "the handler sees the record's"
