"""The relay: claims committed outbox messages with leases and delivers them at least once."""

from relay.runner import Relay

__all__ = ["Relay"]
