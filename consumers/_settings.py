"""The settings of ``outbox consume``'s Kafka consumer, and what it subscribes to.

:class:`ConsumerSettings` is the connection (:class:`outbox._runtime.kafka_settings.KafkaConnection`) plus the
group and the consumer's own knobs, validated at construction; :func:`subscription` turns a registry's
topics (names and patterns) into what ``KafkaConsumer.subscribe`` takes. Both are re-exported by
:mod:`consumers._kafka`.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from consumers._registry import Registry, is_pattern
from outbox._errors import ConfigError
from outbox._runtime.kafka_settings import KafkaConnection

_OFFSET_RESETS = ("earliest", "latest")


@dataclass(frozen=True)
class ConsumerSettings(KafkaConnection):
    """Consumer settings: the connection (``outbox._runtime.kafka_settings.KafkaConnection``) plus the group.

    ``group`` is required (keyword). Offsets are always committed by the runner (auto-commit off).
    ``repr`` never shows the SASL password.
    """

    group: str = field(kw_only=True)
    client_id: str = "outbox-consumer"
    session_timeout_ms: int = 10_000
    max_poll_records: int = 500
    #: how long the broker may hold a fetch waiting for data: short, so that light traffic stays prompt
    fetch_max_wait_ms: int = 50
    max_poll_interval_ms: int = 300_000
    auto_offset_reset: str = "earliest"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.group, str) or not self.group.strip() or len(self.group) > 255:
            raise ConfigError("a consumer group name is required (1 to 255 characters)")
        for name in ("session_timeout_ms", "max_poll_records", "max_poll_interval_ms", "fetch_max_wait_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Kafka consumer {name} must be a positive whole number, got {value!r}")
        if self.auto_offset_reset not in _OFFSET_RESETS:
            raise ConfigError(f"auto_offset_reset must be one of {', '.join(_OFFSET_RESETS)}")

    def consumer_config(self) -> dict[str, Any]:
        """kafka-python ``KafkaConsumer`` keyword arguments."""
        return {
            **self.client_config(),
            "group_id": self.group,
            "enable_auto_commit": False,
            "auto_offset_reset": self.auto_offset_reset,
            "session_timeout_ms": self.session_timeout_ms,
            "heartbeat_interval_ms": max(100, min(3_000, self.session_timeout_ms // 3)),
            "max_poll_records": self.max_poll_records,
            "fetch_max_wait_ms": self.fetch_max_wait_ms,
            "max_poll_interval_ms": self.max_poll_interval_ms,
            "bootstrap_timeout_ms": min(self.request_timeout_ms, 10_000),
        }


def subscription(registry: Registry) -> tuple[list[str], str | None]:
    """``(topics, None)`` for a registry of exact names, ``([], regex)`` when it has patterns."""
    topics = registry.topics()
    patterns = [t for t in topics if is_pattern(t)]
    if not patterns:
        return topics, None
    alternatives = [re.escape(t) + r"\Z" for t in topics if t not in patterns]
    alternatives += [fnmatch.translate(p) for p in patterns]
    return [], "|".join(f"(?:{a})" for a in alternatives)
