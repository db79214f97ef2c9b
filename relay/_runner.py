"""The relay: claims committed messages in batches and delivers them, at least once.

Threads (dramatiq's shape: fetching apart from running):

- the **fetcher** claims batches while there is capacity (``max_in_flight``) and passes them to the
  **dispatcher** (:mod:`relay._dispatch`), which turns rows into deliveries and hands them to the
  publisher that routes them (so the next claim's round trip overlaps with that work); the fetcher
  sleeps on a wake-up event that a commit in this process, a PostgreSQL NOTIFY or the poll interval
  sets. After a wake-up or a claimed row it stays awake for ``AWAKE_SECONDS`` (50 ms), looking again
  after ``AWAKE_POLL`` (2 ms) when a claim comes back short, twice as late after each empty look:
  writers send at most one NOTIFY per ``outbox._wakeup.NOTIFY_GAP`` (20 ms, shorter than the awake
  window), so a message whose NOTIFY was merged into an earlier one is found by that looking, and the
  merged NOTIFY at the gap's end keeps the relay awake while commits continue. It stops claiming while
  more handler threads are stuck past their timeout than ``max_stuck_handlers`` (see
  :mod:`relay.publishers._handlers`; ``/readyz`` then fails, so that the relay is restarted);
- **publishers** deliver (in-process handlers on a bounded worker pool; Kafka in ``publishers.kafka``)
  and report each outcome once;
- the **completer** (:mod:`relay._completer`) writes outcomes in bulk (one fenced UPDATE per lease for
  delivered rows), applies retry policies (failed / dead / parked), renews live leases, and enforces
  handler timeouts;
- the **listener** (PostgreSQL only, :mod:`relay._listener`) holds a LISTEN connection and sets the
  wake-up event;
- the **maintenance** thread (:mod:`relay.maintenance`) applies retention (one relay at a time) and
  reports stuck messages, expired leases and held-back keys.

Claim size (the fetcher's; ``batch_size`` up to ``max_batch_size``): each claim and each mark
statement has a fixed cost, so a deep backlog drains faster in larger claims (figures in
BENCHMARKS.md, "Figures behind the code"); but a relay whose handlers are slow would only hoard, in a
large claim, messages that other relays could be running. So the claim size adapts, and these hold:

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

Database outages are retried forever with backoff (:mod:`relay._outages`) and never recorded against a
message: an outage around a handler releases the message (attempt not counted), and marks wait in
memory until the database is back (if it stays away past the lease, the message is simply delivered
again). On SQLite one relay runs at a time (:mod:`relay._single_relay`).

Graceful stop: stop claiming; release what has not started; let running handlers finish within
``stop_timeout``; write every outcome; leave the leases of handlers still running to expire (never hand
back a row that is still executing).

No zombie: the fetcher, the dispatcher and the completer are threads the relay cannot work without. When
one dies (any exception, ``BaseException`` included: a claim's ``MemoryError`` after the server committed
it, a bug), :attr:`Relay.failure` says why, ``/healthz`` answers 503 and the relay stops itself
(``outbox relay`` then exits with code 8); the rows it held and could not finish are left to their
lease, so a relay claims them again once it expires. -- ``tests/test_relay_liveness.py``
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
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import orm

from consumers._registry import Registry, default_registry
from outbox import _defaults as defaults
from outbox._clock import utcnow
from outbox._dialects import Dialect, create_engine, dialect_for, is_outage
from outbox._errors import ConfigError, DatabaseUnavailable, first_line
from outbox._key_queue import RUN_LENGTH
from outbox._policy import MAX_SECONDS, RetryPolicy, TopicPolicy
from outbox._schema import DEFAULT_TABLE, check_version, tables_for
from outbox._wakeup import RELAY_AWAKE_SECONDS, notify_channel, register_waiter, unregister_waiter
from outbox.redaction import mask_url
from relay._claim import ClaimedRow, ClaimQueries, ClaimResult
from relay._completer import Completer, InFlight, LeaseWrites, lease_margin
from relay._dispatch import Dispatcher
from relay._heartbeat import Heartbeat
from relay._listener import listen
from relay._outages import GaveUp, OutageRetry
from relay._single_relay import SingleRelayLock
from relay.maintenance import Maintenance
from relay.observers import Observers, RelayObserver
from relay.publishers import Delivery, Publisher
from relay.publishers._handlers import HandlerPublisher

if TYPE_CHECKING:
    from relay.publishers.kafka import KafkaSettings

log = logging.getLogger("outbox.relay")

# After a wake-up or a claimed row, the fetcher stays awake for AWAKE_SECONDS, looking again AWAKE_POLL
# seconds after a claim that came back short (twice as late after each empty one; see
# outbox._wakeup.NOTIFY_GAP for why).
AWAKE_SECONDS = RELAY_AWAKE_SECONDS
AWAKE_POLL = 0.002
#: the defaults of max_batch_size, max_in_flight_bytes and (with Kafka) max_in_flight: outbox._defaults
MAX_BATCH_SIZE = defaults.MAX_BATCH_SIZE
MAX_IN_FLIGHT_BYTES = defaults.MAX_IN_FLIGHT_BYTES
BROKER_IN_FLIGHT = defaults.BROKER_IN_FLIGHT


class Relay:
    """A relay for one outbox table. Start it from code or run it with ``outbox relay``.

    ``database`` is a URL or an ``Engine``. ``registry`` holds the in-process handlers (default: the
    one ``@consumers.handler`` registers on). ``kafka`` (a ``relay.publishers.kafka.KafkaSettings``)
    publishes every topic without an in-process handler to Kafka; ``publishers`` adds other
    destinations, asked in order after the handlers. ``observers`` (``relay.observers.RelayObserver``)
    watch it: metrics, logging. Use as a context manager, or call :meth:`start` and :meth:`stop`.

    ``heartbeat`` (default on): the relay writes its row in ``<table>_relays`` and its per-minute counts
    and latencies in ``<table>_stats`` every few seconds (:mod:`relay._heartbeat`), which ``outbox
    status`` and the dashboard read.

    A claim asks for ``batch_size`` messages; while a backlog lasts and the handlers keep up, claims
    grow (doubling) to ``max_batch_size`` (default the larger of 2,000 and ``batch_size``; give it equal
    to ``batch_size`` for a fixed size) and shrink back when the handlers fall behind or the backlog
    ends (the module's "Claim size"). ``max_in_flight`` caps the messages claimed and not yet recorded
    (default: twice the current claim size, at least 4 per worker, 2,000 with Kafka).

    ``max_in_flight_bytes`` (default 64 MiB) bounds the payload bytes claimed and not yet recorded, as
    ``max_in_flight`` bounds their number: a claim stops at it (taking one message at least), so the
    relay's memory follows it, not the claim size times the payload size.

    ``max_payload_bytes`` (default ``outbox.writer.DEFAULT_MAX_PAYLOAD_BYTES``, 4 MiB, as ``outbox.add``'s)
    is the largest payload the relay hands out: a larger stored one (from a writer allowed more) fails
    permanently, dead with "payload of N bytes exceeds max_payload_bytes M" (:mod:`relay._dispatch`).

    ``handler_timeout``: seconds an attempt may run (unless its handler sets ``timeout``) before it fails
    and its handler is interrupted; ``max_stuck_handlers`` (default twice ``workers``): how many handler
    threads blocked past their timeout where Python cannot interrupt them may run on before the relay
    stops claiming and reports itself unready (``relay.publishers._handlers``).

    ``freeze_gc=True`` calls :func:`gc.freeze` in :meth:`start`, once the relay is set up: every object
    alive then (the interpreter's modules, SQLAlchemy's, the application's) moves to the collector's
    permanent generation, which its full passes skip. Without it, each full pass walks those few hundred
    thousand objects with the GIL held: pauses of the whole relay of tens of milliseconds (measured in
    BENCHMARKS.md, "Figures behind the code"). ``outbox relay`` sets it. In an
    application that starts a relay beside its own work, leave it off unless the application is done
    building its long-lived state: a frozen object caught in a reference cycle later is never freed.
    """

    def __init__(
        self,
        database: str | sa.Engine,
        registry: Registry | None = None,
        *,
        table: str = DEFAULT_TABLE,
        batch_size: int = defaults.BATCH_SIZE,
        max_batch_size: int | None = None,
        workers: int = defaults.WORKERS,
        max_in_flight: int | None = None,
        lease_seconds: float = defaults.LEASE_SECONDS,
        poll_interval: float = defaults.POLL_INTERVAL,
        stop_timeout: float = defaults.STOP_TIMEOUT,
        retry: RetryPolicy | None = None,
        handler_timeout: float | None = None,
        max_stuck_handlers: int | None = None,
        strict_order_topics: Sequence[str] = (),
        kafka: KafkaSettings | None = None,
        publishers: Sequence[Publisher] = (),
        observers: Sequence[RelayObserver] = (),
        name: str | None = None,
        maintenance: bool = True,
        heartbeat: bool = True,
        retention: dt.timedelta | float | None = defaults.RETENTION,
        stuck_after: dt.timedelta | float = defaults.STUCK_AFTER,
        maintenance_interval: float = defaults.MAINTENANCE_INTERVAL,
        freeze_gc: bool = False,
        max_payload_bytes: int = defaults.MAX_PAYLOAD_BYTES,
        max_in_flight_bytes: int = defaults.MAX_IN_FLIGHT_BYTES,
    ) -> None:
        _check_positive(batch_size=batch_size, workers=workers, lease_seconds=lease_seconds)
        if not isinstance(max_in_flight_bytes, int) or max_in_flight_bytes < 1:
            raise ConfigError(
                "max_in_flight_bytes must be a whole number of bytes, at least 1, "
                f"got {max_in_flight_bytes!r}"
            )
        #: payload bytes claimed and not yet recorded, at most (a claim takes at least one message)
        self.max_in_flight_bytes = max_in_flight_bytes
        if not isinstance(max_payload_bytes, int) or max_payload_bytes < 1:
            raise ConfigError(
                f"max_payload_bytes must be a whole number of bytes, at least 1, got {max_payload_bytes!r}"
            )
        _check_positive(poll_interval=poll_interval)
        if max_in_flight is not None:
            _check_positive(max_in_flight=max_in_flight)
        if max_stuck_handlers is not None and not (
            isinstance(max_stuck_handlers, int) and max_stuck_handlers >= 0
        ):
            raise ConfigError(
                f"max_stuck_handlers must be a whole number, 0 or more, got {max_stuck_handlers!r}"
            )
        if max_batch_size is not None and max_batch_size < batch_size:
            raise ConfigError(
                f"max_batch_size ({max_batch_size}) must be at least batch_size ({batch_size}); "
                "set them equal to claim a fixed batch_size"
            )
        if not 0 <= stop_timeout <= MAX_SECONDS:
            raise ConfigError(f"stop_timeout must be zero or more seconds, and finite, got {stop_timeout!r}")
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
        #: SQLite's one relay at a time (relay._single_relay); None on PostgreSQL and MariaDB
        self._relay_lock = (
            SingleRelayLock(self.engine, self.tables, holder=self.name, lease_seconds=lease_seconds)
            if self.dialect.single_relay
            else None
        )
        self.claims = ClaimQueries(self.tables, self.dialect)
        # Every lease write (renewal, marks, releases) is one statement, atomic on its own: on PostgreSQL
        # and MariaDB it runs in autocommit, so a relay frozen right after it holds no row lock (invariant
        # 7 of relay._claim), and it takes one round trip instead of three (BEGIN, it, COMMIT; BENCHMARKS.md,
        # "Figures behind the code").
        # SQLite keeps transactions: one relay, and its lease writes share one with the relay lock.
        self._autocommit: sa.Engine | None = (
            None if self.dialect.single_relay else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        self._last_claim_full = False  # the fetcher's: see ClaimQueries.claim_batch(look_first)
        #: the fetcher's: its last claim pulled and scanned nothing else (ClaimQueries.claim_batch)
        self._scan_idle = False
        self._sessions = orm.sessionmaker(self.engine)
        self._window = InFlight()  # claimed and not yet recorded: at most max_in_flight
        self.handlers = HandlerPublisher(
            self.registry,
            workers=workers,
            session_factory=self._session_factory,
            mark_in_session=self._mark_in_session,
            lease_deadline=self._window.deadline,
            max_stuck=max_stuck_handlers,
            mark_started=self._mark_started,
        )
        extra = list(publishers)
        if kafka is not None:
            from relay.publishers.kafka import publisher_for

            extra.append(publisher_for(kafka))
        self.publishers: list[Publisher] = [self.handlers, *extra]  # mypy checks HandlerPublisher here
        self.observers = Observers(
            [*observers, *([Heartbeat(self.engine, self.tables)] if heartbeat else [])]
        )
        self.counters: dict[str, int] = defaultdict(int)
        self.last_progress = time.monotonic()

        self._wake = threading.Event()
        # kept runs (relay._claim, invariant 13): rows the completer took at a run's end, each batch with
        # its lease's start, for the fetcher to register and hand out like a claim; closed at its exit
        self._kept: deque[tuple[ClaimResult, float]] = deque()
        self._kept_lock = threading.Lock()
        self._kept_closed = False
        self._stopping = threading.Event()
        self._db = OutageRetry(self._stopping)  # every database operation, retried through outages
        self._fetcher_done = threading.Event()
        self._publishers_stopped = threading.Event()
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
            promoted=lambda keys: self.dispatcher.contended(keys),
            room=self._room,
            kept=self._keep,
            topics=lambda: self.dispatcher.claimable(),
        )
        self.dispatcher = Dispatcher(
            self.registry,
            self.publishers,
            default_policy=TopicPolicy(retry=retry or RetryPolicy(), timeout=handler_timeout),
            strict_order_topics=strict_order_topics,
            report=self.completer.report,
            report_and_wait=self.completer.report_and_wait,
            stopping=self._stopping,
            max_payload_bytes=max_payload_bytes,
            mark_started=self._mark_started,
            wake=self._wake.set,
        )
        self._threads: list[threading.Thread] = []
        self._started = False
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()  # stop() from a dying thread and from the owner: one runs
        #: why the relay cannot work (a thread it needs died; see _thread_died), else None
        self.failure: str | None = None
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
                routes=lambda topic: self.dispatcher.route(topic)[0] is not None,
            )
            if maintenance
            else None
        )

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> Relay:
        """Check the schema, take the SQLite relay lock if needed, and start the threads.

        Raises :class:`ConfigError` when the relay has nowhere to deliver: no handler in its registry,
        and no Kafka and no publisher of one's own (it would claim nothing: relay._claim, invariant 15).
        """
        if self._started:
            raise RuntimeError("relay already started")
        if (topics := self.dispatcher.claimable()) is not None and not topics:
            raise ConfigError(
                "the relay has nowhere to deliver: its registry has no handler, and it has no Kafka "
                "(kafka=KafkaSettings(...)) and no publisher of its own; register handlers "
                "(@consumers.handler) before starting it"
            )
        self._check_schema()
        if self._relay_lock is not None:
            self._relay_lock.acquire()
        self._started = True
        if self.freeze_gc:
            gc.freeze()  # after the schema check: the dialect's and the pool's state are built by now
        register_waiter(self.tables.name, self._wake)
        self._spawn("outbox-fetcher", self._fetch_loop)
        self._spawn("outbox-completer", self._complete_loop)
        if self.dialect.listen_notify:
            channel = notify_channel(self.tables.name)
            self._spawn("outbox-listener", lambda: listen(self.engine, channel, self._wake, self._stopping))
        if self.maintenance is not None:
            self.maintenance.start()
        log.info(
            "relay %s started on %s table %r (batch %d to %d, workers %d, lease %gs)",
            self.name,
            mask_url(self.engine.url),
            self.tables.name,
            self.batch_size,
            self.max_batch_size,
            self.handlers.workers,
            self.lease_seconds,
        )
        self.observers.on_start(self)
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully (see the module docstring); returns when every outcome has been written.

        Safe to call from several threads: one stops the relay, the others wait until it has stopped.
        """
        with self._stop_lock:
            if not self._started or self._stopped.is_set():
                return
            self._stop(timeout)

    def _stop(self, timeout: float | None) -> None:
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
                self._relay_lock.keep_until_expired()
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
        twice the claim size (at least 4 per worker; 2,000 with a Kafka publisher), and while a run is
        going on, room for four runs more: the run chained behind it (relay._claim, invariant 12), and
        the runs delivered but not yet recorded, which stay in the window until their marks are written
        (measured: one key drained at 0.3 of the unkeyed rate with two runs of room, 0.6 with four)."""
        if self._max_in_flight is not None:
            return self._max_in_flight
        base = max(2 * self._claim_size, self._window_floor)
        return base + 4 * RUN_LENGTH if self.dispatcher.chaining() else base

    def _next_claim_size(self, want: int, claimed: int, older: int, last_full: bool) -> int:
        """The claim size after a claim that asked for ``want`` and got ``claimed`` rows, while ``older``
        rows of earlier claims were still in flight (the rules of "Claim size" above)."""
        size = self._claim_size
        if claimed < want:
            return self.batch_size  # no backlog (left)
        if older >= size:
            return max(self.batch_size, size // 2)  # the handlers are behind
        if want >= size and last_full and older <= size // 2:
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
        stuck = False
        try:
            while not self._stopping.is_set():
                self._take_kept(batches)
                problem = self.handlers.stuck_problem()
                if (problem is not None) != stuck:
                    if problem is not None:
                        log.error("%s: this relay stops claiming; restart it", problem)
                    else:
                        log.warning("the stuck handler threads have ended: this relay claims again")
                    stuck = problem is not None
                if stuck:  # finish what is held; /readyz and a metric say why, so that it is restarted
                    self._wake.wait(self.poll_interval)
                    self._wake.clear()
                    continue
                room = self.max_in_flight - self.in_flight()
                byte_room = self.max_in_flight_bytes - self._window.bytes()
                if room <= 0 or byte_room <= 0:
                    self._window.room.clear()
                    full = self.in_flight() >= self.max_in_flight
                    if full or self._window.bytes() >= self.max_in_flight_bytes:
                        self._window.room.wait(0.5)
                    continue
                want = min(self._claim_size, room)
                if self.dispatcher.chaining():  # a run is going on: the next claim may chain a whole run
                    want = min(max(want, self.claims.run_length), room)
                self._wake.clear()
                rows = self._claim(want, byte_room)
                if rows is None:
                    continue  # outage while stopping
                if rows:
                    batches.put(rows)
                    awake_until = time.monotonic() + AWAKE_SECONDS
                    pause = AWAKE_POLL
                if len(rows) + rows.queued < want and not self._stopping.is_set():
                    # Awake (a wake-up or a claimed row in the last AWAKE_SECONDS): writers merge the
                    # NOTIFYs of a busy moment (outbox._wakeup.NOTIFY_GAP), and a same-process wake-up can
                    # come a moment before the writer's COMMIT is visible: look again shortly, at once
                    # while rows keep coming, twice as late after each empty look (a lone message costs
                    # about five empty claims, not one every AWAKE_POLL for the whole window).
                    awake = time.monotonic() < awake_until
                    if self._wake.wait(pause if awake else self.poll_interval):
                        awake_until = time.monotonic() + AWAKE_SECONDS
                        pause = AWAKE_POLL
                    elif awake and not rows:
                        pause *= 2
        except BaseException as exc:  # MemoryError in a claim, a bug: the relay cannot claim any more
            self._thread_died("fetcher", exc)
        finally:
            with self._kept_lock:  # rows kept from now on are released by the completer
                self._kept_closed = True
            self._take_kept(batches)  # handed out while stopping: released
            batches.put(None)
            dispatcher.join()  # every claimed batch is with a publisher (or released) before they stop
            self._fetcher_done.set()

    def _dispatch_loop(self, batches: queue.SimpleQueue[list[ClaimedRow] | None]) -> None:
        while (rows := batches.get()) is not None:
            try:
                self.dispatcher.dispatch(rows, stopping=self._stopping.is_set())
            except BaseException as exc:  # a bug: this batch's rows wait for their lease; later ones are
                self._thread_died("dispatcher", exc)  # released, as the relay is stopping now

    def _complete_loop(self) -> None:
        try:
            self.completer.run(self._publishers_stopped, self._stop_deadline_passed)
        except BaseException as exc:  # nothing would be recorded or renewed any more
            self._thread_died("completer", exc)

    def _thread_died(self, thread: str, exc: BaseException) -> None:
        """A thread the relay cannot work without (fetcher, dispatcher, completer) met ``exc``.

        The relay must not live on as a zombie (answering probes, claiming nothing): it records why in
        :attr:`failure` (``/healthz`` then fails, ``outbox relay`` exits with ``RET_CRASHED``) and stops.
        Rows it claimed and could not finish are never lost: their lease expires and another relay (or
        this one, restarted) claims them again.
        -- tests/test_relay_liveness.py::test_a_relay_whose_claim_thread_dies_exits_and_loses_nothing
        """
        if self.failure is None:
            self.failure = f"the relay's {thread} thread died: {type(exc).__name__}: {first_line(exc)}"
        log.critical(
            "%s; stopping the relay (its unfinished messages come back after their lease)",
            self.failure,
            exc_info=exc,
        )
        if not self._stopping.is_set():
            threading.Thread(target=self.stop, name="outbox-stop-after-failure", daemon=True).start()

    def _own_lease(self, key: str, seq: int) -> str | None:
        """The lease under which this relay holds row ``seq`` in flight at the end of its run of ``key``,
        while it is live by this relay's clock with time to spare (the claim chains the key's next run
        behind it: invariant 12); None otherwise."""
        if not self.dispatcher.chainable(key, seq):
            return None
        return self._live_token(seq)

    def _pulls(self) -> tuple[list[tuple[str, int, str]], set[str]]:
        """The runs whose key's next run the claim may pull behind them (invariant 12), with their lease;
        and the keys of those whose pull takes queued rows only (a guess: relay._dispatch)."""
        found = []
        guessed = set()
        for key, last, guess in self.dispatcher.pulls():
            token = self._live_token(last)
            if token is not None:
                found.append((key, last, token))
                if guess:
                    guessed.add(key)
        return found, guessed

    def _ours(self, token: str) -> bool:
        """Whether lease ``token`` is one this relay holds (the claim leaves rows behind other relays'
        live leases to them: relay._claim's invariant 14)."""
        return self._window.deadline(token) != float("-inf")

    def _live_token(self, seq: int) -> str | None:
        """The lease under which this relay holds row ``seq``, if it is live with time to spare."""
        token = self._window.token_of(seq)
        if token is None or self._window.deadline(token) < time.monotonic() + self.lease_seconds / 6:
            return None
        return token

    def _claim(self, want: int, max_bytes: int | None = None) -> ClaimResult | None:
        started = 0.0

        def claim() -> ClaimResult:
            nonlocal started
            started = time.monotonic()  # the try that succeeds: outage retries are not claim time
            pulls, queued_only = self._pulls()
            with self.engine.begin() as conn:
                result = self.claims.claim_batch(
                    conn,
                    limit=want,
                    lease_seconds=self.lease_seconds,
                    now=utcnow(),
                    look_first=not self._last_claim_full,
                    max_bytes=max_bytes,
                    own=self._own_lease,
                    ours=self._ours,
                    pulls=pulls,
                    queued_only=queued_only,
                    topics=self.dispatcher.claimable(),
                    scan_idle=self._scan_idle,
                )
                self._scan_idle = bool(pulls) and result.others == 0
                return result

        try:
            rows = self._db.run(claim, give_up=self._stopping.is_set)
        except GaveUp:
            return None
        self.last_progress = time.monotonic()
        # Older rows still with the publishers (not those finished and waiting for their mark: the
        # window bounds those, and larger claims make for larger, cheaper marks)
        older = self.in_flight() - self.completer.unrecorded()
        # rows set aside behind their key (queued) count as found: the scan met that many due rows; so do
        # rows left behind a blocker being written (a run's end being marked): claimable in a moment, and
        # a claim cut back to batch_size would then take a sliver of each key (MariaDB, 100 keys: every
        # other claim came back empty so; BENCHMARKS.md, "Figures behind the code")
        found = len(rows) + rows.queued + rows.busy
        self._claim_size = self._next_claim_size(want, found, older, self._last_claim_full)
        self._last_claim_full = found == want
        self.observers.on_claimed(rows, self.last_progress - started)
        if rows:
            log.debug("claimed %d message(s) in %.3fs", len(rows), self.last_progress - started)
        if rows.shallow:
            self.dispatcher.not_deep(rows.shallow)
        self._hold(rows, started)
        return rows

    def _hold(self, rows: ClaimResult, started: float) -> None:
        """Rows this relay now holds (claimed, or kept at a run's end), on the fetcher's thread: their runs
        known to the dispatcher before the next claim asks what it may chain, and their lease in the
        window, running from ``started`` by this relay's clock (handlers check it)."""
        if not rows:
            return
        self.dispatcher.register(rows, rows.deep)
        deadline = started + self.lease_seconds - lease_margin(self.lease_seconds)
        nbytes = sum(len(r.payload) for r in rows)
        self._window.add(rows[0].token, (r.seq for r in rows), deadline=deadline, nbytes=nbytes)
        self.counters["claimed"] += len(rows)

    def _room(self) -> tuple[int, int]:
        """The room left in the window (messages, payload bytes) for kept runs; none once stopping."""
        if self._stopping.is_set():
            return 0, 0
        return self.max_in_flight - self.in_flight(), self.max_in_flight_bytes - self._window.bytes()

    def _keep(self, rows: ClaimResult, started: float) -> bool:
        """The completer kept ``rows`` (a run's next rows, taken as its last row was marked): queue them
        for the fetcher, which holds and hands them out; False once it has stopped claiming."""
        with self._kept_lock:
            if self._kept_closed:
                return False
            self._kept.append((rows, started))
        self._wake.set()
        return True

    def _take_kept(self, batches: queue.SimpleQueue[list[ClaimedRow] | None]) -> None:
        """Hold and hand out the rows the completer kept (on the fetcher's thread)."""
        while self._kept:
            rows, started = self._kept.popleft()
            self._hold(rows, started)
            batches.put(rows)

    def _mark_in_session(self, session: orm.Session, delivery: Delivery) -> bool:
        now = utcnow()
        connection = session.connection()
        marked = self.claims.mark_delivered(
            connection, delivery.token, [delivery.seq], now=now, counted=delivery.counted
        )
        if marked and delivery.run_end and delivery.message.key is not None:
            # in the handler's transaction too: committed with the mark, or not at all (relay._completer)
            promoted = self.claims.promote_by_key(connection, [delivery.seq], now=now)
            if promoted:
                self.dispatcher.contended(promoted)
        return marked == 1

    def _mark_started(self, delivery: Delivery) -> bool:
        """Count ``delivery``'s attempt before it starts, committed (relay._claim, invariant 10)."""

        def mark() -> bool:
            with self._autocommit.connect() if self._autocommit is not None else self.engine.begin() as conn:
                return self.claims.mark_started(conn, delivery.token, delivery.seq)

        try:
            return self._db.run(mark, give_up=self._stopping.is_set)
        except GaveUp:
            return False

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
            url = mask_url(self.engine.url)
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
    """Each value is a positive number, finite and at most ``MAX_SECONDS`` (100 years): an infinite lease
    passed ``> 0``, then adding it to a time killed the fetcher thread while the process lived on."""
    for name, value in values.items():
        if not isinstance(value, int | float) or not 0 < value <= MAX_SECONDS:
            raise ConfigError(
                f"{name} must be a positive number, finite and at most {MAX_SECONDS:.0f}, got {value!r}"
            )
