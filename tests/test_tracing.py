"""A trace started in the writer continues, linked, in the relay and the consumer; without OpenTelemetry
nothing changes.

The traced tests install the real OpenTelemetry SDK with its in-memory exporter as the global tracer
provider (the ``spans`` fixture of ``tests/conftest.py``), and take it away again afterwards, so that
every other test runs as a user without an SDK.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import orm

import outbox
from consumers import Registry
from consumers._records import message_from_record
from outbox import Message
from outbox._clock import utcnow
from outbox._serialization import decode_headers
from outbox._tracing import process_span, publish_span, trace_headers
from relay import Relay
from relay.publishers.kafka import KafkaSettings
from tests.conftest import PYTHON, ROOT, status_counts, wait_until
from tests.kafka_check import read_all


def traceparent(context: trace.SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def finished(spans: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = [s for s in spans.get_finished_spans() if s.name == name]
    assert len(found) == 1, f"{name}: {[s.name for s in spans.get_finished_spans()]}"
    return found[0]


def stored_headers(engine: sa.Engine) -> list[dict[str, str]]:
    t = outbox.tables_for().messages
    with engine.connect() as conn:
        return [decode_headers(h) for h in conn.execute(sa.select(t.c.headers).order_by(t.c.seq)).scalars()]


def test_writer_trace_continues_in_the_relay_handler(engine: sa.Engine, spans: InMemorySpanExporter) -> None:
    tracer = trace.get_tracer("test.app")
    seen: list[Message] = []
    registry = Registry()

    @registry.handler("traced.local")
    def handle(message: Message) -> None:
        seen.append(message)
        with tracer.start_as_current_span("handler work"):  # the handler's own span
            pass

    with (
        tracer.start_as_current_span("place order") as writer_span,
        orm.Session(engine) as session,
        session.begin(),
    ):
        outbox.add(session, "traced.local", {"n": 1}, headers={"tenant": "t1"})
    writer = writer_span.get_span_context()
    assert stored_headers(engine) == [{"tenant": "t1", "traceparent": traceparent(writer)}]

    with Relay(engine, registry, poll_interval=0.1):
        wait_until(lambda: status_counts(engine) == {"delivered": 1}, what="delivered")
        wait_until(lambda: len(spans.get_finished_spans()) >= 3, what="the spans to end")

    process = finished(spans, "process traced.local")
    assert process.kind is SpanKind.CONSUMER
    assert process.context.trace_id == writer.trace_id
    assert process.parent is not None and process.parent.span_id == writer.span_id
    assert process.attributes is not None and process.attributes["messaging.message.id"] == str(seen[0].id)
    work = finished(spans, "handler work")
    assert work.parent is not None and work.parent.span_id == process.context.span_id
    assert seen[0].headers["traceparent"] == traceparent(writer), "the handler sees the message as written"


@pytest.mark.parametrize("backend", ["sqlite"])
def test_without_an_sdk_the_context_still_reaches_the_handler_and_its_messages(engine: sa.Engine) -> None:
    """opentelemetry-api installed, no SDK (every test but the traced ones): no span is started, yet a
    message's trace context is current in its handler, so a message the handler adds carries it on."""
    writer = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    current: dict[str, trace.SpanContext] = {}
    registry = Registry()

    @registry.handler("untraced.in")
    def handle(message: Message, session: orm.Session) -> None:
        current[str(message.payload["n"])] = trace.get_current_span().get_span_context()
        outbox.add(session, "untraced.out", {"n": message.payload["n"]})

    registry.add("untraced.out", lambda message: None)
    with orm.Session(engine) as session, session.begin():
        outbox.add(session, "untraced.in", {"n": 1}, headers={"traceparent": writer})
        outbox.add(session, "untraced.in", {"n": 2})
    with Relay(engine, registry, poll_interval=0.1):
        wait_until(lambda: status_counts(engine) == {"delivered": 4}, what="delivered")

    assert f"{current['1'].trace_id:032x}" == writer.split("-")[1]
    assert not current["2"].is_valid
    out = {h.get("traceparent") for h in stored_headers(engine)[2:]}
    assert out == {writer, None}, out


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_writer_trace_continues_through_kafka_into_the_consumer(
    engine: sa.Engine, kafka_bootstrap: str, spans: InMemorySpanExporter, client: str
) -> None:
    """Either Kafka client sends in a PRODUCER span, child of the writer's, and the record names it."""
    topic = f"traced.{uuid.uuid4().hex[:8]}"
    tracer = trace.get_tracer("test.app")
    with tracer.start_as_current_span("place order") as writer_span, engine.begin() as conn:
        outbox.add(conn, topic, {"n": 1}, key="order-1")
    writer = writer_span.get_span_context()

    kafka = KafkaSettings(kafka_bootstrap, client=client)
    with Relay(engine, Registry(), kafka=kafka, poll_interval=0.1):
        wait_until(lambda: status_counts(engine) == {"delivered": 1}, timeout=60, what="published")
    send = finished(spans, f"send {topic}")
    assert send.kind is SpanKind.PRODUCER
    assert send.context.trace_id == writer.trace_id
    assert send.parent is not None and send.parent.span_id == writer.span_id

    (record,) = read_all(kafka_bootstrap, [topic], expect=1)
    assert record.headers["traceparent"] == traceparent(send.context), "the record names the send span"

    # the consumer's side: the span `outbox consume` runs a handler in, for this very record
    message = message_from_record(
        _Record(topic, record.partition, record.offset, None, b"order-1", record.value, record.headers)
    )
    with process_span(message, system="kafka", destination=topic):
        pass
    consume = finished(spans, f"process {topic}")
    assert consume.kind is SpanKind.CONSUMER
    assert consume.context.trace_id == writer.trace_id
    assert consume.parent is not None and consume.parent.span_id == send.context.span_id


@dataclass
class _Record:
    """A consumed record in the shape ``consumers._records`` reads (kafka-python's ConsumerRecord)."""

    topic: str
    partition: int
    offset: int
    timestamp: int | None
    key: bytes | None
    value: bytes | None
    headers_: dict[str, str]

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        return [(k, v.encode()) for k, v in self.headers_.items()]


@pytest.mark.parametrize("backend", ["sqlite"])
def test_callers_trace_headers_win(engine: sa.Engine, spans: InMemorySpanExporter) -> None:
    """A traceparent the caller passes is kept (theirs wins); one that is not valid W3C is never replaced
    on the way to Kafka either."""
    tracer = trace.get_tracer("test.app")
    theirs = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with tracer.start_as_current_span("place order"), engine.begin() as conn:
        outbox.add(conn, "t", {}, headers={"traceparent": theirs})
        outbox.add(conn, "t", {})
    assert stored_headers(engine)[0] == {"traceparent": theirs}
    assert set(stored_headers(engine)[1]) == {"traceparent"}

    message = Message(uuid.uuid4(), "t", None, {}, {"traceparent": "00-t-s-01", "x": "y"}, 1, utcnow())
    span = publish_span(message, destination="t")
    assert span.headers(), "a root span: a valid context of its own"
    assert trace_headers(message.headers, span) == {"traceparent": "00-t-s-01", "x": "y"}
    span.end()
    valid = Message(uuid.uuid4(), "t", None, {}, {"traceparent": theirs}, 1, utcnow())
    span = publish_span(valid, destination="t")
    assert trace_headers(valid.headers, span)["traceparent"] == span.headers()["traceparent"] != theirs
    span.end()


def test_without_opentelemetry_nothing_changes(tmp_path: Path) -> None:
    """Importing the packages never imports OpenTelemetry; with it missing, add() and the span helpers
    work and leave the headers as they were."""
    script = f"""
import json, sys
import outbox, relay, relay._runner, relay.metrics, consumers
imported_eagerly = "opentelemetry" in sys.modules
sys.modules["opentelemetry"] = None  # as if it were not installed
from outbox import _tracing as tracing
from outbox._message import Message
from outbox._clock import utcnow
import sqlalchemy as sa
engine = outbox.create_engine("sqlite:///{tmp_path / "plain.db"}")
with engine.begin() as conn:
    outbox.upgrade(conn)
    outbox.add(conn, "t", {{"n": 1}}, headers={{"a": "b"}})
    outbox.add(conn, "t", {{"n": 2}})
    headers = list(conn.execute(sa.text("SELECT headers FROM outbox ORDER BY seq")).scalars())
message = Message(None, "t", None, {{}}, {{"a": "b"}}, 1, utcnow())
with tracing.process_span(message) as span:
    span.fail("x")
sent = tracing.publish_span(message, destination="t")
sent.end("y")
print(json.dumps({{"eager": imported_eagerly, "enabled": tracing.enabled(), "headers": headers,
                   "kafka": tracing.trace_headers(message.headers, sent)}}))
"""
    out = subprocess.run([PYTHON, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result == {
        "eager": False,
        "enabled": False,
        "headers": ['{"a":"b"}', None],
        "kafka": {"a": "b"},
    }
