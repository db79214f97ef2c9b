"""Prometheus metrics and readiness checks for ``outbox consume`` (the hooks its runner calls).

The consumer runner (:mod:`consumers._kafka`) calls :class:`ConsumerMetrics` where a record is finished,
an attempt fails or the database is away; ``outbox consume --metrics-port`` serves them with the
checks of :func:`consumer_checks` through :class:`outbox._runtime.ops_server.OpsServer`, exactly like
the relay.

- ``outbox_consumer_records_total{group, topic, result}``: records finished, ``result`` one of
  ``handled``, ``duplicate`` (already in the inbox) and ``dead_lettered``;
- ``outbox_consumer_failed_attempts_total{group, topic}``: handler attempts that failed;
- ``outbox_consumer_handler_seconds{group, topic}``: histogram of seconds per handler attempt;
- ``outbox_consumer_latency_seconds{group, topic}``: histogram, ``outbox.add`` (``created_at``) to handled;
- ``outbox_consumer_outages_total{group}``: waits for an unreachable database.

``topic`` is the record's Kafka topic (the outbox topic too, unless the relay routed it elsewhere).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Histogram

from outbox._clock import utcnow
from outbox._message import Message
from outbox._runtime.ops_server import Check, DatabaseCheck, metrics_registry

#: how a record was finished
RecordResult = Literal["handled", "duplicate", "dead_lettered"]

HANDLER_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class ConsumerMetrics:
    """The consumer's metrics for consumer group ``group``, in a registry of their own."""

    def __init__(
        self, group: str, *, registry: CollectorRegistry | None = None, process: bool = True
    ) -> None:
        self.group = group
        self.registry = metrics_registry(registry, process=process)
        r = self.registry
        self.records = Counter(
            "outbox_consumer_records",
            "Records finished: handled, duplicate (already in the inbox) or dead_lettered.",
            ["group", "topic", "result"],
            registry=r,
        )
        self.failed_attempts = Counter(
            "outbox_consumer_failed_attempts", "Handler attempts that failed.", ["group", "topic"], registry=r
        )
        self.handler_seconds = Histogram(
            "outbox_consumer_handler_seconds",
            "Seconds per handler attempt.",
            ["group", "topic"],
            buckets=HANDLER_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "outbox_consumer_latency_seconds",
            "Seconds from outbox.add (the message's created_at) to the record handled.",
            ["group", "topic"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.outages = Counter(
            "outbox_consumer_outages", "Waits for an unreachable database.", ["group"], registry=r
        )

    def finished(self, topic: str, result: RecordResult, message: Message | None = None) -> None:
        """A record is done; with its ``message`` (when it could be read), a handled one's latency."""
        self.records.labels(self.group, topic, result).inc()
        if result == "handled" and message is not None:
            latency = (utcnow() - message.created_at).total_seconds()
            self.latency.labels(self.group, topic).observe(max(latency, 0.0))

    def attempt(self, topic: str, seconds: float, *, failed: bool) -> None:
        """One handler attempt took ``seconds``."""
        self.handler_seconds.labels(self.group, topic).observe(seconds)
        if failed:
            self.failed_attempts.labels(self.group, topic).inc()

    def outage(self) -> None:
        self.outages.labels(self.group).inc()


def consumer_checks(
    runner: Any, *, database_timeout: float = 2.0, progress_within: float = 60.0
) -> Callable[[], Mapping[str, Check]]:
    """The readiness checks of a consumer runner, for :class:`~outbox._runtime.ops_server.OpsServer`.

    ``consumer``: the runner's loop runs (``runner.running``); ``database``: its engine answers, when it
    has one; ``broker``: ``runner.broker_problem()``, when the runner has that method; ``progress``: the
    loop polled within ``progress_within`` seconds, when the runner keeps ``last_progress`` (monotonic).
    """
    database = DatabaseCheck(runner.engine, timeout=database_timeout) if runner.engine is not None else None

    def running() -> str | None:
        return None if runner.running else "the consumer is not running (not started, stopping, or failed)"

    def progress() -> str | None:
        last = getattr(runner, "last_progress", None)
        if last is None:
            return None
        idle = time.monotonic() - last
        return None if idle <= progress_within else f"the consumer loop made no progress for {idle:.0f}s"

    def checks() -> Mapping[str, Check]:
        found: dict[str, Check] = {"consumer": running}
        if database is not None:
            found["database"] = database
        broker = getattr(runner, "broker_problem", None)
        if broker is not None:
            found["broker"] = broker
        found["progress"] = progress
        return found

    return checks
