"""Dead letters: Kafka records a consumer group gave up on, kept in ``<table>_dead_letters``.

When a handler fails its last attempt (or a record cannot be read at all), ``outbox consume`` writes
the record here, exactly as it came (key and value bytes, every header), with the group, the record's
coordinates, the error (``Type: message``, at most :data:`MAX_ERROR_LENGTH` characters) and the number
of attempts, and then lets its partition move on.

Why the database and not a dead-letter topic:

- **replay per group**: a row belongs to the group that failed. ``outbox dlq replay`` publishes the
  record again to its topic; the groups that already processed it skip it through their inbox (same
  message id), and only the failing group handles it again;
- **visible where the outbox is operated**: ``outbox dlq list`` / ``show`` next to ``outbox status``,
  with the error, without a Kafka tool;
- **nothing extra to provision**: no topic per group to create, secure and give a retention to, and
  writing it needs only the database the consumer already uses for its inbox.

One dead letter per (group, topic, partition, offset): if the consumer dies after writing it but before
committing the offset, the record fails again and the second write is a no-op.

``outbox dlq replay`` republishes with an idempotent producer (``acks=all``) and then sets
``replayed_at``. The replayed record keeps its key, value and headers, with ``outbox-message-id`` set to
the dead letter's message id and ``outbox-replayed: 1`` added. If the process dies between the two, a
second replay sends it again: a duplicate for groups without the message in their inbox (at least once).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from consumers._records import (
    HEADER_REPLAYED,
    KafkaRecord,
    RecordHeaders,
    decode_record_headers,
    encode_record_headers,
    record_headers,
)
from outbox._clock import utc_iso, utcnow
from outbox._errors import BrokerError
from outbox._runtime.kafka_settings import HEADER_CONTENT_TYPE, HEADER_ID, KafkaConnection
from outbox._schema import OutboxTables
from outbox._serialization import JSON

MAX_ERROR_LENGTH = 2000


def bounded_error(text: str) -> str:
    """``text`` cut to :data:`MAX_ERROR_LENGTH` characters."""
    if len(text) <= MAX_ERROR_LENGTH:
        return text
    return text[: MAX_ERROR_LENGTH - 15] + " ...[truncated]"


@dataclass(frozen=True)
class DeadLetter:
    """One row of ``<table>_dead_letters``."""

    seq: int
    consumer_group: str
    kafka_topic: str
    partition: int
    offset: int
    message_id: uuid.UUID | None
    key: str | None
    raw_key: bytes | None
    value: bytes | None
    headers: RecordHeaders
    error: str
    attempts: int
    created_at: dt.datetime
    replayed_at: dt.datetime | None

    @classmethod
    def from_row(cls, row: sa.Row[Any]) -> DeadLetter:
        return cls(
            seq=int(row.seq),
            consumer_group=row.consumer_group,
            kafka_topic=row.kafka_topic,
            partition=int(row.partition),
            offset=int(row.offset),
            message_id=row.message_id,
            key=row.msg_key,
            raw_key=None if row.raw_key is None else bytes(row.raw_key),
            value=None if row.value is None else bytes(row.value),
            headers=decode_record_headers(row.headers),
            error=row.error,
            attempts=int(row.attempts),
            created_at=row.created_at,
            replayed_at=row.replayed_at,
        )

    def value_text(self) -> str | None:
        """The value for people: its text when it is UTF-8 (JSON or not), else a short description."""
        if self.value is None:
            return None
        try:
            return self.value.decode("utf-8")
        except UnicodeDecodeError:
            return f"<{len(self.value)} bytes, not UTF-8>"

    def to_dict(self, *, with_value: bool = False) -> dict[str, Any]:
        """The ``--json`` form: times as ISO 8601 strings with their ``+00:00`` offset, headers as text."""
        entry: dict[str, Any] = {
            "seq": self.seq,
            "group": self.consumer_group,
            "topic": self.kafka_topic,
            "partition": self.partition,
            "offset": self.offset,
            "message_id": None if self.message_id is None else str(self.message_id),
            "key": self.key,
            "error": self.error,
            "attempts": self.attempts,
            "dead_lettered_at": utc_iso(self.created_at),
            "replayed_at": None if self.replayed_at is None else utc_iso(self.replayed_at),
        }
        if with_value:
            content_type = dict(self.headers).get(HEADER_CONTENT_TYPE, b"").decode("utf-8", "replace")
            entry["headers"] = [[n, v.decode("utf-8", errors="replace")] for n, v in self.headers]
            entry["content_type"] = content_type or None
            entry["value"] = self.value_text()
            entry["value_is_json"] = content_type == JSON
        return entry

    def replay_headers(self) -> RecordHeaders:
        """The headers of the replayed record (see the module docstring)."""
        headers = [(n, v) for n, v in self.headers if n not in (HEADER_ID, HEADER_REPLAYED)]
        if self.message_id is not None:
            headers.append((HEADER_ID, str(self.message_id).encode()))
        headers.append((HEADER_REPLAYED, b"1"))
        return headers


class DeadLetters:
    """Queries on ``<table>_dead_letters``."""

    def __init__(self, tables: OutboxTables) -> None:
        self.table = tables.dead_letters

    def add(
        self,
        conn: sa.Connection,
        *,
        group: str,
        record: KafkaRecord,
        message_id: uuid.UUID | None,
        error: str,
        attempts: int,
    ) -> bool:
        """Write the dead letter of ``record``; False when this group already has one for it."""
        raw_key = None if record.key is None else bytes(record.key)
        values = {
            "consumer_group": group,
            "kafka_topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "message_id": message_id,
            "msg_key": None if raw_key is None else raw_key.decode("utf-8", errors="replace")[:255],
            "raw_key": raw_key,
            "value": None if record.value is None else bytes(record.value),
            "headers": encode_record_headers(record_headers(record)),
            "error": bounded_error(error),
            "attempts": attempts,
            "created_at": utcnow(),
        }
        try:
            with conn.begin_nested():
                conn.execute(sa.insert(self.table).values(**values))
        except sa.exc.IntegrityError:
            return False
        return True

    def find(
        self,
        conn: sa.Connection,
        *,
        group: str | None = None,
        include_replayed: bool = True,
        limit: int | None = None,
        seqs: Sequence[int] = (),
        after: int | None = None,
        up_to: int | None = None,
    ) -> list[DeadLetter]:
        """Dead letters in ``seq`` order, optionally of one group, not yet replayed, or by seq, after
        seq ``after`` and up to seq ``up_to``."""
        t = self.table
        query = sa.select(t).order_by(t.c.seq)
        if after is not None:
            query = query.where(t.c.seq > after)
        if up_to is not None:
            query = query.where(t.c.seq <= up_to)
        if group is not None:
            query = query.where(t.c.consumer_group == group)
        if not include_replayed:
            query = query.where(t.c.replayed_at.is_(None))
        if seqs:
            query = query.where(t.c.seq.in_(list(seqs)))
        if limit is not None:
            query = query.limit(limit)
        return [DeadLetter.from_row(row) for row in conn.execute(query)]

    def get(self, conn: sa.Connection, seq: int) -> DeadLetter | None:
        row = conn.execute(sa.select(self.table).where(self.table.c.seq == seq)).first()
        return None if row is None else DeadLetter.from_row(row)

    def mark_replayed(self, conn: sa.Connection, seqs: Sequence[int], *, at: dt.datetime) -> int:
        if not seqs:
            return 0
        t = self.table
        return conn.execute(sa.update(t).where(t.c.seq.in_(list(seqs))).values(replayed_at=at)).rowcount


def republish(
    letters: Sequence[DeadLetter],
    connection: KafkaConnection,
    *,
    producer_factory: Callable[..., Any] | None = None,
    timeout: float = 60.0,
) -> tuple[list[DeadLetter], list[tuple[DeadLetter, str]]]:
    """Send each dead letter back to its topic; return ``(sent, [(not sent, why)])``.

    Uses an idempotent kafka-python producer with ``acks=all``; a letter counts as sent once the broker
    acknowledged it. Raises :class:`BrokerError` when no producer can be started.
    """
    if not letters:
        return [], []
    factory = producer_factory or _kafka_python_producer
    config = {
        **connection.client_config(),
        "enable_idempotence": True,
        "acks": "all",
        "max_block_ms": 10_000,
    }
    try:
        producer = factory(**config)
    except Exception as exc:
        raise BrokerError(
            f"cannot reach Kafka at {connection.bootstrap_servers}: {type(exc).__name__}: {exc}"
        ) from None
    sent: list[DeadLetter] = []
    failed: list[tuple[DeadLetter, str]] = []
    try:
        futures = []
        for letter in letters:
            try:
                future = producer.send(
                    letter.kafka_topic,
                    key=letter.raw_key,
                    value=letter.value,
                    headers=letter.replay_headers(),
                )
            except Exception as exc:
                failed.append((letter, f"{type(exc).__name__}: {exc}"))
            else:
                futures.append((letter, future))
        producer.flush(timeout=timeout)
        for letter, future in futures:
            try:
                future.get(timeout=timeout)
            except Exception as exc:
                failed.append((letter, f"{type(exc).__name__}: {exc}"))
            else:
                sent.append(letter)
    finally:
        producer.close(timeout=10)
    return sent, failed


def _kafka_python_producer(**config: Any) -> Any:
    from kafka import KafkaProducer

    return KafkaProducer(**config)
