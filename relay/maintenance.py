"""Built-in maintenance: retention cleanup and the stuck-message monitor, one thread per relay.

Every relay runs a :class:`Maintenance` thread (``Relay(maintenance=True)``, the default). On each tick
it takes or renews the **maintenance lease**, a row named ``maintenance`` in ``<table>_locks``; every
``interval`` seconds it then

- **monitors** (every relay, so each one's findings and metrics are current): it counts the messages in
  flight under a lease that expired more than ``lease_grace`` seconds ago (a relay died or stalled), the
  messages waiting more than ``stuck_after`` past the time they became due, and the keys whose later
  messages have waited that long behind an unfinished earlier one. The latest :class:`StuckFindings` is
  kept on :attr:`Maintenance.findings` and handed to observers (the metrics read it from there). Only the
  lease holder logs them at WARNING, with their ids, so N relays do not repeat every warning N times;
- **applies retention** (the lease holder only): delivered messages whose ``delivered_at`` is older than
  ``retention`` are deleted, ``batch_size`` rows per short transaction, with a pause between batches.

Invariants (each names the test that would catch its violation):

1. **Retention deletes delivered messages only, and only those older than ``retention``.** The DELETE
   names the rows by primary key *and* re-checks ``status = 'delivered' AND delivered_at < cutoff``, so a
   row replayed in between is kept; pending, in-flight, failed, dead and parked rows are never deleted
   (dead and parked ones wait for ``outbox replay`` or ``outbox purge``).
   -- ``tests/test_maintenance.py::test_retention_deletes_only_old_delivered_while_relays_deliver``
2. **No long locks.** Each batch is its own transaction of at most ``batch_size`` rows (found through
   the ``delivered_at`` index), so relays claiming and marking next to it wait for milliseconds, never
   for a table-sized DELETE; a run stops after ``max_batches`` and goes on at the next tick.
   -- same test (relays keep delivering while it runs)
3. **At most one relay applies retention at a time.** The lease is taken by a conditional UPDATE (``WHERE
   holder = me OR expires_at < now``) or, when the row does not exist, an INSERT that the primary key
   makes unique; the holder renews it every tick and between batches, and stops a run when a renewal
   finds it lost. A holder that dies stops renewing; another relay takes over once ``lease_seconds``
   have passed. A relay that stops releases it. -- ``tests/test_maintenance.py::
   test_one_relay_at_a_time_holds_the_maintenance_lease``
4. **The monitor changes no message.** Taking back expired leases is the claim path's job
   (:mod:`relay.claim`, invariant 4: no sweeper); when the monitor sees expired leases it wakes its
   relay's fetcher (``on_expired``) so they are claimed again now rather than at the next poll.
   -- ``tests/test_maintenance.py::test_killed_relay_lease_is_reported_and_reclaimed``

Times are the relay's clock (naive UTC), like every lease; see ``docs/guarantees.md`` about clock skew.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from outbox.dialects import is_outage
from outbox.errors import ConfigError
from outbox.schema import KEY_HOLDING, OutboxTables, Status
from outbox.writer import utcnow
from relay.publishers import describe_error

log = logging.getLogger("outbox.maintenance")

#: the row of ``<table>_locks`` that names the relay doing retention
MAINTENANCE_LOCK = "maintenance"
DEFAULT_RETENTION = dt.timedelta(days=7)
DEFAULT_STUCK_AFTER = dt.timedelta(minutes=5)
DEFAULT_INTERVAL = 60.0

_WAITING = (Status.PENDING.value, Status.FAILED.value)


@dataclass(frozen=True)
class StuckFindings:
    """What the monitor saw at ``checked_at``: the input of the stuck-message warnings and metrics.

    The ``*_ids`` / ``held_keys`` tuples hold at most ``report_ids`` examples; the counts are complete.
    """

    checked_at: dt.datetime
    #: leases (claims, one per batch) expired more than ``lease_grace`` ago and not yet taken back
    expired_leases: int = 0
    #: messages in flight under those leases
    expired_messages: int = 0
    expired_ids: tuple[uuid.UUID, ...] = ()
    #: pending or failed messages waiting more than ``stuck_after`` past their due time
    stuck_messages: int = 0
    stuck_ids: tuple[uuid.UUID, ...] = ()
    #: keys whose later messages waited more than ``stuck_after`` behind an unfinished earlier one
    held_key_count: int = 0
    #: ``(key, id of the message holding it, its status)``
    held_keys: tuple[tuple[str, uuid.UUID, str], ...] = ()
    #: distinct expired leases this relay has seen since it started (a counter: it only grows)
    expired_leases_total: int = 0
    #: this relay held the maintenance lease, so it logged the findings
    reported: bool = False

    @property
    def healthy(self) -> bool:
        return not (self.expired_messages or self.stuck_messages or self.held_key_count)


@dataclass(frozen=True)
class RetentionRun:
    """One retention run: how many delivered messages older than ``cutoff`` it deleted."""

    started_at: dt.datetime
    cutoff: dt.datetime
    deleted: int
    batches: int
    seconds: float
    #: stopped at ``max_batches`` (or on stop / lost lease) with more to delete
    incomplete: bool = False


Observer = Callable[[StuckFindings], None]


@dataclass
class _Counters:
    deleted_total: int = 0
    retention_runs: int = 0
    seen_leases: set[str] = field(default_factory=set)
    expired_leases_total: int = 0


class Maintenance:
    """The maintenance thread of one relay (see the module docstring). :meth:`start`, :meth:`stop`.

    ``holder`` names this relay in the lock row. ``retention`` ``None`` (or zero) keeps delivered
    messages forever. ``lease_seconds``: how long the maintenance lease lives without renewal.
    :meth:`check` and :meth:`apply_retention` can also be called directly (tests, one-off runs).
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
        lease_seconds: float = 30.0,
        lease_grace: float = 1.0,
        batch_size: int = 2000,
        batch_pause: float = 0.05,
        max_batches: int = 100,
        report_ids: int = 10,
        on_expired: Callable[[], None] | None = None,
    ) -> None:
        keep = as_timedelta(retention)
        stuck = as_timedelta(stuck_after)
        if not (interval > 0 and lease_seconds > 0 and batch_size >= 1 and max_batches >= 1):
            raise ConfigError(
                "maintenance interval, lease_seconds, batch_size and max_batches must be positive"
            )
        if keep is not None and keep < dt.timedelta(0):
            raise ConfigError(f"retention must not be negative, got {keep}")
        if stuck is None or stuck <= dt.timedelta(0):
            raise ConfigError(f"stuck_after must be a positive duration, got {stuck}")
        self.engine = engine
        self.tables = tables
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
        #: the latest retention run (``None`` before the first, or when this relay never held the lease)
        self.last_retention: RetentionRun | None = None
        self._counters = _Counters()
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
                    if self._held and self.retention is not None:
                        run = self.apply_retention()
                        if run.incomplete and not self._stop.is_set():
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
        with self.engine.begin() as conn:
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
                with self.engine.begin() as conn:
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
            with self.engine.begin() as conn:
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
        with self.engine.begin() as conn:
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
        """Delete delivered messages older than ``retention``, in batches (see invariants 1 and 2).

        Call it only while holding the lease (the thread does); it stops early on stop, on a lost lease,
        or after ``max_batches`` (``incomplete``).
        """
        if self.retention is None:
            raise ValueError("retention is off")
        started, started_at = time.monotonic(), utcnow()
        cutoff = (now or started_at) - self.retention
        t = self.tables.messages
        old_delivered = (t.c.status == Status.DELIVERED.value, t.c.delivered_at < cutoff)
        pick = (
            sa.select(t.c.seq)
            .where(*old_delivered)
            .order_by(t.c.delivered_at)
            .limit(self.batch_size)  # the delivered_at index gives them in order: no scan
        )
        deleted = batches = 0
        more = True
        while more:
            with self.engine.begin() as conn:
                seqs = list(conn.execute(pick).scalars())
                if seqs:
                    deleted += conn.execute(sa.delete(t).where(t.c.seq.in_(seqs), *old_delivered)).rowcount
                    batches += 1
            more = len(seqs) == self.batch_size
            if not more or batches >= self.max_batches or self._stop.is_set() or not self._renew_if_due():
                break
            self._stop.wait(self.batch_pause)  # let the relays' claims and marks through
        run = RetentionRun(started_at, cutoff, deleted, batches, time.monotonic() - started, incomplete=more)
        self._counters.deleted_total += deleted
        self._counters.retention_runs += 1
        self.last_retention = run
        if deleted:
            log.info(
                "retention deleted %d delivered message(s) older than %s in %d batch(es), %.1fs%s",
                deleted,
                cutoff.isoformat(timespec="seconds"),
                batches,
                run.seconds,
                " (more to go)" if more else "",
            )
        return run

    # -- the stuck monitor -------------------------------------------------------------------------------

    def check(self, *, now: dt.datetime | None = None) -> StuckFindings:
        """Look for expired leases, overdue messages and held-back keys; keep, report and return them."""
        now = now or utcnow()
        t = self.tables.messages
        limit = self.report_ids
        expired_cut = now - dt.timedelta(seconds=self.lease_grace)
        stuck_cut = now - self.stuck_after
        expired = (t.c.status == Status.INFLIGHT.value, t.c.due_at < expired_cut)
        overdue = (t.c.status.in_(_WAITING), t.c.due_at < stuck_cut)
        w = t.alias("w")
        e = t.alias("e")
        held_back = (
            w.c.status == Status.PENDING.value,
            w.c.msg_key.is_not(None),
            w.c.due_at < stuck_cut,
            sa.select(sa.literal(1))
            .where(
                e.c.msg_key == w.c.msg_key,
                e.c.status.in_([s.value for s in KEY_HOLDING]),
                e.c.seq < w.c.seq,
            )
            .exists(),
        )
        with self.engine.connect() as conn:
            leases = conn.execute(
                sa.select(t.c.lease_token, sa.func.count()).where(*expired).group_by(t.c.lease_token)
            ).all()
            expired_ids = _ids(conn, sa.select(t.c.id).where(*expired).order_by(t.c.due_at).limit(limit))
            stuck = conn.execute(sa.select(sa.func.count()).where(*overdue)).scalar_one()
            stuck_ids = (
                _ids(conn, sa.select(t.c.id).where(*overdue).order_by(t.c.due_at).limit(limit))
                if stuck
                else ()
            )
            held_count = conn.execute(
                sa.select(sa.func.count(sa.distinct(w.c.msg_key))).where(*held_back)
            ).scalar_one()
            held: list[tuple[str, uuid.UUID, str]] = []
            if held_count:
                keys = conn.execute(
                    sa.select(w.c.msg_key).where(*held_back).group_by(w.c.msg_key).limit(limit)
                ).scalars()
                for key in list(keys):
                    first = conn.execute(
                        sa.select(t.c.id, t.c.status)
                        .where(t.c.msg_key == key, t.c.status.in_([s.value for s in KEY_HOLDING]))
                        .order_by(t.c.seq)
                        .limit(1)
                    ).first()
                    if first is not None:
                        held.append((str(key), first.id, str(first.status)))
        tokens = {str(token) for token, _ in leases if token is not None}
        counters = self._counters
        counters.expired_leases_total += len(tokens - counters.seen_leases)
        counters.seen_leases = tokens  # only the current ones: a taken-back lease never comes back
        findings = StuckFindings(
            checked_at=now,
            expired_leases=len(leases),
            expired_messages=sum(int(n) for _, n in leases),
            expired_ids=expired_ids,
            stuck_messages=int(stuck),
            stuck_ids=stuck_ids,
            held_key_count=int(held_count),
            held_keys=tuple(held),
            expired_leases_total=counters.expired_leases_total,
            reported=self._held,
        )
        self.findings = findings
        if findings.expired_messages and self.on_expired is not None:
            self.on_expired()
        self._report(findings)
        for observer in self._observers:
            try:
                observer(findings)
            except Exception:
                log.exception("maintenance observer %r failed", observer)
        return findings

    def _report(self, f: StuckFindings) -> None:
        level = logging.WARNING if f.reported else logging.DEBUG
        if f.expired_messages:
            log.log(
                level,
                "%d message(s) in flight under %d lease(s) that expired more than %gs ago (a relay died "
                "or stalled); relays take them back by themselves: %s",
                f.expired_messages,
                f.expired_leases,
                self.lease_grace,
                _shown(f.expired_ids, f.expired_messages),
            )
        if f.stuck_messages:
            log.log(
                level,
                "%d message(s) waiting more than %s past their due time (are relays running and keeping "
                "up?): %s",
                f.stuck_messages,
                _span(self.stuck_after),
                _shown(f.stuck_ids, f.stuck_messages),
            )
        if f.held_key_count:
            log.log(
                level,
                "%d key(s) held back for more than %s by an unfinished earlier message: %s",
                f.held_key_count,
                _span(self.stuck_after),
                _shown([f"{key} (by {mid}, {status})" for key, mid, status in f.held_keys], f.held_key_count),
            )


def as_timedelta(value: dt.timedelta | float | None) -> dt.timedelta | None:
    """A duration given as a ``timedelta`` or a number of seconds (``None`` stays ``None``)."""
    if value is None or isinstance(value, dt.timedelta):
        return value
    return dt.timedelta(seconds=value)


def _ids(conn: sa.Connection, query: sa.Select[Any]) -> tuple[uuid.UUID, ...]:
    return tuple(conn.execute(query).scalars())


def _shown(items: Sequence[object], total: int) -> str:
    text = ", ".join(str(item) for item in items)
    return text + (f" and {total - len(items)} more" if total > len(items) else "")


def _span(delta: dt.timedelta) -> str:
    seconds = delta.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
