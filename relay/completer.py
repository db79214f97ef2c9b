"""Completing: what the publishers report becomes the rows' new state, written in bulk.

The relay's **completer** thread takes the outcomes the publishers report (each delivery's exactly once)
and writes them, as many as are waiting, in a few statements: one fenced UPDATE per lease for the
delivered rows (:meth:`relay.claim.ClaimQueries.mark_delivered`: a row whose lease was taken over is
left alone and counted as fenced), one per lease for the failed rows (their retry policy decides:
``failed`` with a retry time, or ``dead``, or ``parked`` for a key of a strict-order topic), and one per
lease and pause for the released ones. Every 1/3 of the lease it renews the leases of what is still in
flight (and SQLite's relay lock with them); every 0.2 s it asks the publishers to enforce their
timeouts.

Rules it keeps:

- an outcome is written at most once, and a row stays counted in flight (:class:`InFlight`) until its
  outcome is written, so that the fetcher's window is never larger than ``max_in_flight``;
- each statement is committed on its own (autocommit, but on SQLite), so a retry after an outage goes on
  from the first statement not done; a database that stays away past the stop's deadline leaves the
  rest unwritten: their leases expire and they are delivered again (at least once);
- a recorded outcome of a keyed message, or any release, wakes the fetcher: the key's next message, or
  the released row, can be claimed at once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import queue
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa

from outbox.schema import Status
from outbox.writer import utcnow
from relay.claim import ClaimQueries, Failure
from relay.observers import Observers, RecordedOutcome, Result, failure_result
from relay.outages import OutageRetry
from relay.publishers import Delivered, Delivery, Failed, Outcome, Released, describe_error
from relay.single_relay import SingleRelayLock

log = logging.getLogger("outbox.relay")

#: a lease-write connection idle longer than this goes back to the pool (whose pre-ping checks the next)
LEASE_CONNECTION_IDLE = 10.0
#: outcomes written together at most
MAX_OUTCOMES_PER_WRITE = 5000


class InFlight:
    """The relay's window: the messages claimed and not yet recorded, by lease token.

    The fetcher adds each claimed batch and waits on :attr:`room` when the window is full; the completer
    removes what it has recorded and sets :attr:`room`.
    """

    def __init__(self) -> None:
        self._by_lease: dict[str, set[int]] = {}
        self._lock = threading.Lock()
        #: set whenever messages leave the window (and by a stopping relay)
        self.room = threading.Event()

    def count(self) -> int:
        with self._lock:
            return sum(len(seqs) for seqs in self._by_lease.values())

    def add(self, token: str, seqs: Iterable[int]) -> None:
        with self._lock:
            self._by_lease[token] = set(seqs)

    def remove(self, deliveries: Iterable[Delivery]) -> None:
        with self._lock:
            for delivery in deliveries:
                seqs = self._by_lease.get(delivery.token)
                if seqs is not None:
                    seqs.discard(delivery.seq)
                    if not seqs:
                        del self._by_lease[delivery.token]
        self.room.set()

    def leases(self) -> list[str]:
        """The lease tokens with messages still in flight."""
        with self._lock:
            return [token for token, seqs in self._by_lease.items() if seqs]


class LeaseWrites:
    """Connections for statements each atomic on its own: the completer's marks and renewals.

    Autocommit, but for SQLite's one relay (a transaction). The completer keeps one connection for
    them: taking an autocommit connection from the pool and giving it back switches the session's
    mode twice, three more round trips per write on MariaDB (a 7 % slower drain here).
    """

    def __init__(self, engine: sa.Engine, autocommit: sa.Engine | None) -> None:
        self.engine = engine
        self.autocommit = autocommit
        self._held: sa.Connection | None = None
        self._used = 0.0

    @contextlib.contextmanager
    def connection(self) -> Iterator[sa.Connection]:
        if self.autocommit is None:
            with self.engine.begin() as tx:
                yield tx
            return
        held = self._held
        now = time.monotonic()
        if held is not None and (held.invalidated or now - self._used > LEASE_CONNECTION_IDLE):
            self.close()  # idle a while: the pool's pre-ping checks a fresh one
            held = None
        if held is None:
            held = self._held = self.autocommit.connect()
        self._used = now
        try:
            yield held
        except BaseException:
            self.close()  # broken, or in a state nobody should guess: take a new one
            raise

    def close(self) -> None:
        conn, self._held = self._held, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


class Completer:
    """Records outcomes for one relay (see the module docstring); :meth:`run` is its thread's body."""

    def __init__(
        self,
        *,
        claims: ClaimQueries,
        lease_writes: LeaseWrites,
        db: OutageRetry,
        in_flight: InFlight,
        observers: Observers,
        counters: dict[str, int],
        lease_seconds: float,
        relay_lock: SingleRelayLock | None,
        publishers: Sequence[Any],
        wake: threading.Event,
        progressed: Callable[[], None],
    ) -> None:
        self.claims = claims
        self.lease_writes = lease_writes
        self.db = db
        self.in_flight = in_flight
        self.observers = observers
        self.counters = counters
        self.lease_seconds = lease_seconds
        self.relay_lock = relay_lock
        self.publishers = publishers
        self.wake = wake
        self.progressed = progressed
        self._outcomes: queue.SimpleQueue[tuple[Delivery, Outcome]] = queue.SimpleQueue()
        self._recording = 0  # outcomes being written now (taken from _outcomes)

    def report(self, delivery: Delivery, outcome: Outcome) -> None:
        """A publisher's report: ``delivery`` ended with ``outcome`` (called once per delivery)."""
        self._outcomes.put((delivery, outcome))

    def unrecorded(self) -> int:
        """Outcomes reported and not yet written: finished messages still counted in flight."""
        return self._outcomes.qsize() + self._recording

    def run(self, publishers_stopped: threading.Event, past_deadline: Callable[[], bool]) -> None:
        """Write outcomes until the publishers have stopped and every outcome is written; during an
        outage at stop, give up once ``past_deadline()``."""
        _leave_signals_to_other_threads()
        renew_every = self.lease_seconds / 3
        next_renew = time.monotonic() + renew_every
        next_timeout_check = time.monotonic() + 0.2
        while True:
            batch = self._take()
            if batch:
                self._recording = len(batch)
                self._write(batch, past_deadline)
                self._recording = 0
            now = time.monotonic()
            if now >= next_timeout_check:
                for publisher in self.publishers:
                    publisher.check_timeouts(self.report)
                next_timeout_check = now + 0.2
            if now >= next_renew and not publishers_stopped.is_set():
                self._renew_leases()
                next_renew = time.monotonic() + renew_every
            if publishers_stopped.is_set() and self._outcomes.empty():
                self.lease_writes.close()
                return

    def _take(self) -> list[tuple[Delivery, Outcome]]:
        try:
            first = self._outcomes.get(timeout=0.05)
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < MAX_OUTCOMES_PER_WRITE:
            try:
                batch.append(self._outcomes.get_nowait())
            except queue.Empty:
                break
        return batch

    def _write(self, batch: list[tuple[Delivery, Outcome]], past_deadline: Callable[[], bool]) -> None:
        delivered: dict[str, list[int]] = defaultdict(list)
        released: dict[tuple[str, float], list[int]] = defaultdict(list)
        failures: dict[str, list[Failure]] = defaultdict(list)
        counts: dict[str, int] = defaultdict(int)
        recorded: list[RecordedOutcome] = []
        watched = bool(self.observers.observers)
        now = utcnow()
        for delivery, outcome in batch:
            result: Result
            if isinstance(outcome, Delivered):
                counts["delivered"] += 1
                result = "delivered"
                if not outcome.marked:
                    delivered[delivery.token].append(delivery.seq)
            elif isinstance(outcome, Released):
                counts["released"] += 1
                result = "released"
                released[(delivery.token, outcome.retry_after)].append(delivery.seq)
            else:
                failure = self._failure(delivery, outcome, now)
                counts["dead" if failure.retry_at is None else "failed"] += 1
                result = failure_result(failure.status)
                failures[delivery.token].append(failure)
            if watched:
                recorded.append(RecordedOutcome(delivery, outcome, result))

        fenced = 0

        def write() -> None:
            # Each statement is committed when it returns (autocommit), so a retry after an outage goes
            # on from the first one not done: one already done would find its rows gone from the lease
            # and count them as fenced off.
            nonlocal fenced
            with self.lease_writes.connection() as conn:
                for token, seqs in list(delivered.items()):
                    fenced += len(seqs) - self.claims.mark_delivered(conn, token, seqs, now=now)
                    del delivered[token]
                for token, items in list(failures.items()):
                    self.claims.mark_failed(conn, token, items)
                    del failures[token]
                for (token, pause), seqs in list(released.items()):
                    self.claims.release(conn, token, seqs, due_at=now + dt.timedelta(seconds=pause))
                    del released[(token, pause)]

        try:
            self.db.run(write, give_up=past_deadline)
        except Exception:
            left = sum(map(len, delivered.values())) + sum(map(len, failures.values()))
            left += sum(map(len, released.values()))
            log.exception(
                "could not record %d outcome(s); their leases will expire and they will be retried", left
            )
        if fenced:
            log.warning("%d delivered mark(s) were fenced off: their lease had been taken over", fenced)
        self.counters["fenced"] += fenced
        for key, value in counts.items():
            self.counters[key] += value
        if log.isEnabledFor(logging.DEBUG):
            summary = ", ".join(f"{name} {n}" for name, n in counts.items())
            log.debug("recorded %d outcome(s): %s", len(batch), summary)
        if watched:
            self.observers.on_outcomes(recorded)
        if fenced:
            self.observers.on_fenced(fenced)
        self.in_flight.remove(delivery for delivery, _ in batch)
        self.progressed()
        if released or any(d.message.key is not None for d, _ in batch):
            self.wake.set()  # the next message of those keys (or the released rows) can be claimed now

    def _failure(self, delivery: Delivery, outcome: Failed, now: dt.datetime) -> Failure:
        policy = delivery.policy
        attempt = delivery.message.attempt
        if outcome.permanent or policy.retry.exhausted(attempt):
            status = Status.PARKED if policy.strict_order and delivery.message.key else Status.DEAD
            log.warning(
                "message %s (%s) is %s after %d attempt(s): %s",
                delivery.message.id,
                delivery.message.topic,
                status.value,
                attempt,
                outcome.error,
            )
            return Failure(delivery.seq, status, None, outcome.error)
        retry_at = now + policy.retry.delay_after(attempt)
        log.warning(
            "message %s (%s) attempt %d failed, retry at %s: %s",
            delivery.message.id,
            delivery.message.topic,
            attempt,
            retry_at.isoformat(timespec="seconds"),
            outcome.error,
        )
        return Failure(delivery.seq, Status.FAILED, retry_at, outcome.error)

    def _renew_leases(self) -> None:
        tokens = self.in_flight.leases()
        if not tokens and self.relay_lock is None:
            return
        until = utcnow() + dt.timedelta(seconds=self.lease_seconds)

        def renew() -> None:
            with self.lease_writes.connection() as conn:
                for token in tokens:
                    self.claims.renew(conn, token, lease_until=until)
                if self.relay_lock is not None:
                    self.relay_lock.renew(conn)

        try:
            self.db.run(renew, give_up=lambda: True)
        except Exception as exc:
            log.warning("could not renew leases: %s", describe_error(exc))


#: signals an application or the CLI may handle (Python runs every handler in the main thread anyway)
_HANDLED_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD")
    if hasattr(signal, name)
)


def _leave_signals_to_other_threads() -> None:
    """Block the usual signals in the calling thread, so that the kernel delivers them to another.

    For the completer: CPython 3.11's ``SimpleQueue.get(timeout)``, interrupted by a signal, retries
    with the time left, and when none is left (the process was frozen inside the wait, then sent
    SIGTERM as it resumed) waits with no timeout at all: the completer then never saw the stop, and
    ``stop()`` never returned (tests/test_crash.py::
    test_relay_frozen_taking_the_maintenance_lease_holds_no_lock, about one run in four).
    """
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED_SIGNALS)
