"""Built-in maintenance: retention and the stuck-message monitor, one thread per relay.

Every relay runs a :class:`Maintenance` thread (``Relay(maintenance=True)``, the default). On each tick
it takes or renews the **maintenance lease**, a row named ``maintenance`` in ``<table>_locks``; every
``interval`` seconds it then

- **monitors** (every relay, so each one's findings and metrics are current): expired leases, overdue
  messages and held-back keys (:mod:`relay._stuck`). The latest :class:`~relay._stuck.StuckFindings` is
  kept on :attr:`Maintenance.findings` and handed to observers (the metrics read it from there). Only
  the lease holder logs them at WARNING, with their ids; when there are expired leases it wakes its
  relay's fetcher (``on_expired``) so they are claimed again now rather than at the next poll;
- **applies retention** (the lease holder only, :mod:`relay._retention`): delivered messages whose
  ``delivered_at`` is older than ``retention``, then the consumers' inbox rows whose ``processed_at``
  is, are deleted ``batch_size`` rows per short transaction, with a pause between batches.

Invariants (each names the test that would catch its violation; retention's own are in
:mod:`relay._retention`, the monitor's in :mod:`relay._stuck`):

1. **At most one relay applies retention at a time.** The lease is taken by a conditional UPDATE
   (``WHERE holder = me OR expires_at < now``) or, when the row does not exist, an INSERT that the
   primary key makes unique; the holder renews it every tick and between batches, and stops a run when
   a renewal finds it lost. A holder that dies stops renewing; another relay takes over once
   ``lease_seconds`` have passed. A relay that stops releases it. -- ``tests/test_maintenance.py::
   test_one_relay_at_a_time_holds_the_maintenance_lease``
2. **Retention never starves the relay.** A run stops after ``max_batches`` batches of each kind and goes
   on at the next tick; between batches it pauses ``batch_pause`` seconds so that claims and marks get
   through. -- ``tests/test_maintenance.py::test_retention_deletes_only_old_delivered_while_relays_deliver``

Times are the relay's clock (naive UTC), like every lease; see ``docs/guarantees.md`` about clock skew.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from outbox import _defaults as defaults
from outbox._clock import utcnow
from outbox._dialects import dialect_for, is_outage
from outbox._errors import ConfigError
from outbox._key_queue import KeyQueue
from outbox._schema import OutboxTables
from outbox.writer import MAX_DELAY
from relay._retention import Batch, RetentionRun, delivered_batch, inbox_batch, run_retention
from relay._stuck import StuckFindings, StuckMonitor, report
from relay.publishers import describe_error

__all__ = [
    "DEFAULT_INTERVAL",
    "DEFAULT_RETENTION",
    "DEFAULT_STUCK_AFTER",
    "MAINTENANCE_LOCK",
    "Maintenance",
    "RetentionRun",
    "StuckFindings",
    "as_timedelta",
]

log = logging.getLogger("outbox.maintenance")

#: the row of ``<table>_locks`` that names the relay doing retention
MAINTENANCE_LOCK = "maintenance"
#: the relay's defaults (:mod:`outbox._defaults`), under the names this module always gave them
DEFAULT_RETENTION = defaults.RETENTION
DEFAULT_STUCK_AFTER = defaults.STUCK_AFTER
DEFAULT_INTERVAL = defaults.MAINTENANCE_INTERVAL

Observer = Callable[[StuckFindings], None]


@dataclass
class _Counters:
    deleted_total: int = 0
    inbox_deleted_total: int = 0
    retention_runs: int = 0


class Maintenance:
    """The maintenance thread of one relay (see the module docstring). :meth:`start`, :meth:`stop`.

    ``holder`` names this relay in the lock row. ``retention`` ``None`` (or zero) keeps delivered
    messages and inbox rows forever. ``lease_seconds``: how long the maintenance lease lives without renewal.
    :meth:`check`, :meth:`apply_retention` and :meth:`apply_inbox_retention` can also be called directly
    (tests, one-off runs).
    """

    def __init__(
        self,
        engine: sa.Engine,
        tables: OutboxTables,
        *,
        holder: str,
        retention: dt.timedelta | float | None = DEFAULT_RETENTION,
        stuck_after: dt.timedelta | float = DEFAULT_STUCK_AFTER,
        interval: float = DEFAULT_INTERVAL,
        lease_seconds: float = defaults.LEASE_SECONDS,
        lease_grace: float = 1.0,
        batch_size: int = 2000,
        batch_pause: float = 0.05,
        max_batches: int = 100,
        report_ids: int = 10,
        on_expired: Callable[[], None] | None = None,
        routes: Callable[[str], bool] | None = None,
    ) -> None:
        keep = as_timedelta(retention)
        stuck = as_timedelta(stuck_after)
        limit = MAX_DELAY.total_seconds()  # an infinite interval or lease would kill the thread later
        if not (
            0 < interval <= limit and 0 < lease_seconds <= limit and batch_size >= 1 and max_batches >= 1
        ):
            raise ConfigError(
                "maintenance interval, lease_seconds, batch_size and max_batches must be positive "
                "(and the seconds finite)"
            )
        if keep is not None and not dt.timedelta(0) <= keep <= MAX_DELAY:
            raise ConfigError(f"retention must be zero to {MAX_DELAY.days} days, got {keep}")
        if stuck is None or not dt.timedelta(0) < stuck <= MAX_DELAY:
            raise ConfigError(
                f"stuck_after must be a positive duration of at most {MAX_DELAY.days} days, got {stuck}"
            )
        self.engine = engine
        # The lease's writes run in autocommit (but where one relay runs at a time: SQLite), each
        # committed when it has run, so a relay frozen between one and the next holds no lock on the
        # lease's row: the others take the lease over once it expires (as relay._claim invariant 7).
        self._lock_engine = (
            engine
            if dialect_for(engine).single_relay
            else engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        self.tables = tables
        self._key_queue = KeyQueue(tables)
        self.holder = holder
        self.retention = keep if keep else None
        self.stuck_after = stuck
        self.interval = interval
        self.lease_seconds = lease_seconds
        self.lease_grace = lease_grace
        self.batch_size = batch_size
        self.batch_pause = batch_pause
        self.max_batches = max_batches
        self.report_ids = report_ids
        self.on_expired = on_expired
        #: the latest monitor findings (``None`` before the first check)
        self.findings: StuckFindings | None = None
        #: the latest retention runs, of delivered messages and of inbox rows (``None`` before the first,
        #: or when this relay never held the lease)
        self.last_retention: RetentionRun | None = None
        self.last_inbox_retention: RetentionRun | None = None
        self._counters = _Counters()
        self._monitor = StuckMonitor(engine, tables, routes)
        self._observers: list[Observer] = []
        self._held = False
        self._renewed_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    # -- what the metrics read ---------------------------------------------------------------------------

    @property
    def holds_lease(self) -> bool:
        """This relay held the maintenance lease at its last tick."""
        return self._held

    @property
    def deleted_total(self) -> int:
        """Delivered messages this relay's retention has deleted since start."""
        return self._counters.deleted_total

    @property
    def inbox_deleted_total(self) -> int:
        """Inbox rows this relay's retention has deleted since start."""
        return self._counters.inbox_deleted_total

    def add_observer(self, observer: Observer) -> None:
        """Call ``observer(findings)`` after each check (in the maintenance thread; keep it quick)."""
        self._observers.append(observer)

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("maintenance already started")
        self._thread = threading.Thread(target=self._run, name="outbox-maintenance", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (a retention batch in progress finishes first) and release the lease."""
        if self._thread is None or self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout)
        if self._held:
            self.release_lease()

    def _run(self) -> None:
        tick = min(self.interval, self.lease_seconds / 3)
        next_work = time.monotonic()
        while not self._stop.is_set():
            try:
                self.hold_lease()
                if time.monotonic() >= next_work:
                    next_work = time.monotonic() + self.interval
                    self.check()
                    if self._held:
                        self.sweep_queued_keys()
                    if self._held and self.retention is not None:
                        runs = [self.apply_retention()]
                        if self._held and not self._stop.is_set():
                            runs.append(self.apply_inbox_retention())
                        if any(run.incomplete for run in runs) and not self._stop.is_set():
                            next_work = time.monotonic()  # more to delete: go on after one tick
                self._failing = False
            except Exception as exc:
                self._held = False
                if is_outage(exc):
                    log.debug("maintenance waits for the database: %s", describe_error(exc))
                elif not self._failing:  # log a persistent error once, not every tick
                    log.warning("maintenance failed (retrying every %gs)", tick, exc_info=True)
                self._failing = True
            self._stop.wait(tick)

    # -- the lease ---------------------------------------------------------------------------------------

    def hold_lease(self) -> bool:
        """Take or renew the maintenance lease; True when this relay holds it now."""
        locks = self.tables.locks
        now = utcnow()
        until = now + dt.timedelta(seconds=self.lease_seconds)
        with self._lock_engine.begin() as conn:
            taken = conn.execute(
                sa.update(locks)
                .where(
                    locks.c.name == MAINTENANCE_LOCK,
                    sa.or_(locks.c.holder == self.holder, locks.c.expires_at < now),
                )
                .values(holder=self.holder, expires_at=until)
            ).rowcount
            exists = (
                taken
                or conn.execute(sa.select(sa.literal(1)).where(locks.c.name == MAINTENANCE_LOCK)).first()
            )
        if not exists:
            try:
                with self._lock_engine.begin() as conn:
                    conn.execute(
                        sa.insert(locks).values(name=MAINTENANCE_LOCK, holder=self.holder, expires_at=until)
                    )
                taken = 1
            except sa.exc.IntegrityError:  # another relay inserted it first
                taken = 0
        held = bool(taken)
        if held and not self._held:
            log.info("relay %s holds the maintenance lease (retention, stuck-message warnings)", self.holder)
        self._held = held
        if held:
            self._renewed_at = time.monotonic()
        return held

    def release_lease(self) -> None:
        locks = self.tables.locks
        try:
            with self._lock_engine.begin() as conn:
                conn.execute(
                    sa.delete(locks).where(locks.c.name == MAINTENANCE_LOCK, locks.c.holder == self.holder)
                )
        except Exception as exc:
            log.warning("could not release the maintenance lease: %s", describe_error(exc))
        self._held = False

    def _renew_if_due(self) -> bool:
        """Between retention batches: renew once a third of the lease has passed; False if it was lost."""
        if time.monotonic() - self._renewed_at < self.lease_seconds / 3:
            return True
        locks = self.tables.locks
        with self._lock_engine.begin() as conn:
            renewed = conn.execute(
                sa.update(locks)
                .where(locks.c.name == MAINTENANCE_LOCK, locks.c.holder == self.holder)
                .values(expires_at=utcnow() + dt.timedelta(seconds=self.lease_seconds))
            ).rowcount
        self._held = bool(renewed)
        if renewed:
            self._renewed_at = time.monotonic()
        else:
            log.warning("relay %s lost the maintenance lease during retention; stopping the run", self.holder)
        return self._held

    # -- retention ---------------------------------------------------------------------------------------

    def apply_retention(self, *, now: dt.datetime | None = None) -> RetentionRun:
        """Delete delivered messages older than ``retention``, in batches (:mod:`relay._retention`).

        Call it only while holding the lease (the thread does); it stops early on stop, on a lost lease,
        or after ``max_batches`` (``incomplete``).
        """
        run = self._retain(delivered_batch(self.tables), now)
        self._counters.deleted_total += run.deleted
        self._counters.retention_runs += 1
        self.last_retention = run
        self._log_run(run, "delivered message(s)")
        return run

    def apply_inbox_retention(self, *, now: dt.datetime | None = None) -> RetentionRun:
        """Delete inbox rows (every consumer group's) processed longer than ``retention`` ago, in batches.

        As :meth:`apply_retention`. A message Kafka delivers again after its inbox row is gone is
        handled again: see :mod:`relay._retention`.
        """
        run = self._retain(inbox_batch(self.tables), now)
        self._counters.inbox_deleted_total += run.deleted
        self.last_inbox_retention = run
        self._log_run(run, "inbox row(s)")
        return run

    def _retain(self, batch: Batch, now: dt.datetime | None) -> RetentionRun:
        if self.retention is None:
            raise ValueError("retention is off")

        def go_on() -> bool:
            if self._stop.is_set() or not self._renew_if_due():
                return False
            return not self._stop.wait(self.batch_pause)  # let the relays' claims and marks through

        return run_retention(
            self.engine,
            batch,
            retention=self.retention,
            batch_size=self.batch_size,
            max_batches=self.max_batches,
            go_on=go_on,
            now=now,
        )

    def _log_run(self, run: RetentionRun, what: str) -> None:
        if run.deleted:
            log.info(
                "retention deleted %d %s older than %s in %d batch(es), %.1fs%s",
                run.deleted,
                what,
                run.cutoff.isoformat(timespec="seconds"),
                run.batches,
                run.seconds,
                " (more to go)" if run.incomplete else "",
            )

    # -- the stuck monitor -------------------------------------------------------------------------------

    def sweep_queued_keys(self, *, now: dt.datetime | None = None) -> int:
        """Promote the keys whose queued messages nothing holds back any more (outbox._key_queue): a
        safety net for a promotion a crash came between. Returns how many messages came back."""
        with self.engine.begin() as conn:
            promoted = self._key_queue.sweep(conn, now=now or utcnow())
        if promoted:
            log.warning(
                "maintenance: %d queued message(s) had no promotion; they are claimable again", promoted
            )
        return promoted

    def check(self, *, now: dt.datetime | None = None) -> StuckFindings:
        """Look for expired leases, overdue messages and held-back keys; keep, report and return them."""
        findings = self._monitor.check(
            now=now or utcnow(),
            stuck_after=self.stuck_after,
            lease_grace=self.lease_grace,
            limit=self.report_ids,
            reporting=self._held,
        )
        self.findings = findings
        if findings.expired_messages and self.on_expired is not None:
            self.on_expired()
        report(findings, lease_grace=self.lease_grace, stuck_after=self.stuck_after)
        for observer in self._observers:
            try:
                observer(findings)
            except Exception:
                log.exception("maintenance observer %r failed", observer)
        return findings


def as_timedelta(value: dt.timedelta | float | None) -> dt.timedelta | None:
    """A duration given as a ``timedelta`` or a number of seconds (``None`` stays ``None``)."""
    if value is None or isinstance(value, dt.timedelta):
        return value
    return dt.timedelta(seconds=value)
