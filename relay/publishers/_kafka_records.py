"""What both Kafka publishers share, whatever their client (kafka-python in :mod:`relay.publishers.kafka`,
librdkafka in :mod:`relay.publishers.confluent`): the settings they are configured with, the record a
message becomes, and how a broker's answer is read.

Its own module so that the two publishers depend on it and never on each other: "same records, same
rules" is written once, here.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, TypeVar

from outbox import _defaults as defaults
from outbox._errors import ConfigError
from outbox._runtime.broker_health import BrokerHealth
from outbox._runtime.kafka_settings import (
    HEADER_CONTENT_TYPE,
    HEADER_CREATED_AT,
    HEADER_ID,
    HEADER_TOPIC,
    KafkaConnection,
)
from outbox._tracing import DeliverySpan, trace_headers
from relay.publishers import Delivered, Delivery, Outcome, Released

K = TypeVar("K")
V = TypeVar("V")

#: seconds a message released because of a broker problem waits before it is claimed again
BROKER_RETRY_PAUSE = 2.0
#: why a record is not sent after the producer refused an earlier record of its key in the same batch
EARLIER_NOT_SENT = "an earlier record of its key was not sent"
_COMPRESSION = ("gzip", "snappy", "lz4", "zstd")
KAFKA_CLIENTS = ("kafka-python", "confluent")


@dataclass(frozen=True)
class KafkaSettings(KafkaConnection):
    """Producer settings: the connection (``outbox._runtime.kafka_settings.KafkaConnection``) plus batching,
    compression and timeouts. The producer is always idempotent with ``acks=all``."""

    client_id: str = defaults.KAFKA_CLIENT_ID
    #: "kafka-python" (default) or "confluent" (librdkafka, the ``confluent`` extra: far less CPU)
    client: str = "kafka-python"
    compression_type: str | None = None
    linger_ms: int = defaults.KAFKA_LINGER_MS
    batch_size: int = defaults.KAFKA_BATCH_SIZE
    max_request_size: int = 1024 * 1024
    delivery_timeout_ms: int = defaults.KAFKA_DELIVERY_TIMEOUT_MS
    #: (outbox topic pattern, Kafka topic) pairs, first match wins; unmatched topics keep their name
    routes: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.client not in KAFKA_CLIENTS:
            raise ConfigError(f"Kafka client must be one of {', '.join(KAFKA_CLIENTS)}, not {self.client!r}")
        if self.compression_type not in (None, *_COMPRESSION):
            raise ConfigError(f"Kafka compression must be one of {', '.join(_COMPRESSION)} (or none)")
        for name in ("linger_ms", "delivery_timeout_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(f"Kafka {name} must be zero or more")
        for name in ("batch_size", "max_request_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"Kafka {name} must be positive")

    def producer_config(self) -> dict[str, Any]:
        """kafka-python ``KafkaProducer`` keyword arguments: idempotent, acks=all, batched."""
        return {
            **self.client_config(),
            "enable_idempotence": True,
            "acks": "all",
            "linger_ms": self.linger_ms,
            "batch_size": self.batch_size,
            "max_request_size": self.max_request_size,
            "delivery_timeout_ms": max(self.delivery_timeout_ms, self.request_timeout_ms + self.linger_ms),
            "compression_type": self.compression_type,
            "max_block_ms": 10_000,
        }

    def target_topic(self, topic: str) -> str:
        for pattern, target in self.routes:
            if fnmatch.fnmatchcase(topic, pattern):
                return target
        return topic


def record_headers(delivery: Delivery, span: DeliverySpan | None = None) -> list[tuple[str, bytes]]:
    """The record's headers; with a publish ``span``, its trace context replaces the message's own."""
    message = delivery.message
    own = message.headers if span is None else trace_headers(message.headers, span)
    headers = [(name, value.encode("utf-8")) for name, value in own.items()]
    headers += [
        (HEADER_ID, str(message.id).encode()),
        (HEADER_TOPIC, message.topic.encode()),
        (HEADER_CREATED_AT, message.created_at.isoformat().encode()),
        (HEADER_CONTENT_TYPE, message.content_type.encode()),
    ]
    return headers


def pop_all(pending: dict[K, V]) -> list[V]:
    """Pop every entry of ``pending``, one atomic ``dict.pop`` each: an entry a concurrent pop (a
    broker's answer) took first is not returned, so each is reported once, by whoever popped it."""
    taken = []
    for key in list(pending):
        entry = pending.pop(key, None)
        if entry is not None:
            taken.append(entry)
    return taken


def note_broker_answer(health: BrokerHealth, outcome: Outcome) -> None:
    """Tell ``health`` what a delivery's outcome says about the broker (for ``broker_problem``)."""
    if isinstance(outcome, Delivered):
        health.answered()
    elif isinstance(outcome, Released) and outcome.retry_after > 0:  # the broker is away or busy
        health.failed(outcome.reason)


__all__ = [
    "BROKER_RETRY_PAUSE",
    "EARLIER_NOT_SENT",
    "KAFKA_CLIENTS",
    "KafkaSettings",
    "note_broker_answer",
    "pop_all",
    "record_headers",
]
