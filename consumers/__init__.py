"""Handlers: plain functions registered for a topic, run in-process by the relay or from Kafka by
``outbox consume``. The same handler code works in both places.

Public surface (what README and docs promise; everything else is internal): :func:`handler` and
:class:`Registry` (with :data:`default_registry`, :func:`load_registry` and the :class:`Handler` it
holds) from ``consumers._registry``; :class:`HandlerTimeout` (``consumers.attempt``), what a handler
past its timeout is interrupted with; and the Kafka consumer runner, :class:`KafkaConsumerRunner` with
its :class:`ConsumerSettings` (``consumers._kafka``, ``outbox consume`` in code). The last three are
imported on first use, so that ``from consumers import handler`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from consumers._registry import Handler, Registry, default_registry, handler, load_registry

if TYPE_CHECKING:
    from consumers._kafka import ConsumerSettings, KafkaConsumerRunner
    from consumers.attempt import HandlerTimeout

#: imported on first use: name -> its module
_LAZY = {
    "HandlerTimeout": "consumers.attempt",
    "ConsumerSettings": "consumers._kafka",
    "KafkaConsumerRunner": "consumers._kafka",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'consumers' has no attribute {name!r}")


__all__ = [
    "ConsumerSettings",
    "Handler",
    "HandlerTimeout",
    "KafkaConsumerRunner",
    "Registry",
    "default_registry",
    "handler",
    "load_registry",
]
