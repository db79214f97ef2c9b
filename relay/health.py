"""Is this relay ready? The checks behind ``/readyz``, and the server that ``outbox relay`` runs.

A relay is ready when all of these hold (``/readyz`` answers 503 naming each one that does not):

- ``relay``: it has started and is not stopping;
- ``database``: the outbox database answers ``SELECT 1`` within ``database_timeout`` seconds;
- ``broker`` (only when a publisher talks to a broker, i.e. Kafka is configured): the publisher's
  ``broker_problem()`` finds nothing wrong (its last answer from the broker was not an outage, or,
  with no recent answer, a bootstrap server completes a handshake with the configured security
  settings: a metadata request over TLS and SASL as configured, not only a TCP connection);
- ``handlers``: no more handler threads are stuck past their timeout than ``max_stuck_handlers``
  (past that the relay stops claiming: restart it; see ``relay.publishers._handlers``);
- ``progress``: the claim loop claimed (even nothing) or recorded outcomes within the last
  ``max(3 x poll_interval, 30 s)``. A relay whose handlers all run longer than that, with no capacity
  left to claim, reads as not progressing too: raise ``progress_within`` for such workloads.

``/healthz`` (liveness) says that the relay can work: it answers ``503`` once a thread the relay cannot
work without (fetcher, dispatcher, completer) has died (``Relay.failure``), while the relay stops and
``outbox relay`` exits with code 8.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from outbox import _defaults as defaults
from outbox._runtime.ops_server import Check, DatabaseCheck, OpsServer
from relay.publishers import BrokerPublisher

if TYPE_CHECKING:
    from relay._runner import Relay
    from relay.metrics import RelayMetrics


class RelayReadiness:
    """The readiness checks of one relay (see the module docstring); call it for the name -> check map."""

    def __init__(
        self, relay: Relay, *, database_timeout: float = 2.0, progress_within: float | None = None
    ) -> None:
        self.relay = relay
        self.progress_within = progress_within or max(3 * relay.poll_interval, 30.0)
        self.database = DatabaseCheck(relay.engine, timeout=database_timeout)

    def __call__(self) -> Mapping[str, Check]:
        checks: dict[str, Check] = {"relay": self.running, "database": self.database}
        for publisher in self.relay.publishers:
            if isinstance(publisher, BrokerPublisher):
                checks["broker"] = publisher.broker_problem
        checks["handlers"] = self.relay.handlers.stuck_problem
        checks["progress"] = self.progress
        return checks

    def running(self) -> str | None:
        if self.relay.failure is not None:
            return self.relay.failure
        return None if self.relay.running else "the relay is not running (not started yet, or stopping)"

    def progress(self) -> str | None:
        idle = time.monotonic() - self.relay.last_progress
        if idle > self.progress_within:
            return f"the claim loop made no progress for {idle:.0f}s (limit {self.progress_within:g}s)"
        return None


def serve(
    relay: Relay, metrics: RelayMetrics, *, host: str = defaults.METRICS_HOST, port: int = 0
) -> OpsServer:
    """Start serving ``/metrics`` (of ``metrics``), ``/healthz`` and ``/readyz`` (of ``relay``)."""
    return OpsServer(
        metrics.registry, RelayReadiness(relay), host=host, port=port, liveness=lambda: relay.failure
    ).start()
