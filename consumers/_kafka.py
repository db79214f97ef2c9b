"""``outbox consume``: the registered handlers run on records read from Kafka, idempotently.

:class:`KafkaConsumerRunner` reads the topics of a :class:`~consumers._registry.Registry` in a consumer
group (kafka-python, auto-commit off), turns each record into the :class:`outbox.Message` the relay
would have given the handler (:mod:`consumers._records`), runs the handler under its topic's policy,
and commits the Kafka offsets of the records it finished. This module is the Kafka side (polling in
rounds, the group, stopping); :mod:`consumers._partitions` finishes a round's partitions in parallel
(``workers``), :mod:`consumers._batches` a partition's records many to a transaction, and
:mod:`consumers._processing` a record alone (attempts, inbox, dead letters); :mod:`consumers._offsets`
commits what is finished. What it promises, and the test that would catch a violation:

- **A session handler's effect happens once per consumer group.** A handler ``def h(message,
  session)`` runs in a transaction (its batch's, or its own) that holds the inbox row ``(group, message
  id)`` (:mod:`consumers._inbox`): its database work and that row commit together, and the offset is
  committed only after that commit. A consumer killed between the two reads the record again, finds
  the row and skips the handler (counted as a duplicate); two consumers racing on one message are
  serialised by the row's primary key. The function may still *run* more than once (a failed or
  timed-out attempt), but its database work commits once; what it does elsewhere (HTTP, e-mail) is at
  least once. ``tests/test_consumer.py::
  test_killed_consumer_between_commit_and_offset_commit_has_no_double_effect``
- **A handler without a session is at least once.** It runs, then its inbox row is written (in its
  batch's transaction, or one of its own), then the offset is committed; a message already in the
  inbox is skipped. A crash after the handler returned and before that row committed runs it again, as
  does a batch run again without a failing record (``consumers._batches``).
- **Nothing is skipped.** An offset is committed only past records that are done: handled, skipped as
  duplicates, or dead-lettered. A record abandoned by a stop is read again by the next consumer.
  ``tests/test_consumer.py::test_sigterm_commits_offsets_and_exits_0``
- **Order per partition, and a poison record holds back only its partition, for a while.** Records of
  a partition start in offset order, on one worker at a time. A failing handler is retried in place with
  its topic's backoff, up to ``max_attempts``; then the record goes to the dead letters
  (:mod:`consumers._dead_letters`, with its error) and the partition moves on. A record that cannot be
  read (invalid JSON) or has no handler is dead-lettered at once.
  ``tests/test_consumer.py::test_poison_record_is_dead_lettered_then_replayed_once``
- **A database outage is never a failed attempt.** When the database is unreachable during a session
  handler's transaction (or the inbox or dead-letter writes), the consumer waits with backoff (up to 5
  s) and tries the same record again; an outage never dead-letters a record.
- **Graceful stop.** :meth:`KafkaConsumerRunner.stop` (SIGTERM/SIGINT to ``outbox consume``): no new
  batch or record is started; the current ones finish (a retry or outage wait is cut short, leaving
  that record for the next consumer), the offsets of finished records are committed, and the consumer
  leaves its group. If the current handler runs past ``stop_timeout``, the runner gives up waiting
  without committing it (at least once; a session handler's effect stays once).

Observability: each handler attempt runs in a CONSUMER span, child of the record's ``traceparent``
(:func:`outbox._tracing.process_span`); with ``metrics`` (:class:`consumers._metrics.ConsumerMetrics`)
the runner counts attempts, finished records and outage waits, and :func:`consumers._metrics.
consumer_checks` reads its readiness from :attr:`KafkaConsumerRunner.running`, ``last_progress`` and
:meth:`KafkaConsumerRunner.broker_problem`.

Topics: the consumer subscribes to the registry's exact topic names; a registry with patterns
(``orders.*``) subscribes with one regular expression instead, and then finds Kafka topics created later
at its next metadata refresh (``metadata_max_age_ms``, five minutes by default). A record is routed by
its message topic (the ``outbox-topic`` header), else by its Kafka topic.

Limits: retries in place count against kafka-python's ``max_poll_interval_ms`` (``ConsumerSettings``,
default five minutes): a record retried for longer makes the consumer leave its group; its finished
records are then read again by the next member and skipped by the inbox. With ``engine=None`` there is
no inbox and no dead-letter table: session handlers are refused, every handler is at least once, and a
record that exhausts its attempts is logged and skipped.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from consumers._batches import BatchProcessor, check_batching
from consumers._offsets import Offsets, rebalance_listener
from consumers._partitions import DEFAULT_WORKERS, PartitionPool, check_workers
from consumers._processing import Counters, RecordProcessor, Stopping
from consumers._registry import Registry
from consumers._settings import ConsumerSettings, subscription
from consumers.attempt import describe_error
from outbox._dialects import dialect_for, is_outage
from outbox._errors import BrokerError, ConfigError, DatabaseUnavailable, first_line
from outbox._policy import RetryPolicy, TopicPolicy
from outbox._runtime.broker_health import BrokerHealth
from outbox._schema import DEFAULT_TABLE, check_version, tables_for
from outbox.redaction import mask_url

if TYPE_CHECKING:
    from consumers._metrics import ConsumerMetrics

log = logging.getLogger("outbox.consumer")

_COUNTERS = (
    "received",
    "handled",
    "duplicates",
    "dead_lettered",
    "failed_attempts",
    "outages",
    "commits",
    "commit_failures",
)


class KafkaConsumerRunner:
    """Runs ``registry``'s handlers on the records of its topics, for one consumer group.

    ``engine`` holds the inbox and the dead letters (schema version 2, ``outbox db upgrade``), and is
    the database session handlers work in; ``None`` runs without them (see the module docstring).
    ``retry`` is the default policy of topics whose handler does not set its own. ``stop_timeout``:
    seconds :meth:`stop` waits for the current handler. ``metrics``: counted into, when given (``outbox
    consume --metrics-port`` serves them). Use as a context manager, or :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        engine: sa.Engine | None,
        registry: Registry,
        settings: ConsumerSettings,
        *,
        table: str = DEFAULT_TABLE,
        retry: RetryPolicy | None = None,
        stop_timeout: float = 30.0,
        consumer_factory: Callable[..., Any] | None = None,
        metrics: ConsumerMetrics | None = None,
        workers: int | None = None,
        batch_records: int = 500,
        batch_ms: int = 100,
        batch_isolation: str = "redo",
    ) -> None:
        if stop_timeout < 0:
            raise ConfigError(f"stop_timeout must be zero or more seconds, got {stop_timeout!r}")
        check_batching(batch_records=batch_records, batch_ms=batch_ms, isolation=batch_isolation)
        if workers is not None:
            check_workers(workers)
        self.engine = engine
        self.registry = registry
        self.settings = settings
        self.group = settings.group
        self.tables = tables_for(table)
        self.default_policy = TopicPolicy(retry=retry or RetryPolicy())
        self.stop_timeout = stop_timeout
        self.metrics = metrics
        #: monotonic time of the loop's last poll or finished record (``None`` before start), for /readyz
        self.last_progress: float | None = None
        self._broker = BrokerHealth(settings)
        self._factory = consumer_factory or _kafka_python_consumer
        self._consumer: Any = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self.batch_ms = batch_ms
        self.batch_records = batch_records
        self.counters = Counters(_COUNTERS)
        self.offsets = Offsets(self.counters, self._broker, timeout_ms=settings.request_timeout_ms)
        self.processor = RecordProcessor(
            engine,
            registry,
            group=self.group,
            tables=self.tables,
            default_policy=self.default_policy,
            stopping=self._stopping,
            counters=self.counters,
            before_wait=self._commit,
            metrics=metrics,
        )
        self.batches = (
            BatchProcessor(self.processor, batch_records=batch_records, isolation=batch_isolation)
            if engine is not None
            else None
        )
        single_writer = engine is not None and dialect_for(engine).single_writer
        if workers is not None and workers > 1 and single_writer:
            log.warning("this database takes one writer at a time: one partition worker, not %d", workers)
        #: partitions finished at once (one on a single-writer database such as SQLite)
        self.workers = 1 if single_writer else DEFAULT_WORKERS if workers is None else workers
        self._pool = PartitionPool(self.workers, self._finish_partition)
        #: what ended the consumer loop, if it was not a stop (a Kafka error, or a bug)
        self.error: BaseException | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> KafkaConsumerRunner:
        """Check the schema, join the group (subscribe) and start the consumer thread."""
        if self._thread is not None:
            raise RuntimeError("this consumer runner was already started")
        if len(self.registry) == 0:
            raise ConfigError("no handlers: the registry has no topic to consume")
        if self.engine is None:
            needs_db = [
                h.name for t in self.registry.topics() if (h := self.registry.route(t)) and h.takes_session
            ]
            if needs_db:
                raise ConfigError(f"handlers that take a session need a database: {', '.join(needs_db)}")
        else:
            self._check_schema(self.engine)
        try:
            self._consumer = self._factory(**self.settings.consumer_config())
        except Exception as exc:
            raise BrokerError(
                f"cannot reach Kafka at {self.settings.bootstrap_servers}: {describe_error(exc)}"
            ) from None
        topics, pattern = subscription(self.registry)
        self.offsets.consumer = self._consumer
        listener = rebalance_listener(self._partitions_revoked)
        if pattern is None:
            self._consumer.subscribe(topics=topics, listener=listener)
        else:
            self._consumer.subscribe(pattern=pattern, listener=listener)
        log.info("consuming %s as group %r", ", ".join(self.registry.topics()), self.group)
        self.last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="outbox-consumer", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> bool:
        """Stop after the current record; True when the consumer closed within the timeout.

        ``timeout`` defaults to ``stop_timeout``. On False the current handler is still running: its
        record's offset is not committed, so it is read again by the next consumer of the group.
        """
        self._stopping.set()
        if self._thread is None:
            return True
        self._thread.join(self.stop_timeout if timeout is None else timeout)
        if self._thread.is_alive():
            log.warning(
                "the current handler did not finish within %gs: leaving without committing its record, "
                "which the group will read again",
                self.stop_timeout if timeout is None else timeout,
            )
            return False
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the consumer loop ended (stopped, or failed: see :attr:`error`)."""
        return self._stopped.wait(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stopped.is_set()

    def broker_problem(self, timeout: float = 1.0) -> str | None:
        """Why the broker looks unreachable now (``None``: it looks fine), for ``/readyz``.

        Unreachable when, within the last 30 s, a poll or an offset commit failed with the broker away
        or busy and nothing was fetched or committed since; with nothing that recent (an idle group),
        when no bootstrap server completes a handshake (TLS, SASL, a metadata request) with these
        settings (:class:`outbox._runtime.broker_health.BrokerHealth`).
        """
        return self._broker.problem(timeout)

    def __enter__(self) -> KafkaConsumerRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, int]:
        """Counters since start: records ``received``, ``handled``, skipped as ``duplicates``,
        ``dead_lettered``; ``failed_attempts``; ``outages`` waited out (tries, not time); offset
        ``commits`` and ``commit_failures``."""
        return dict(self.counters)

    def stats_line(self) -> str:
        return " ".join(f"{name}={value}" for name, value in self.stats().items())

    # -- the consumer thread ------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                round_ = self._gather()
                self.last_progress = time.monotonic()
                with contextlib.suppress(Stopping):  # a stop leaves the rest unfinished: not committed
                    self._pool.run_round(round_)
                self._commit()
        except BaseException as exc:
            self.error = exc
            log.error("the consumer stopped on an error: %s", describe_error(exc))
        finally:
            self._close()

    def _gather(self) -> dict[Any, list[Any]]:
        """The records of the next round, per partition, in offset order: at most ``batch_records`` for
        each worker, so that a round (and the time between two polls, when a rebalance can start)
        lasts about one batch.

        One poll when traffic is light (what came is finished at once); while polls come back full, more
        are taken, for at most ``batch_ms`` (a full poll often holds one partition's records only:
        gathering more gives the workers each a partition).
        """
        gathered: dict[Any, list[Any]] = {}
        room = self.batch_records * self.workers
        first: float | None = None
        while not self._stopping.is_set():
            wait_ms = 500 if first is None else self.batch_ms - int((time.monotonic() - first) * 1000)
            asked = min(room, self.settings.max_poll_records)
            polled = self._poll(max(0, wait_ms), asked)
            for partition, records in polled.items():
                gathered.setdefault(partition, []).extend(records)
            self.offsets.forget_revoked(gathered)
            if not gathered:
                return gathered
            first = time.monotonic() if first is None else first
            got = sum(map(len, polled.values()))
            room -= got
            if got < asked or room <= 0 or (time.monotonic() - first) * 1000 >= self.batch_ms:
                return gathered
        return gathered

    def _partitions_revoked(self, revoked: set[Any]) -> None:
        """The rebalance listener's: let the round in flight finish, then hand the offsets over.

        Bounded by half the session timeout: the listener may run on kafka-python's IO thread, which
        also sends the heartbeats.
        """
        if not self._pool.drain(min(self.stop_timeout, self.settings.session_timeout_ms / 2000)):
            log.warning("a rebalance came while handlers still run: their records will be read again")
        self.offsets.revoked(revoked)

    def _finish_partition(self, partition: Any, records: Sequence[Any]) -> None:
        """A partition worker's part of a round: ``records`` (one partition's) finished in order."""

        def finished(record: Any) -> None:
            self.offsets.finished(partition, record)
            self.last_progress = time.monotonic()

        if self.batches is not None:
            self.batches.process(records, finished)
            return
        for record in records:
            if self._stopping.is_set():
                raise Stopping()
            self.processor.process(record)
            finished(record)

    def _poll(self, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]:
        from kafka.errors import KafkaError

        try:
            batch = dict(self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records))
        except KafkaError as exc:
            if not getattr(exc, "retriable", False) and type(exc).__name__ not in ("NoBrokersAvailable",):
                raise BrokerError(f"Kafka refused the consumer: {describe_error(exc)}") from exc
            self._broker.failed(f"Kafka poll failed: {describe_error(exc)}")
            log.warning("Kafka poll failed (%s); retrying", describe_error(exc))
            self._stopping.wait(1.0)
            return {}
        if batch:
            self._broker.answered()
        return batch

    def _commit(self) -> None:
        self.offsets.commit()

    def _close(self) -> None:
        try:
            self._commit()  # only finished records are in it, whatever ended the loop
            self._pool.close()
            if self._consumer is not None:
                self._consumer.close(autocommit=False, timeout_ms=self.settings.request_timeout_ms)
        except Exception as exc:
            log.warning("closing the Kafka consumer failed: %s", describe_error(exc))
        finally:
            log.info("consumer stopped: %s", self.stats_line())
            self._stopped.set()

    def _check_schema(self, engine: sa.Engine) -> None:
        try:
            with engine.connect() as conn:
                check_version(conn, self.tables.name)
        except sa.exc.DBAPIError as exc:
            url = mask_url(engine.url)
            if is_outage(exc):
                raise DatabaseUnavailable(
                    f"cannot reach the database at {url}: {first_line(exc.orig or exc)}"
                ) from None
            raise ConfigError(f"database error at {url}: {first_line(exc.orig or exc)}") from None


def _kafka_python_consumer(**config: Any) -> Any:
    from kafka import KafkaConsumer

    # bootstrap_timeout_ms is recent (kafka-python 3); older releases refuse keys they do not know
    known = getattr(KafkaConsumer, "DEFAULT_CONFIG", config)
    return KafkaConsumer(**{k: v for k, v in config.items() if k in known})


__all__ = ["ConsumerSettings", "KafkaConsumerRunner", "subscription"]
