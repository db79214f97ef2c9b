"""Publishing to Kafka with kafka-python: an idempotent producer, acks=all, one sender thread.

Each record: key = the message key (UTF-8), value = the payload bytes exactly as stored, headers = the
user's headers plus :data:`HEADER_ID`, :data:`HEADER_TOPIC`, :data:`HEADER_CREATED_AT` and
:data:`HEADER_CONTENT_TYPE`. A W3C ``traceparent`` header passes through as is, unless OpenTelemetry is
installed and configured: then each send is a PRODUCER span, child of the message's ``traceparent``, and
the record carries that span's context instead (:mod:`outbox._tracing`).

Why it keeps order per key: one key on one topic goes to one partition, and the producer is idempotent
(``enable_idempotence=True``, ``acks=all``, retries on; kafka-python refuses, rather than quietly drops,
idempotence that conflicts with the other settings or the broker's version): the broker writes a
partition's records in the order they were sent, once each, whatever the producer retries, and
kafka-python keeps one batch per partition in flight. So a key's run (``relay._dispatch``, runs) is
handed over as one group of records of one topic (:attr:`KafkaPublisher.keeps_order_in_flight`),
all sent by one producer: what the broker took of a group is a prefix of it, in order. Records of one
key on different topics are never in flight together, and the next group of a key is sent only once
every record before it was acknowledged.

How errors are classified (:func:`classify`):

- errors that say *this record can never be accepted* (too large, invalid topic, topic authorisation)
  fail the message permanently: it goes ``dead`` with the broker's error recorded;
- everything that says *the broker is away or busy* (timeouts, connection errors, leader moves,
  ``retriable`` broker errors) releases the message after a pause: its attempt is not counted, so a
  broker outage of any length never makes a message dead;
- anything else is an ordinary failed attempt under the topic's retry policy.

Knows nothing about SQL: the relay gives it :class:`~relay.publishers.Delivery` values and writes the
outcomes it reports.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

from outbox._runtime.broker_health import BrokerHealth
from outbox._runtime.kafka_settings import HEADER_CONTENT_TYPE, HEADER_CREATED_AT, HEADER_ID, HEADER_TOPIC
from outbox._tracing import DeliverySpan, publish_span
from relay.publishers import (
    BrokerPublisher,
    Delivered,
    Delivery,
    DoneCallback,
    Failed,
    Outcome,
    Released,
    describe_error,
    error_of,
)
from relay.publishers._kafka_records import (
    BROKER_RETRY_PAUSE,
    EARLIER_NOT_SENT,
    KAFKA_CLIENTS,
    KafkaSettings,
    note_broker_answer,
    pop_all,
    record_headers,
)

log = logging.getLogger("outbox.relay.kafka")


_PERMANENT = {
    "MessageSizeTooLargeError",
    "RecordListTooLargeError",
    "InvalidTopicError",
    "TopicAuthorizationFailedError",
    "InvalidRecordError",
    "UnsupportedForMessageFormatError",
}


def classify(exc: BaseException) -> Outcome:
    """Turn a producer error into an outcome (see the module docstring)."""
    name = type(exc).__name__
    if name in _PERMANENT:
        return Failed(f"Kafka rejected the record: {describe_error(exc)}", permanent=True)
    if (
        getattr(exc, "retriable", False)
        or name in ("NoBrokersAvailable", "KafkaConnectionError")
        or isinstance(exc, ConnectionError | TimeoutError)
    ):
        return Released(f"broker unavailable: {describe_error(exc)}", retry_after=BROKER_RETRY_PAUSE)
    return Failed(describe_error(exc))


_DELIVERED = Delivered()  # immutable: one for every acknowledged record


class _Pending:
    """A delivery handed to the publisher and not yet reported."""

    __slots__ = ("delivery", "done", "generation", "sent_at")

    def __init__(self, delivery: Delivery, done: DoneCallback, sent_at: float) -> None:
        self.delivery = delivery
        self.done = done
        self.generation = -1  # the producer generation that sent it; -1: not sent yet
        self.sent_at = sent_at


class KafkaPublisher:
    """Publishes every topic it is asked to (the relay routes in-process handlers first).

    ``producer_factory`` exists for the optional confluent-kafka backend and for tests with a real
    broker behind a proxy; by default it builds a kafka-python ``KafkaProducer``.

    Each delivery is reported exactly once without a lock per record: whoever pops it from
    ``_pending`` (one atomic ``dict.pop``: the producer's answer, a producer restart, :meth:`stop`)
    reports it. (A lock taken three times per record, and a queue hand-over per record, were a tenth
    of the sender thread's time in profiles; batches now pass to the sender thread whole.)
    """

    decodes_payload = False
    #: a key's consecutive records of one topic may be in flight together (``relay._dispatch``, runs):
    #: the producer is idempotent with acks=all (:meth:`KafkaSettings.producer_config`), so the broker
    #: keeps a partition's records in the order sent, and :meth:`_send_loop` sends a group with one
    #: producer (a ``producer_factory`` must build a producer with these settings too)
    keeps_order_in_flight = True

    def __init__(self, settings: KafkaSettings, *, producer_factory: Any = None) -> None:
        self.settings = settings
        self._factory = producer_factory or _kafka_python_producer
        self._producer: Any = None
        self._generation = 0
        self._reset_requested = False
        self._queue: queue.SimpleQueue[tuple[Sequence[Delivery], DoneCallback] | None] = queue.SimpleQueue()
        #: deliveries handed to this publisher and not yet reported, by (token, seq)
        self._pending: dict[tuple[str, int], _Pending] = {}
        self._lock = threading.Lock()  # producer restarts only
        self._stopping = threading.Event()
        #: acknowledgements and broker problems, for readiness (broker_problem)
        self._health = BrokerHealth(settings)
        self._thread = threading.Thread(target=self._send_loop, name="outbox-kafka-sender", daemon=True)
        self._thread.start()

    def accepts(self, topic: str) -> bool:
        return True

    def broker_problem(self, timeout: float = 1.0) -> str | None:
        """Why the broker looks unreachable now (``None``: it looks fine), for ``/readyz``.

        Unreachable when the latest answer, within the last 30 s, was a broker problem (no
        acknowledgement since); with nothing that recent, when no bootstrap server completes a handshake
        (TLS, SASL, a metadata request) with these settings
        (:class:`outbox._runtime.broker_health.BrokerHealth`,
        which waits at most ``timeout`` seconds and reuses a result for a few seconds).
        """
        return self._health.problem(timeout)

    def deliver(self, deliveries: Sequence[Delivery], done: DoneCallback) -> None:
        now = time.monotonic()
        self._pending.update({(d.token, d.seq): _Pending(d, done, now) for d in deliveries})
        self._queue.put((deliveries, done))

    def check_timeouts(self, done: DoneCallback) -> None:
        """Watchdog: a send that got no answer well past the producer's own delivery timeout means the
        producer is wedged; give its messages back and start a fresh producer."""
        limit = (self.settings.delivery_timeout_ms + self.settings.request_timeout_ms) / 1000 + 5
        now = time.monotonic()
        # any generation: a record sent while the watchdog restarted the producer can carry the old one
        stale = [
            entry
            for entry in list(self._pending.values())
            if entry.generation >= 0 and now - entry.sent_at > limit
        ]
        if stale:
            log.warning(
                "Kafka producer gave no answer for %d record(s) in %.0fs; starting a new one",
                len(stale),
                limit,
            )
            self._reset_producer()

    def _reset_producer(self) -> None:
        """Drop the current producer (kafka-python's idempotent producer can stay wedged after its
        batches expired during an outage). Its unanswered messages are released, and a key's group is
        never split between two producers (:meth:`_send_loop`): the old producer may still have
        written any prefix of a group's unanswered records, so each released record is published
        again, a duplicate when it was written (at-least-once), while the order of first appearances
        in the partition is kept: the key's next records go out only once these were published again."""
        with self._lock:
            old, self._producer = self._producer, None
            generation = self._generation
            self._generation += 1
        for key, entry in list(self._pending.items()):  # everything sent by this producer or before
            if 0 <= entry.generation <= generation and self._pending.pop(key, None) is entry:
                entry.done(
                    entry.delivery, Released("Kafka producer restarted", retry_after=BROKER_RETRY_PAUSE)
                )
        if old is not None:
            threading.Thread(target=_close_quietly, args=(old,), daemon=True).start()

    def stop(self, timeout: float, done: DoneCallback) -> None:
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout)
        if self._producer is not None:
            try:
                self._producer.flush(timeout=max(timeout, 0.1))
            except Exception as exc:
                log.warning("flushing the Kafka producer on stop failed: %s", describe_error(exc))
            try:
                self._producer.close(timeout=1)
            except Exception:  # closing a producer whose broker is gone may raise; nothing is lost
                log.debug("closing the Kafka producer raised", exc_info=True)
        for entry in pop_all(self._pending):  # never acknowledged: give them back, to be published again
            entry.done(entry.delivery, Released("relay stopping before the broker acknowledged"))

    def _report(self, delivery: Delivery, done: DoneCallback, outcome: Outcome) -> None:
        if self._pending.pop((delivery.token, delivery.seq), None) is None:
            return  # already reported (stop or a producer restart raced with the answer)
        note_broker_answer(self._health, outcome)
        if isinstance(outcome, Released) and "Expiring" in outcome.reason:
            self._reset_requested = True  # batches expired: this producer may be wedged, use a new one
        done(delivery, outcome)

    def _send_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            deliveries, done = item
            generation = -1  # the producer generation that sent the batch's first record
            held: set[str] = set()  # keys of a record the producer refused: the rest of the key waits
            for index, delivery in enumerate(deliveries):
                if self._stopping.is_set():
                    self._report_all(deliveries[index:], done, Released("relay stopping"))
                    break
                if self._reset_requested:
                    self._reset_requested = False
                    self._reset_producer()
                producer = self._ensure_producer(others_waiting=index + 1 < len(deliveries))
                if producer is None:  # the broker stays away: give this batch back
                    released = Released("broker unavailable", retry_after=BROKER_RETRY_PAUSE)
                    self._report_all(deliveries[index:], done, released)
                    break
                if generation < 0:
                    generation = self._generation
                elif generation != self._generation:
                    # Restarted mid-batch: the records before were released, whatever the old producer
                    # wrote of them. The rest of a key's group must not overtake them with the new one.
                    released = Released("Kafka producer restarted", retry_after=BROKER_RETRY_PAUSE)
                    self._report_all(deliveries[index:], done, released)
                    break
                key = delivery.message.key
                if key is not None and key in held:
                    # not sent: it would only be published again, after the refused one (a duplicate)
                    self._report(delivery, done, Released(EARLIER_NOT_SENT))
                elif not self._send(producer, delivery, done) and key is not None:
                    held.add(key)

    def _report_all(self, deliveries: Sequence[Delivery], done: DoneCallback, outcome: Outcome) -> None:
        for delivery in deliveries:
            self._report(delivery, done, outcome)

    def _send(self, producer: Any, delivery: Delivery, done: DoneCallback) -> bool:
        """Hand the record to the producer; False when it refused it (reported) or it was reported."""
        entry = self._pending.get((delivery.token, delivery.seq))
        if entry is None:
            return False  # already reported (a producer restart from the watchdog)
        entry.generation = self._generation
        entry.sent_at = time.monotonic()
        message = delivery.message
        topic = self.settings.target_topic(message.topic)
        span = publish_span(message, destination=topic)  # a no-op without OpenTelemetry
        try:
            future = producer.send(
                topic,
                key=message.key.encode("utf-8") if message.key is not None else None,
                value=message.body,
                headers=record_headers(delivery, span),
            )
        except Exception as exc:
            if type(exc).__name__ == "ValueError" and "Topic name" in str(exc):
                self._answer(delivery, done, span, Failed(f"invalid Kafka topic: {exc}", permanent=True))
            else:
                self._answer(delivery, done, span, classify(exc))
            return False
        # bound methods with arguments (kafka-python wraps them in functools.partial): no closures per record
        future.add_callback(self._acknowledged, delivery, done, span)
        future.add_errback(self._not_acknowledged, delivery, done, span)
        return True

    def _acknowledged(self, delivery: Delivery, done: DoneCallback, span: DeliverySpan, _meta: Any) -> None:
        self._answer(delivery, done, span, _DELIVERED)

    def _not_acknowledged(self, delivery: Delivery, done: DoneCallback, span: DeliverySpan, exc: Any) -> None:
        self._answer(delivery, done, span, classify(exc))

    def _answer(self, delivery: Delivery, done: DoneCallback, span: DeliverySpan, outcome: Outcome) -> None:
        span.end(error_of(outcome))
        self._report(delivery, done, outcome)

    def _ensure_producer(self, *, others_waiting: bool = False) -> Any:
        """The producer, made anew after a failure; ``None`` when stopping, or when the broker stays
        away while other deliveries wait (``others_waiting``, or more batches queued)."""
        if self._producer is not None:
            return self._producer
        delay = 0.2
        while not self._stopping.is_set():
            try:
                self._producer = self._factory(self.settings)
                return self._producer
            except Exception as exc:
                log.warning(
                    "cannot connect to Kafka at %s (%s); retrying",
                    self.settings.bootstrap_servers,
                    describe_error(exc),
                )
                if self._stopping.wait(delay):
                    return None
                delay = min(delay * 2, 5.0)
                if (others_waiting or self._queue.qsize() > 0) and delay >= 5.0:
                    return None  # let the relay release what waits, rather than hold leases forever
        return None


def _close_quietly(producer: Any) -> None:
    """Close a producer being discarded, without waiting for what it could not send.

    kafka-python's ``close(timeout=0)`` first flushes, and raises when records are stuck before it
    stops its sender thread; stop the sender ourselves first, and mark the producer closed so that its
    ``__del__`` does not try to flush again.
    """
    sender = getattr(producer, "_sender", None)
    if sender is not None:
        with contextlib.suppress(Exception):
            sender.force_close()
    with contextlib.suppress(Exception):
        producer.close(timeout=0)
    with contextlib.suppress(Exception):
        producer._closed = True


def _kafka_python_producer(settings: KafkaSettings) -> Any:
    from kafka import KafkaProducer

    return KafkaProducer(**settings.producer_config())


def publisher_for(settings: KafkaSettings) -> BrokerPublisher:
    """The publisher of the client ``settings.client`` names.

    The one place that knows both clients: it imports the librdkafka publisher only when asked for it
    (an optional extra), and that module never imports this one (both share
    :mod:`relay.publishers._kafka_records`)."""
    if settings.client == "confluent":
        from relay.publishers.confluent import ConfluentPublisher

        return ConfluentPublisher(settings)
    return KafkaPublisher(settings)


__all__ = [
    "BROKER_RETRY_PAUSE",
    "HEADER_CONTENT_TYPE",
    "HEADER_CREATED_AT",
    "HEADER_ID",
    "HEADER_TOPIC",
    "KAFKA_CLIENTS",
    "KafkaPublisher",
    "KafkaSettings",
    "classify",
    "publisher_for",
]
