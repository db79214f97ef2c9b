"""``Message``: what a handler receives, in the relay and in the Kafka consumer alike."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Message:
    """One outbox message as handed to a handler.

    ``payload`` is the decoded JSON value (or ``bytes`` for binary payloads); ``body`` is the stored bytes.
    ``attempt`` counts deliveries, starting at 1. ``created_at`` is naive UTC.
    """

    id: uuid.UUID
    topic: str
    key: str | None
    payload: Any
    headers: dict[str, str]
    attempt: int
    created_at: dt.datetime
    content_type: str = "application/json"
    body: bytes = field(default=b"", repr=False)
