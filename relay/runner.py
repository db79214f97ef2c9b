"""The relay: claims committed messages in batches and delivers them, at least once.

Threads (dramatiq's shape: fetching apart from running):

- the **fetcher** claims batches while there is capacity (``max_in_flight``) and passes them to the
  **dispatcher** (:mod:`relay.dispatch`), which turns rows into deliveries and hands them to the
  publisher that routes them (so the next claim's round trip overlaps with that work); the fetcher
  sleeps on a wake-up event that a commit in this process, a PostgreSQL NOTIFY or the poll interval
  sets. After a wake-up or a claimed row it stays awake for ``AWAKE_SECONDS`` (50 ms), looking again
  after ``AWAKE_POLL`` (2 ms) when a claim comes back short, twice as late after each empty look:
  writers send at most one NOTIFY per ``outbox.wakeup.NOTIFY_GAP`` (20 ms, shorter than the awake
  window), so a message whose NOTIFY was merged into an earlier one is found by that looking, and the
  merged NOTIFY at the gap's end keeps the relay awake while commits continue;
- **publishers** deliver (in-process handlers on a bounded worker pool; Kafka in ``publishers.kafka``)
  and report each outcome once;
- the **completer** (:mod:`relay.completer`) writes outcomes in bulk (one fenced UPDATE per lease for
  delivered rows), applies retry policies (failed / dead / parked), renews live leases, and enforces
  handler timeouts;
- the **listener** (PostgreSQL only, :mod:`relay.listener`) holds a LISTEN connection and sets the
  wake-up event;
- the **maintenance** thread (:mod:`relay.maintenance`) applies retention (one relay at a time) and
  reports stuck messages, expired leases and held-back keys.

Claim size (the fetcher's; ``batch_size`` up to ``max_batch_size``): each claim and each mark
statement has a fixed cost, so a deep backlog drains faster in larger claims (PostgreSQL here, one
relay, no-op handlers: 21,000 msg/s claiming 200 at a time, 26,000 at 1,000, 28,000 at 2,000); but a
relay whose handlers are slow would only hoard, in a large claim, messages that other relays could be
running. So the claim size adapts, and these hold:

- a claim asks for at most the claim size and at most the room left in the window (``max_in_flight``,
  by default twice the claim size, so the window follows it);
- the size doubles (up to ``max_batch_size``) only when this claim and the one before came back full
  (a backlog) and, when this one returned, at most half a claim's worth of older rows was still with
  the publishers (unfinished: the claims are what the relay waits on, not the handlers);
- it halves (down to ``batch_size``) when a claim returns with a whole claim's worth of older rows still
  unfinished (the handlers are behind), and goes back to ``batch_size`` when a claim comes back short
  (no backlog), so a relay with slow handlers claims ``batch_size`` at a time and holds at most its
  window, and an idle or steady relay claims exactly as with a fixed ``batch_size``.
-- ``tests/test_handlers.py::test_claims_grow_only_while_the_handlers_keep_up``

Database outages are retried forever with backoff (:mod:`relay.outages`) and never recorded against a
message: an outage around a handler releases the message (attempt not counted), and marks wait in
memory until the database is back (if it stays away past the lease, the message is simply delivered
again). On SQLite one relay runs at a time (:mod:`relay.single_relay`).

Graceful stop: stop claiming; release what has not started; let running handlers finish within
``stop_timeout``; write every outcome; leave the leases of handlers still running to expire (never hand
back a row that is still executing).
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import os
import queue
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm

from consumers.registry import Registry, default_registry
from outbox.dialects import Dialect, create_engine, dialect_for, is_outage
from outbox.errors import ConfigError, DatabaseUnavailable, first_line
from outbox.policy import RetryPolicy, TopicPolicy
from outbox.schema import DEFAULT_TABLE, check_version, tables_for
from outbox.wakeup import RELAY_AWAKE_SECONDS, notify_channel, register_waiter, unregister_waiter
from outbox.writer import utcnow
from relay.claim import ClaimedRow, ClaimQueries
from relay.completer import Completer, InFlight, LeaseWrites
from relay.dispatch import Dispatcher
from relay.listener import listen
from relay.maintenance import DEFAULT_INTERVAL, DEFAULT_RETENTION, DEFAULT_STUCK_AFTER, Maintenance
from relay.observers import Observers, RelayObserver
from relay.outages import GaveUp, OutageRetry
from relay.publishers import Delivery
from relay.publishers.handlers import HandlerPublisher
from relay.single_relay import SingleRelayLock

log = logging.getLogger("outbox.relay")

# After a wake-up or a claimed row, the fetcher stays awake for AWAKE_SECONDS, looking again AWAKE_POLL
# seconds after a claim that came back short (twice as late after each empty one; see
# outbox.wakeup.NOTIFY_GAP for why).
AWAKE_SECONDS = RELAY_AWAKE_SECONDS
AWAKE_POLL = 0.002
#: default max_batch_size: claims grow to this while a backlog lasts and the handlers keep up (see above)
MAX_BATCH_SIZE = 2000
#: default max_in_flight with a Kafka publisher: at 20,000 records/s and 50 ms to an acks=all answer,
#: 1,000 records are in flight; twice that leaves room for a slower broker
BROKER_IN_FLIGHT = 2000


class Relay:
    """A relay for one outbox table. Start it from code or run it with ``outbox relay``.

    ``database`` is a URL or an ``Engine``. ``registry`` holds the in-process handlers (default: the
    one ``@consumers.handler`` registers on). ``kafka`` (a ``relay.publishers.kafka.KafkaSettings``)
    publishes every topic without an in-process handler to Kafka; ``publishers`` adds other
    destinations, asked in order after the handlers. ``observers`` (``relay.observers.RelayObserver``)
    watch it: metrics, logging. Use as a context manager, or call :meth:`start` and :meth:`stop`.

    A claim asks for ``batch_size`` messages; while a backlog lasts and the handlers keep up, claims
    grow (doubling) to ``max_batch_size`` (default the larger of 2,000 and ``batch_size``; give it equal
    to ``batch_size`` for a fixed size) and shrink back when the handlers fall behind or the backlog
    ends (the module's "Claim size"). ``max_in_flight`` caps the messages claimed and not yet recorded
    (default: twice the current claim size, at least 4 per worker, 2,000 with Kafka).

    ``freeze_gc=True`` calls :func:`gc.freeze` in :meth:`start`, once the relay is set up: every object
    alive then (the interpreter's modules, SQLAlchemy's, the application's) moves to the collector's
    permanent generation, which its full passes skip. Without it, each full pass walks those few hundred
    thousand objects with the GIL held: here 60-80 ms pauses of the whole relay every 12,000 or so
    messages, 6.5 us of collection per message against 1.5 us frozen. ``outbox relay`` sets it. In an
    application that starts a relay beside its own work, leave it off unless the application is done
    building its long-lived state: a frozen object caught in a reference cycle later is never freed.
    """

    def __init__(
        self,
        database: str | sa.Engine,
        registry: Registry | None = None,
        *,
        table: str = DEFAULT_TABLE,
        batch_size: int = 200,
        max_batch_size: int | None = None,
        workers: int = 8,
        max_in_flight: int | None = None,
        lease_seconds: float = 30.0,
        poll_interval: float = 1.0,
        stop_timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        handler_timeout: float | None = None,
        strict_order_topics: Sequence[str] = (),
        kafka: Any = None,
        publishers: Sequence[Any] = (),
        observers: Sequence[RelayObserver] = (),
        name: str | None = None,
        maintenance: bool = True,
        retention: dt.timedelta | float | None = DEFAULT_RETENTION,
        stuck_after: dt.timedelta | float = DEFAULT_STUCK_AFTER,
        maintenance_interval: float = DEFAULT_INTERVAL,
        freeze_gc: bool = False,
    ) -> None:
        _check_positive(batch_size=batch_size, workers=workers, lease_seconds=lease_seconds)
        _check_positive(poll_interval=poll_interval)
        if max_in_flight is not None:
            _check_positive(max_in_flight=max_in_flight)
        if max_batch_size is not None and max_batch_size < batch_size:
            raise ConfigError(
                f"max_batch_size ({max_batch_size}) must be at least batch_size ({batch_size}); "
                "set them equal to claim a fixed batch_size"
            )
        if stop_timeout < 0:
            raise ConfigError(f"stop_timeout must be zero or more seconds, got {stop_timeout!r}")
        # An engine of our own skips the pool's pre-ping (a SELECT 1 before every claim and mark, 9-26 % of
        # the fetcher's and completer's time in profiles): a connection that died with its server fails
        # its next statement instead, SQLAlchemy then discards the pool's connections, and _db.run
        # retries on a fresh one, as it retries any outage (tests/test_db_restart.py).
        self.engine = create_engine(database, pool_pre_ping=False) if isinstance(database, str) else database
        self.dialect: Dialect = dialect_for(self.engine)
        self.tables = tables_for(table)
        self.registry = registry if registry is not None else default_registry
        self.batch_size = batch_size
        self.max_batch_size = max(batch_size, MAX_BATCH_SIZE) if max_batch_size is None else max_batch_size
        # In flight = claimed, not yet recorded. Handlers need little beyond their workers; a broker needs
        # its acknowledgement time's worth of records (acks=all: tens of ms) in flight to stay busy.
        self._max_in_flight = max_in_flight
        self._window_floor = max(workers * 4, BROKER_IN_FLIGHT if kafka is not None else 0)
        self._claim_size = batch_size  # the fetcher's: see "Claim size" above
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.stop_timeout = stop_timeout
        self.freeze_gc = freeze_gc
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        #: SQLite's one relay at a time (relay.single_relay); None on PostgreSQL and MariaDB
        self._relay_lock = (
            SingleRelayLock(self.engine, self.tables, holder=self.name, lease_seconds=lease_seconds)
            if self.dialect.single_relay
            else None
        )
        self.claims = ClaimQueries(self.tables, self.dialect)
        # Every lease write (renewal, marks, releases) is one statement, atomic on its own: on PostgreSQL
        # and MariaDB it runs in autocommit, so a relay frozen right after it holds no row lock (invariant
        # 7 of relay.claim), and it takes one round trip instead of three (BEGIN, it, COMMIT): an empty
        # PostgreSQL claim took 617 instead of 982 us here, 411 instead of 572 us of the relay's CPU.
        # SQLite keeps transactions: one relay, and its lease writes share one with the relay lock.
        self._autocommit: sa.Engine | None = (
            None if self.dialect.single_relay else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        self._last_claim_full = False  # the fetcher's: see ClaimQueries.claim_batch(look_first)
        self._sessions = orm.sessionmaker(self.engine)
        self.handlers = HandlerPublisher(
            self.registry,
            workers=workers,
            session_factory=self._session_factory,
            mark_in_session=self._mark_in_session,
        )
        extra = list(publishers)
        if kafka is not None:
            from relay.publishers.kafka import publisher_for

            extra.append(publisher_for(kafka))
        self.publishers: list[Any] = [self.handlers, *extra]
        self.observers = Observers(observers)
        self.counters: dict[str, int] = defaultdict(int)
        self.last_progress = time.monotonic()

        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._db = OutageRetry(self._stopping)  # every database operation, retried through outages
        self._fetcher_done = threading.Event()
        self._publishers_stopped = threading.Event()
        self._window = InFlight()  # claimed and not yet recorded: at most max_in_flight
        self.completer = Completer(
            claims=self.claims,
            lease_writes=LeaseWrites(self.engine, self._autocommit),
            db=self._db,
            in_flight=self._window,
            observers=self.observers,
            counters=self.counters,
            lease_seconds=lease_seconds,
            relay_lock=self._relay_lock,
            publishers=self.publishers,
            wake=self._wake,
            progressed=self._progressed,
        )
        self.dispatcher = Dispatcher(
            self.registry,
            self.publishers,
            default_policy=TopicPolicy(retry=retry or RetryPolicy(), timeout=handler_timeout),
            strict_order_topics=strict_order_topics,
            report=self.completer.report,
        )
        self._threads: list[threading.Thread] = []
        self._started = False
        self._stopped = threading.Event()
        self._stop_deadline = float("inf")
        #: retention and the stuck-message monitor (relay.maintenance); None with maintenance=False
        self.maintenance = (
            Maintenance(
                self.engine,
                self.tables,
                holder=self.name,
                retention=retention,
                stuck_after=stuck_after,
                interval=maintenance_interval,
                lease_seconds=lease_seconds,
                on_expired=self._wake.set,
            )
            if maintenance
            else None
        )

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> Relay:
        """Check the schema, take the SQLite relay lock if needed, and start the threads."""
        if self._started:
            raise RuntimeError("relay already started")
        self._check_schema()
        if self._relay_lock is not None:
            self._relay_lock.acquire()
        self._started = True
        if self.freeze_gc:
            gc.freeze()  # after the schema check: the dialect's and the pool's state are built by now
        register_waiter(self.tables.name, self._wake)
        self._spawn("outbox-fetcher", self._fetch_loop)
        self._spawn(
            "outbox-completer",
            lambda: self.completer.run(self._publishers_stopped, self._stop_deadline_passed),
        )
        if self.dialect.listen_notify:
            channel = notify_channel(self.tables.name)
            self._spawn("outbox-listener", lambda: listen(self.engine, channel, self._wake, self._stopping))
        if self.maintenance is not None:
            self.maintenance.start()
        log.info(
            "relay %s started on %s table %r (batch %d to %d, workers %d, lease %gs)",
            self.name,
            self.engine.url.render_as_string(hide_password=True),
            self.tables.name,
            self.batch_size,
            self.max_batch_size,
            self.handlers.workers,
            self.lease_seconds,
        )
        self.observers.on_start(self)
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully (see the module docstring); returns when every outcome has been written."""
        if not self._started or self._stopped.is_set():
            return
        timeout = self.stop_timeout if timeout is None else timeout
        self._stop_deadline = time.monotonic() + timeout
        self._stopping.set()
        if self.maintenance is not None:
            self.maintenance.stop()
        self._wake.set()
        self._window.room.set()
        self._fetcher_done.wait()
        for publisher in self.publishers:
            publisher.stop(timeout, self.completer.report)
        self._publishers_stopped.set()
        for thread in self._threads:
            thread.join()
        unregister_waiter(self.tables.name, self._wake)
        if self._relay_lock is not None:
            if self.handlers.running_count():
                log.warning("keeping the SQLite relay lock until it expires: handlers are still running")
            else:
                self._relay_lock.release()
        self._stopped.set()
        self.observers.on_stop(self)
        log.info("relay %s stopped (%s)", self.name, self.stats_line())

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the relay has stopped (from another thread or a signal handler)."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """Counters since start, and what is in flight now, as a plain dict."""
        return {
            **self.counters,
            "in_flight": self._window.count(),
            "claim_size": self._claim_size,
            "name": self.name,
        }

    def stats_line(self) -> str:
        c = self.counters
        return (
            f"claimed {c['claimed']}, delivered {c['delivered']}, failed {c['failed']}, dead {c['dead']}, "
            f"released {c['released']}, fenced {c['fenced']}"
        )

    @property
    def running(self) -> bool:
        """Started and not stopping (what ``/readyz`` reports as ``relay``)."""
        return self._started and not self._stopping.is_set()

    def in_flight(self) -> int:
        """Messages claimed and not yet recorded."""
        return self._window.count()

    @property
    def claim_size(self) -> int:
        """Messages the next claim asks for at most: ``batch_size``, more during a backlog (see above)."""
        return self._claim_size

    @property
    def max_in_flight(self) -> int:
        """Messages claimed and not yet recorded, at most: the ``max_in_flight`` given, or by default
        twice the claim size (at least 4 per worker; 2,000 with a Kafka publisher)."""
        if self._max_in_flight is not None:
            return self._max_in_flight
        return max(2 * self._claim_size, self._window_floor)

    def _next_claim_size(self, want: int, claimed: int, older: int, last_full: bool) -> int:
        """The claim size after a claim that asked for ``want`` and got ``claimed`` rows, while ``older``
        rows of earlier claims were still in flight (the rules of "Claim size" above)."""
        size = self._claim_size
        if claimed < want:
            return self.batch_size  # no backlog (left)
        if older >= size:
            return max(self.batch_size, size // 2)  # the handlers are behind
        if want == size and last_full and older <= size // 2:
            return min(self.max_batch_size, size * 2)  # a backlog, and the claims are what we wait on
        return size

    # -- fetching -----------------------------------------------------------------------------------------

    def _fetch_loop(self) -> None:
        # Claimed batches go to a dispatcher thread, so that the next claim's round trip overlaps with
        # building and handing over the last batch (for Kafka: the producer's per-record work).
        batches: queue.SimpleQueue[list[ClaimedRow] | None] = queue.SimpleQueue()
        dispatcher = threading.Thread(
            target=self._dispatch_loop, args=(batches,), name="outbox-dispatcher", daemon=True
        )
        dispatcher.start()
        awake_until = 0.0  # until then, look again after `pause` seconds instead of poll_interval
        pause = AWAKE_POLL
        try:
            while not self._stopping.is_set():
                room = self.max_in_flight - self.in_flight()
                if room <= 0:
                    self._window.room.clear()
                    if self.in_flight() >= self.max_in_flight:
                        self._window.room.wait(0.5)
                    continue
                want = min(self._claim_size, room)
                self._wake.clear()
                rows = self._claim(want)
                if rows is None:
                    continue  # outage while stopping
                if rows:
                    batches.put(rows)
                    awake_until = time.monotonic() + AWAKE_SECONDS
                    pause = AWAKE_POLL
                if len(rows) < want and not self._stopping.is_set():
                    # Awake (a wake-up or a claimed row in the last AWAKE_SECONDS): writers merge the
                    # NOTIFYs of a busy moment (outbox.wakeup.NOTIFY_GAP), and a same-process wake-up can
                    # come a moment before the writer's COMMIT is visible: look again shortly, at once
                    # while rows keep coming, twice as late after each empty look (a lone message costs
                    # about five empty claims, not one every AWAKE_POLL for the whole window).
                    awake = time.monotonic() < awake_until
                    if self._wake.wait(pause if awake else self.poll_interval):
                        awake_until = time.monotonic() + AWAKE_SECONDS
                        pause = AWAKE_POLL
                    elif awake and not rows:
                        pause *= 2
        except Exception:  # pragma: no cover - a bug; do not die silently
            log.exception("relay fetcher crashed; stopping the relay")
            threading.Thread(target=self.stop, daemon=True).start()
        finally:
            batches.put(None)
            dispatcher.join()  # every claimed batch is with a publisher (or released) before they stop
            self._fetcher_done.set()

    def _dispatch_loop(self, batches: queue.SimpleQueue[list[ClaimedRow] | None]) -> None:
        while (rows := batches.get()) is not None:
            try:
                self.dispatcher.dispatch(rows, stopping=self._stopping.is_set())
            except Exception:  # pragma: no cover - a bug; do not die silently
                log.exception("relay dispatcher crashed; stopping the relay")
                threading.Thread(target=self.stop, daemon=True).start()

    def _claim(self, want: int) -> list[ClaimedRow] | None:
        started = 0.0

        def claim() -> list[ClaimedRow]:
            nonlocal started
            started = time.monotonic()  # the try that succeeds: outage retries are not claim time
            alone = self._autocommit if self.claims.one_statement else None  # PostgreSQL: no transaction
            with alone.connect() if alone is not None else self.engine.begin() as conn:
                return self.claims.claim_batch(
                    conn,
                    limit=want,
                    lease_seconds=self.lease_seconds,
                    now=utcnow(),
                    look_first=not self._last_claim_full,
                )

        try:
            rows = self._db.run(claim, give_up=self._stopping.is_set)
        except GaveUp:
            return None
        self.last_progress = time.monotonic()
        # Older rows still with the publishers (not those finished and waiting for their mark: the
        # window bounds those, and larger claims make for larger, cheaper marks)
        older = self.in_flight() - self.completer.unrecorded()
        self._claim_size = self._next_claim_size(want, len(rows), older, self._last_claim_full)
        self._last_claim_full = len(rows) == want
        self.observers.on_claimed(rows, self.last_progress - started)
        if rows:
            log.debug("claimed %d message(s) in %.3fs", len(rows), self.last_progress - started)
        if rows:
            self._window.add(rows[0].token, (r.seq for r in rows))
            self.counters["claimed"] += len(rows)
        return rows

    def _mark_in_session(self, session: orm.Session, delivery: Delivery) -> bool:
        marked = self.claims.mark_delivered(
            session.connection(), delivery.token, [delivery.seq], now=utcnow()
        )
        return marked == 1

    def _progressed(self) -> None:
        self.last_progress = time.monotonic()

    def _session_factory(self) -> AbstractContextManager[orm.Session]:
        return self._sessions()

    # -- plumbing -----------------------------------------------------------------------------------------

    def _check_schema(self) -> None:
        try:
            with self.engine.connect() as conn:
                check_version(conn, self.tables.name)
        except sa.exc.DBAPIError as exc:
            url = self.engine.url.render_as_string(hide_password=True)
            if is_outage(exc):
                raise DatabaseUnavailable(
                    f"cannot reach the database at {url}: {first_line(exc.orig or exc)}"
                ) from None
            raise ConfigError(f"database error at {url}: {first_line(exc.orig or exc)}") from None

    def _stop_deadline_passed(self) -> bool:
        return time.monotonic() > self._stop_deadline

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{name} must be a positive number, got {value!r}")
