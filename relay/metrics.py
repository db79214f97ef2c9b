"""Prometheus metrics of a relay: a :class:`~relay.observers.RelayObserver`, and gauges read from the table.

``outbox relay --metrics-port 9100`` serves them (with ``/healthz`` and ``/readyz``, see
:mod:`relay.health`); from code::

    metrics = RelayMetrics(interval=15.0)
    relay = Relay(engine, registry, observers=[metrics])

Three sources, all named ``outbox_*`` (docs/operations.md has the full table):

- **events**, from the observer hooks: messages delivered, failed, dead (or parked) and released per
  topic, fenced marks, messages taken back from an expired lease (exact: the claim reports the rows whose
  status was still ``inflight``), the delivery latency (the message's ``created_at``, i.e. the
  ``outbox.add`` call, to the recorded outcome), claim batch sizes and claim query durations;
- **the table**, by :func:`read_backlog`: ONE grouped query every ``interval`` seconds (default 15) on
  the ``(status, topic)`` index, never per message: waiting (pending or failed) messages and the age of
  the oldest due one per topic, in-flight, dead (dead + parked), and keys stopped at a failed or parked
  message. Every relay runs it, so take ``max`` across relays in queries and alerts;
- **the relay itself**, read at each scrape: its in-flight deliveries, seconds since its claim loop last
  made progress, its stuck handler threads (and whether it stopped claiming for them), and the latest
  findings of its maintenance thread (:mod:`relay.maintenance`).

Each :class:`RelayMetrics` has a registry of its own (:attr:`RelayMetrics.registry`), so several relays
in one process (tests) never collide; it also holds the usual process and Python collectors.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from outbox import _defaults as defaults
from outbox._clock import utcnow
from outbox._runtime.ops_server import metrics_registry
from outbox._schema import OutboxTables, Status, status_in
from relay._claim import ClaimedRow
from relay._outcomes import RecordedOutcome
from relay.observers import RelayObserver
from relay.publishers import describe_error

if TYPE_CHECKING:
    from relay._runner import Relay

log = logging.getLogger("outbox.metrics")

#: seconds from ``outbox.add`` to the recorded outcome: milliseconds normally, hours in an outage
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
CLAIM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

_WAITING = (Status.PENDING.value, Status.FAILED.value)
_HOLDING = (Status.FAILED.value, Status.PARKED.value)
_DEAD = (Status.DEAD.value, Status.PARKED.value)
_UNFINISHED = (*_WAITING, Status.INFLIGHT.value, *_DEAD)


# --- the gauges read from the table -------------------------------------------------------------------


@dataclass(frozen=True)
class Backlog:
    """One answer of :func:`read_backlog`: what the table holds that is not delivered, per topic."""

    checked_at: dt.datetime
    #: pending or failed (retry scheduled), due or not
    waiting: dict[str, int] = field(default_factory=dict)
    #: seconds since the oldest waiting message that is due became due (its commit, or the end of its
    #: delay or retry wait); topics with nothing due are absent
    oldest_waiting_age: dict[str, float] = field(default_factory=dict)
    inflight: dict[str, int] = field(default_factory=dict)
    #: dead and parked
    dead: dict[str, int] = field(default_factory=dict)
    #: keys stopped at a failed or parked message (by the topic of that message): their later messages wait
    held_keys: dict[str, int] = field(default_factory=dict)


def backlog_query(tables: OutboxTables) -> sa.Select[Any]:
    """The one grouped query behind :class:`Backlog` (bind ``now``): unfinished rows by topic and status.

    It reads only rows that are not delivered, through the ``(status, topic)`` index; its cost grows
    with the backlog and the dead messages kept, not with the delivered history.
    """
    t = tables.messages
    now = sa.bindparam("now", type_=t.c.due_at.type)
    due_waiting = sa.and_(status_in(t.c.status, map(Status, _WAITING)), t.c.due_at <= now)
    return (
        sa.select(
            t.c.topic,
            t.c.status,
            sa.func.count().label("n"),
            sa.func.min(sa.case((due_waiting, t.c.due_at))).label("oldest_due"),
            sa.func.count(
                sa.distinct(sa.case((status_in(t.c.status, map(Status, _HOLDING)), t.c.msg_key)))
            ).label("keys"),
        )
        .where(status_in(t.c.status, map(Status, _UNFINISHED)))
        .group_by(t.c.topic, t.c.status)
    )


def read_backlog(conn: sa.Connection, tables: OutboxTables, *, now: dt.datetime | None = None) -> Backlog:
    """Run :func:`backlog_query` and fold its rows into a :class:`Backlog`."""
    now = now or utcnow()
    backlog = Backlog(checked_at=now)
    for row in conn.execute(backlog_query(tables), {"now": now}):
        topic, status, count = str(row.topic), str(row.status), int(row.n)
        if status in _WAITING:
            backlog.waiting[topic] = backlog.waiting.get(topic, 0) + count
            if row.oldest_due is not None:
                age = max(0.0, (now - row.oldest_due).total_seconds())
                backlog.oldest_waiting_age[topic] = max(age, backlog.oldest_waiting_age.get(topic, 0.0))
        elif status == Status.INFLIGHT.value:
            backlog.inflight[topic] = count
        else:
            backlog.dead[topic] = backlog.dead.get(topic, 0) + count
        if status in _HOLDING and row.keys:
            backlog.held_keys[topic] = backlog.held_keys.get(topic, 0) + int(row.keys)
    return backlog


# --- the observer ----------------------------------------------------------------------------------------


class RelayMetrics(RelayObserver):
    """The relay's Prometheus metrics (see the module docstring); pass it in ``Relay(observers=[...])``.

    ``interval``: seconds between two reads of the table's gauges (:meth:`refresh`), on a thread of its
    own that runs while the relay does.
    """

    def __init__(
        self,
        *,
        interval: float = defaults.METRICS_INTERVAL,
        registry: CollectorRegistry | None = None,
        process: bool = True,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
        self.interval = interval
        self.registry = metrics_registry(registry, process=process)
        r = self.registry
        self.delivered = Counter(
            "outbox_messages_delivered",
            "Messages delivered (handled, or acknowledged by the broker).",
            ["topic"],
            registry=r,
        )
        self.failed = Counter(
            "outbox_messages_failed", "Failed attempts with a retry scheduled.", ["topic"], registry=r
        )
        self.dead = Counter(
            "outbox_messages_dead",
            "Messages that became dead or parked (retries exhausted or permanent).",
            ["topic"],
            registry=r,
        )
        self.released = Counter(
            "outbox_messages_released",
            "Messages given back unhandled, attempt not counted (stop, database or broker outage).",
            ["topic"],
            registry=r,
        )
        self.reclaimed = Counter(
            "outbox_messages_reclaimed",
            "Messages claimed again after the lease of the relay holding them expired.",
            registry=r,
        )
        self.fenced = Counter(
            "outbox_fenced_marks",
            "Delivered marks refused because another relay took the lease over.",
            registry=r,
        )
        self.latency = Histogram(
            "outbox_delivery_latency_seconds",
            "Seconds from outbox.add (the message's created_at) to its delivered mark.",
            ["topic"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "outbox_claim_batch_size", "Messages per claim that found any.", buckets=BATCH_BUCKETS, registry=r
        )
        self.claim_duration = Histogram(
            "outbox_claim_duration_seconds",
            "Seconds per claim query (including those that found nothing).",
            buckets=CLAIM_BUCKETS,
            registry=r,
        )
        self.backlog: Backlog | None = None
        self.backlog_errors = 0
        self._relay: Relay | None = None
        self._topics: set[str] = set()  # every topic seen: its gauges stay, at 0 once drained
        self._topics_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self.registry.register(_StateCollector(self))

    # -- hooks --------------------------------------------------------------------------------------------

    def on_start(self, relay: Relay) -> None:
        self._relay = relay
        self._stop.clear()
        self._thread = threading.Thread(target=self._refresh_loop, name="outbox-metrics", daemon=True)
        self._thread.start()

    def on_stop(self, relay: Relay) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def on_claimed(self, rows: Sequence[ClaimedRow], seconds: float) -> None:
        self.claim_duration.observe(seconds)
        if rows:
            self.batch_size.observe(len(rows))
            reclaimed = sum(1 for row in rows if row.reclaimed)
            if reclaimed:
                self.reclaimed.inc(reclaimed)

    def on_outcomes(self, outcomes: Sequence[RecordedOutcome]) -> None:
        now = utcnow()
        with self._topics_lock:
            self._topics.update(item.delivery.message.topic for item in outcomes)
        for item in outcomes:
            topic = item.delivery.message.topic
            if item.result == "delivered":
                self.delivered.labels(topic).inc()
                latency = (now - item.delivery.message.created_at).total_seconds()
                self.latency.labels(topic).observe(max(latency, 0.0))
            elif item.result == "failed":
                self.failed.labels(topic).inc()
            elif item.result == "released":
                self.released.labels(topic).inc()
            else:
                self.dead.labels(topic).inc()

    def on_fenced(self, count: int) -> None:
        self.fenced.inc(count)

    # -- the table's gauges --------------------------------------------------------------------------------

    def refresh(self) -> Backlog:
        """Read the table's gauges now (the thread does it every ``interval`` seconds)."""
        relay = self._relay
        if relay is None:
            raise RuntimeError("the relay has not started")
        with relay.engine.connect() as conn:
            backlog = read_backlog(conn, relay.tables)
        with self._topics_lock:
            self._topics.update(backlog.waiting, backlog.inflight, backlog.dead)
        self.backlog = backlog
        return backlog

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
                if self._failing:
                    log.info("outbox gauges read again")
                self._failing = False
            except Exception as exc:
                self.backlog_errors += 1
                if not self._failing:  # once per failure streak, not every interval
                    log.warning(
                        "could not read the outbox gauges (retrying every %gs): %s",
                        self.interval,
                        describe_error(exc),
                    )
                self._failing = True
            self._stop.wait(self.interval)


class _StateCollector(Collector):
    """Metrics read at each scrape: the latest backlog, the relay's own state, its maintenance findings."""

    def __init__(self, metrics: RelayMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # names vary with what is known (maintenance may be off): nothing to check up front

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        backlog = m.backlog
        if backlog is not None:
            with m._topics_lock:
                topics = sorted(m._topics)
            for name, doc, values in (
                (
                    "outbox_pending_messages",
                    "Messages waiting: pending, or failed with a retry scheduled.",
                    backlog.waiting,
                ),
                (
                    "outbox_oldest_pending_age_seconds",
                    "Seconds the oldest due waiting message has been due (0 when none is).",
                    backlog.oldest_waiting_age,
                ),
                (
                    "outbox_inflight_messages",
                    "Messages claimed under a lease, being delivered.",
                    backlog.inflight,
                ),
                (
                    "outbox_dead_messages",
                    "Dead and parked messages (kept until replayed or purged).",
                    backlog.dead,
                ),
                (
                    "outbox_held_keys",
                    "Keys stopped at a failed or parked message (by its topic).",
                    backlog.held_keys,
                ),
            ):
                family = GaugeMetricFamily(name, doc, labels=["topic"])
                for topic in topics:
                    family.add_metric([topic], float(values.get(topic, 0)))
                yield family
            yield GaugeMetricFamily(
                "outbox_gauges_read_timestamp_seconds",
                "When the table's gauges were last read (Unix time).",
                value=backlog.checked_at.replace(tzinfo=dt.UTC).timestamp(),
            )
        yield CounterMetricFamily(
            "outbox_gauge_read_errors", "Failed reads of the table's gauges.", value=m.backlog_errors
        )
        relay = m._relay
        if relay is None:
            return
        yield GaugeMetricFamily(
            "outbox_relay_in_flight",
            "This relay's deliveries claimed and not yet recorded.",
            value=relay.in_flight(),
        )
        yield GaugeMetricFamily(
            "outbox_relay_seconds_since_progress",
            "Seconds since this relay's claim loop last claimed (even nothing) or recorded outcomes.",
            value=max(0.0, time.monotonic() - relay.last_progress),
        )
        yield GaugeMetricFamily(
            "outbox_relay_stuck_handlers",
            "Handler threads of this relay handed off after a timeout they did not stop at, still running.",
            value=relay.handlers.stuck_count(),
        )
        yield GaugeMetricFamily(
            "outbox_relay_claiming_stopped",
            "1 when this relay stopped claiming: more stuck handler threads than max_stuck_handlers.",
            value=0.0 if relay.handlers.stuck_problem() is None else 1.0,
        )
        maintenance = getattr(relay, "maintenance", None)
        findings = getattr(maintenance, "findings", None)
        if findings is not None:
            for name, doc, value in (
                (
                    "outbox_expired_leases",
                    "Leases expired past their grace and not yet taken back.",
                    findings.expired_leases,
                ),
                (
                    "outbox_stuck_messages",
                    "Messages waiting longer than stuck_after past their due time.",
                    findings.stuck_messages,
                ),
                (
                    "outbox_stuck_keys",
                    "Keys held back longer than stuck_after by an earlier message.",
                    findings.held_key_count,
                ),
            ):
                yield GaugeMetricFamily(name, doc, value=float(value))
        if maintenance is not None:
            yield CounterMetricFamily(
                "outbox_retention_deleted",
                "Delivered messages this relay's retention deleted.",
                value=float(maintenance.deleted_total),
            )
