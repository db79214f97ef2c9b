"""The relay: claims committed outbox messages with leases and delivers them at least once.

Public surface (what README and docs promise; everything else is internal):

- :class:`Relay` (``relay._runner``): the relay itself, ``with Relay(engine, registry): ...``;
- :class:`RelayObserver` and :class:`RecordedOutcome` (``relay.observers``): hooks into a running relay;
- :class:`RelayMetrics` (``relay.metrics``) and :func:`serve` (``relay.health``): Prometheus metrics,
  ``/healthz`` and ``/readyz``; imported when first used, so a relay without metrics never loads
  ``prometheus_client``;
- :class:`KafkaSettings` (``relay.publishers.kafka``): publishing to Kafka;
- :class:`Publisher`, :class:`BrokerPublisher`, :class:`Delivery` and the outcomes :class:`Delivered`,
  :class:`Failed`, :class:`Released` (``relay.publishers``): a destination of your own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from relay._outcomes import RecordedOutcome
from relay._runner import Relay
from relay.observers import RelayObserver
from relay.publishers import BrokerPublisher, Delivered, Delivery, Failed, Outcome, Publisher, Released
from relay.publishers.kafka import KafkaSettings

if TYPE_CHECKING:
    from relay.health import serve
    from relay.metrics import RelayMetrics

#: imported on first use: name -> its module
_LAZY = {"RelayMetrics": "relay.metrics", "serve": "relay.health"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'relay' has no attribute {name!r}")


__all__ = [
    "BrokerPublisher",
    "Delivered",
    "Delivery",
    "Failed",
    "KafkaSettings",
    "Outcome",
    "Publisher",
    "RecordedOutcome",
    "Relay",
    "RelayMetrics",
    "RelayObserver",
    "Released",
    "serve",
]
