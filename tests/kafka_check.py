"""Reading back what really reached the broker, with an independent client (confluent-kafka/librdkafka)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes
    headers: dict[str, str]


def read_all(bootstrap: str, topics: list[str], *, expect: int, timeout: float = 60.0) -> list[Record]:
    """Read ``topics`` from the beginning until ``expect`` records arrived and a quiet second passed."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"check-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
        }
    )
    consumer.subscribe(topics)
    records: list[Record] = []
    deadline = time.monotonic() + timeout
    quiet_since: float | None = None
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                if len(records) >= expect:
                    quiet_since = quiet_since or time.monotonic()
                    if time.monotonic() - quiet_since > 1.0:
                        break
                continue
            if msg.error():
                if msg.error().code() in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                    continue
                raise RuntimeError(f"consumer error: {msg.error()}")
            quiet_since = None
            key = msg.key()
            records.append(
                Record(
                    topic=msg.topic(),
                    partition=msg.partition(),
                    offset=msg.offset(),
                    key=key.decode() if key is not None else None,
                    value=msg.value() or b"",
                    headers={k: (v or b"").decode() for k, v in (msg.headers() or [])},
                )
            )
    finally:
        consumer.close()
    return records
