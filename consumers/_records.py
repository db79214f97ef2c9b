"""How a Kafka record becomes the :class:`outbox.Message` a handler receives, and how a record is kept.

A record published by the relay (``relay.publishers.kafka``) carries everything a handler saw in the
relay: key = the message key (UTF-8), value = the payload bytes as stored, and the headers
``outbox-message-id``, ``outbox-topic``, ``outbox-created-at`` and ``content-type`` next to the user's
own. :func:`message_from_record` reads them back:

- ``id``: the ``outbox-message-id`` header. A record without it (written by another producer) gets a
  deterministic id, :func:`record_id`: a UUIDv5 of ``"<topic>/<partition>/<offset>"`` in
  :data:`RECORD_ID_NAMESPACE`, so every delivery of that record has the same id and the inbox can
  recognise it;
- ``topic``: the ``outbox-topic`` header (the outbox topic, which a relay route may have renamed on the
  way to Kafka), else the Kafka topic;
- ``key``: the record key decoded as UTF-8 (undecodable bytes replaced); ``None`` for no key;
- ``payload``: the value decoded by its ``content-type`` header: ``application/json`` is parsed (a value
  that is not valid JSON cannot be handled: :class:`UndecodableRecord`); anything else, or no header,
  is handed over as ``bytes``;
- ``headers``: the record headers except ``outbox-*`` and ``content-type``, as UTF-8 text, exactly as
  handlers in the relay see them;
- ``attempt``: the consumer's local attempt number (1, 2, ...; not the relay's);
- ``created_at``: the ``outbox-created-at`` header (naive UTC), else the record's timestamp.

Dead letters keep a record's headers as a JSON array of ``[name, value]`` pairs (names may repeat), the
values decoded with ``surrogateescape`` so that any bytes survive the round trip
(:func:`encode_record_headers`, :func:`decode_record_headers`).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any, Protocol

from outbox._message import Message
from outbox._runtime.kafka_settings import HEADER_CONTENT_TYPE, HEADER_CREATED_AT, HEADER_ID, HEADER_TOPIC
from outbox._serialization import BINARY, JSON

#: namespace of the ids given to records that carry no ``outbox-message-id`` header (never change it:
#: the inbox of every consumer group holds ids made with it)
RECORD_ID_NAMESPACE = uuid.UUID("6f1b9e0c-3c55-5d6a-9a57-0c8a3f0e4b21")
#: header added by ``outbox dlq replay`` to the records it sends back
HEADER_REPLAYED = "outbox-replayed"

RecordHeaders = list[tuple[str, bytes]]


class KafkaRecord(Protocol):
    """What is read from a kafka-python ``ConsumerRecord`` (tests pass simpler objects)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int | None: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Any: ...


class UndecodableRecord(ValueError):
    """The record cannot become a message (its JSON value does not parse): no retry can help."""


def record_id(topic: str, partition: int, offset: int) -> uuid.UUID:
    """The id of a record without an ``outbox-message-id`` header (see the module docstring)."""
    return uuid.uuid5(RECORD_ID_NAMESPACE, f"{topic}/{partition}/{offset}")


def record_headers(record: KafkaRecord) -> RecordHeaders:
    """The record's headers as ``(name, bytes)`` pairs (``None`` values become empty bytes)."""
    return [(str(name), bytes(value or b"")) for name, value in (record.headers or [])]


def message_id_of(record: KafkaRecord) -> uuid.UUID:
    """The message id of ``record``: its ``outbox-message-id`` header, else :func:`record_id`."""
    for name, value in record_headers(record):
        if name == HEADER_ID:
            try:
                return uuid.UUID(value.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                break  # a foreign header of that name: fall back to the record's coordinates
    return record_id(record.topic, record.partition, record.offset)


def message_from_record(record: KafkaRecord, *, attempt: int = 1) -> Message:
    """The :class:`Message` a handler receives for ``record`` (see the module docstring).

    Raises :class:`UndecodableRecord` when the value is declared JSON but does not parse.
    """
    special: dict[str, str] = {}
    headers: dict[str, str] = {}
    for name, value in record_headers(record):
        text = value.decode("utf-8", errors="replace")
        if name.startswith("outbox-") or name == HEADER_CONTENT_TYPE:
            special[name] = text
        else:
            headers[name] = text
    content_type = special.get(HEADER_CONTENT_TYPE, BINARY)
    body = bytes(record.value or b"")
    payload: Any = body
    if content_type == JSON:
        try:
            payload = json.loads(body)
        except ValueError as exc:  # UnicodeDecodeError is a ValueError too
            raise UndecodableRecord(f"the record value is not valid JSON: {exc}") from None
    key = record.key
    return Message(
        id=message_id_of(record),
        topic=special.get(HEADER_TOPIC) or record.topic,
        key=None if key is None else bytes(key).decode("utf-8", errors="replace"),
        payload=payload,
        headers=headers,
        attempt=attempt,
        created_at=_created_at(special.get(HEADER_CREATED_AT), record.timestamp),
        content_type=content_type,
        body=body,
    )


def _created_at(header: str | None, timestamp_ms: int | None) -> dt.datetime:
    if header:
        try:
            moment = dt.datetime.fromisoformat(header)
        except ValueError:
            pass
        else:
            if moment.tzinfo is not None:
                moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
            return moment
    if timestamp_ms is not None and timestamp_ms >= 0:
        return dt.datetime.fromtimestamp(timestamp_ms / 1000, dt.UTC).replace(tzinfo=None)
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def encode_record_headers(headers: RecordHeaders) -> str | None:
    """Headers as stored in a dead letter: a JSON array of ``[name, value]`` (lossless for any bytes)."""
    if not headers:
        return None
    pairs = [[name, value.decode("utf-8", errors="surrogateescape")] for name, value in headers]
    return json.dumps(pairs, separators=(",", ":"))  # ensure_ascii keeps surrogates as \\udcxx escapes


def decode_record_headers(text: str | None) -> RecordHeaders:
    """Inverse of :func:`encode_record_headers`."""
    if not text:
        return []
    return [
        (str(name), str(value).encode("utf-8", errors="surrogateescape")) for name, value in json.loads(text)
    ]
