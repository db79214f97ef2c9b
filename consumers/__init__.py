"""Handlers: plain functions registered for a topic, run in-process by the relay or from Kafka by
``outbox consume``. The same handler code works in both places."""

from consumers.registry import Handler, Registry, default_registry, handler, load_registry

__all__ = ["Handler", "Registry", "default_registry", "handler", "load_registry"]
