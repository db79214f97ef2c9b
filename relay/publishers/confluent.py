"""Publishing to Kafka with confluent-kafka (librdkafka): same records, same rules, far less CPU.

An optional backend behind the same :class:`~relay.publishers.Publisher` interface as
``relay.publishers.kafka`` (kafka-python), chosen with ``KafkaSettings(client="confluent")`` or
``outbox relay --kafka-client confluent`` and installed with the ``confluent`` extra. kafka-python spends
tens of microseconds of Python per record; librdkafka does the batching, compression and retries in C, so
the relay's database claim path becomes the limit instead.

Records, ordering and error classification are the kafka-python publisher's (see its module docstring):
permanent errors (too large, invalid topic, authorisation) fail the message for good; timeouts and broker
unavailability release it without counting an attempt; a fatal producer error (idempotence state lost)
releases what is in flight and starts a new producer. Tracing (a PRODUCER span per send, whose context
the record carries) and the ``/readyz`` broker check (:meth:`ConfluentPublisher.broker_problem`) are the
kafka-python publisher's too.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from outbox._runtime.broker_health import BrokerHealth
from outbox._tracing import DeliverySpan, publish_span
from relay.publishers import Delivered, Delivery, DoneCallback, Failed, Outcome, Released, error_of
from relay.publishers._kafka_records import (
    BROKER_RETRY_PAUSE,
    EARLIER_NOT_SENT,
    KafkaSettings,
    note_broker_answer,
    pop_all,
    record_headers,
)

log = logging.getLogger("outbox.relay.kafka")

#: librdkafka error names that mean "this record can never be accepted"
_PERMANENT = {
    "MSG_SIZE_TOO_LARGE",
    "_MSG_SIZE_TOO_LARGE",
    "INVALID_MSG_SIZE",
    "TOPIC_AUTHORIZATION_FAILED",
    "TOPIC_EXCEPTION",
    "INVALID_RECORD",
    "INVALID_MSG",
    "_INVALID_ARG",
}


def librdkafka_config(settings: KafkaSettings) -> dict[str, Any]:
    """The librdkafka configuration equivalent to the kafka-python producer's."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "client.id": settings.client_id,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": settings.linger_ms,
        "batch.size": settings.batch_size,
        "message.max.bytes": settings.max_request_size,
        "request.timeout.ms": settings.request_timeout_ms,
        "delivery.timeout.ms": max(
            settings.delivery_timeout_ms, settings.request_timeout_ms + settings.linger_ms
        ),
        "security.protocol": settings.security_protocol.lower(),
        "reconnect.backoff.max.ms": 2000,
    }
    if settings.compression_type:
        config["compression.type"] = settings.compression_type
    if settings.security_protocol.startswith("SASL"):
        config.update(
            {
                "sasl.mechanism": settings.sasl_mechanism,
                "sasl.username": settings.sasl_username,
                "sasl.password": settings.sasl_password,
            }
        )
    for ours, theirs in (
        ("ssl_cafile", "ssl.ca.location"),
        ("ssl_certfile", "ssl.certificate.location"),
        ("ssl_keyfile", "ssl.key.location"),
    ):
        if getattr(settings, ours):
            config[theirs] = getattr(settings, ours)
    return config


def classify(err: Any) -> Outcome:
    """Outcome of a librdkafka ``KafkaError`` reported for one record."""
    name = err.name()
    text = f"{name}: {err.str()}"
    if name in _PERMANENT:
        return Failed(f"Kafka rejected the record: {text}", permanent=True)
    if err.retriable() or name in ("_MSG_TIMED_OUT", "_TIMED_OUT", "_TRANSPORT", "_ALL_BROKERS_DOWN"):
        return Released(f"broker unavailable: {text}", retry_after=BROKER_RETRY_PAUSE)
    return Failed(text)


class ConfluentPublisher:
    """Publishes with a confluent-kafka ``Producer``; a poll thread serves its delivery callbacks."""

    decodes_payload = False
    #: a key's consecutive records of one topic may be in flight together (``relay._dispatch``, runs):
    #: librdkafka's idempotent producer (``enable.idempotence``, which implies acks=all, at most 5
    #: requests in flight and unlimited retries) keeps a partition's records in the order produced,
    #: written once each, and :meth:`deliver` produces a group with one producer
    keeps_order_in_flight = True

    def __init__(self, settings: KafkaSettings) -> None:
        try:
            from confluent_kafka import Producer
        except ImportError:
            from outbox._errors import ConfigError

            raise ConfigError(
                "the confluent Kafka client is not installed: pip install 'sqla-outbox[confluent]'"
            ) from None
        self.settings = settings
        self._producer_class: Any = Producer
        self._producer: Any = self._make()
        #: deliveries handed to the producer and not yet reported, with their send span; whoever pops
        #: one (one atomic dict.pop: its answer, a restart, stop) reports it, so no lock per record
        self._pending: dict[tuple[str, int], tuple[Delivery, DoneCallback, DeliverySpan]] = {}
        self._health = BrokerHealth(settings)
        self._stopping = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="outbox-kafka-poll", daemon=True)
        self._poller.start()

    def accepts(self, topic: str) -> bool:
        return True

    def broker_problem(self, timeout: float = 1.0) -> str | None:
        """Why the broker looks unreachable now (``None``: it looks fine), for ``/readyz``: as
        :meth:`relay.publishers.kafka.KafkaPublisher.broker_problem`."""
        return self._health.problem(timeout)

    def deliver(self, deliveries: Sequence[Delivery], done: DoneCallback) -> None:
        producer = self._producer
        produced = 0
        held: set[str] = set()  # keys of a record the producer refused: the rest of the key waits
        for delivery in deliveries:
            if self._producer is not producer:  # restarted (a fatal error) while producing these
                break
            produced += 1
            key = delivery.message.key
            if key is not None and key in held:
                # not produced: it would only be published again, after the refused one (a duplicate)
                done(delivery, Released(EARLIER_NOT_SENT))
                continue
            topic = self.settings.target_topic(delivery.message.topic)
            span = publish_span(delivery.message, destination=topic)  # a no-op without OpenTelemetry
            self._pending[(delivery.token, delivery.seq)] = (delivery, done, span)
            if not self._produce(producer, delivery, topic, span) and key is not None:
                held.add(key)
        if self._producer is not producer:
            # One group, one producer: what went to the old one (no longer polled: no answer will come)
            # is released, and the rest of a key's group must not overtake it through the new one.
            restarted = Released("Kafka producer restarted", retry_after=BROKER_RETRY_PAUSE)
            for delivery in deliveries[:produced]:
                self._report(delivery, restarted)
            for delivery in deliveries[produced:]:
                done(delivery, restarted)

    def _produce(self, producer: Any, delivery: Delivery, topic: str, span: DeliverySpan) -> bool:
        """Hand the record to the producer; False when it refused it (and the refusal was reported)."""
        message = delivery.message
        while True:
            try:
                producer.produce(
                    topic,
                    value=message.body,
                    key=message.key.encode("utf-8") if message.key is not None else None,
                    headers=record_headers(delivery, span),
                    on_delivery=functools.partial(self._on_delivery, delivery),
                )
                return True
            except BufferError:  # librdkafka's local queue is full: let it drain, then try again
                producer.poll(0.05)
            except Exception as exc:  # invalid topic name and the like: raised before anything is sent
                error = getattr(exc, "args", [None])[0]
                outcome = (
                    classify(error) if hasattr(error, "name") else Failed(f"{type(exc).__name__}: {exc}")
                )
                self._report(delivery, outcome)
                return False

    def _on_delivery(self, delivery: Delivery, err: Any, _record: Any = None) -> None:
        if err is None:
            self._report(delivery, Delivered())
            return
        if err.fatal():
            log.warning("Kafka producer hit a fatal error (%s); starting a new producer", err.str())
            self._restart()
        self._report(delivery, classify(err))

    def _report(self, delivery: Delivery, outcome: Outcome) -> None:
        """Report ``outcome`` once per delivery (a late answer after a restart or stop is dropped)."""
        entry = self._pending.pop((delivery.token, delivery.seq), None)
        if entry is not None:
            note_broker_answer(self._health, outcome)
            _finish(entry, outcome)

    def _restart(self) -> None:
        for entry in pop_all(self._pending):
            _finish(entry, Released("Kafka producer restarted", retry_after=BROKER_RETRY_PAUSE))
        self._producer = self._make()

    def _make(self) -> Any:
        return self._producer_class({**librdkafka_config(self.settings), "logger": log})

    def _poll_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._producer.poll(0.05)
            except Exception:  # pragma: no cover - poll itself does not raise in practice
                log.exception("Kafka poll failed")
                time.sleep(0.1)

    def check_timeouts(self, done: DoneCallback) -> None:
        return None  # librdkafka's delivery.timeout.ms bounds every record

    def stop(self, timeout: float, done: DoneCallback) -> None:
        try:
            self._producer.flush(max(timeout, 0.1))
        finally:
            self._stopping.set()
            self._poller.join(2)
        for entry in pop_all(self._pending):  # never acknowledged: they will be published again
            _finish(entry, Released("relay stopping before the broker acknowledged"))


def _finish(entry: tuple[Delivery, DoneCallback, DeliverySpan], outcome: Outcome) -> None:
    """End the delivery's send span (failed unless delivered), then report its outcome."""
    delivery, done, span = entry
    span.end(error_of(outcome))
    done(delivery, outcome)
