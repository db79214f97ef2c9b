"""Completing: what the publishers report becomes the rows' new state, written in bulk.

The relay's **completer** thread takes the outcomes the publishers report (each delivery's exactly once)
and writes them, as many as are waiting, in a few statements: one fenced UPDATE per lease for the
delivered rows (:meth:`relay._claim.ClaimQueries.mark_delivered`: a row whose lease was taken over is
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
- once a key's run has been delivered (its last message), or a message of a key is dead, the key's
  queued messages are promoted (:meth:`relay._claim.ClaimQueries.promote`) after the marks that let
  them go on, in the same write;
- a recorded outcome of a keyed message, or any release, wakes the fetcher: the key's next message, or
  the released row, can be claimed at once;
- a lease's deadline (:class:`InFlight`: until when this relay knows, by its own clock, that it holds
  the lease; handlers do not start past it) moves forward only with a renewal sent while the lease was
  still live by that clock: a relay frozen past its lease does not revive it by renewing when it
  thaws. ``tests/test_crash.py::test_relay_thawed_after_its_leases_expired_starts_none_of_their_handlers``
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

from outbox._clock import utcnow
from outbox._key_queue import RunRow
from outbox._schema import Status
from relay._claim import ClaimQueries, ClaimResult, Failure
from relay._outages import OutageRetry
from relay._outcomes import RecordedOutcome, Result, failure_result
from relay._single_relay import SingleRelayLock
from relay._topics import Topics
from relay.observers import Observers
from relay.publishers import Delivered, Delivery, Failed, Outcome, Released, describe_error

log = logging.getLogger("outbox.relay")

#: a lease-write connection idle longer than this goes back to the pool (whose pre-ping checks the next)
LEASE_CONNECTION_IDLE = 10.0
#: outcomes written together at most
MAX_OUTCOMES_PER_WRITE = 5000


class InFlight:
    """The relay's window: the messages claimed and not yet recorded, by lease token.

    The fetcher adds each claimed batch and waits on :attr:`room` when the window is full; the completer
    removes what it has recorded and sets :attr:`room`. Each lease also has its **deadline**: the
    monotonic time until which this relay knows it holds it, by its own clock (the claim's start, or a
    renewal's, plus ``lease_seconds`` less :func:`lease_margin`); a handler does not start past it.
    """

    def __init__(self) -> None:
        self._by_lease: dict[str, set[int]] = {}
        self._deadlines: dict[str, float] = {}
        self._bytes = 0  # payload bytes in flight
        self._lock = threading.Lock()
        #: set whenever messages leave the window (and by a stopping relay)
        self.room = threading.Event()

    def count(self) -> int:
        with self._lock:
            return sum(len(seqs) for seqs in self._by_lease.values())

    def add(
        self, token: str, seqs: Iterable[int], *, deadline: float = float("inf"), nbytes: int = 0
    ) -> None:
        with self._lock:
            self._by_lease[token] = set(seqs)
            self._deadlines[token] = deadline
            self._bytes += nbytes

    def bytes(self) -> int:
        """Payload bytes of the messages in flight."""
        return self._bytes

    def remove(self, deliveries: Iterable[Delivery]) -> None:
        with self._lock:
            for delivery in deliveries:
                seqs = self._by_lease.get(delivery.token)
                if seqs is not None and delivery.seq in seqs:
                    self._bytes -= len(delivery.message.body)
                    seqs.discard(delivery.seq)
                    if not seqs:
                        del self._by_lease[delivery.token]
                        self._deadlines.pop(delivery.token, None)
        self.room.set()

    def token_of(self, seq: int) -> str | None:
        """The lease token under which row ``seq`` is in this relay's window (None: it is not)."""
        with self._lock:
            for token, seqs in self._by_lease.items():
                if seq in seqs:
                    return token
        return None

    def leases(self) -> list[str]:
        """The lease tokens with messages still in flight."""
        with self._lock:
            return [token for token, seqs in self._by_lease.items() if seqs]

    def deadline(self, token: str) -> float:
        """Until when (monotonic) this relay knows it holds lease ``token``; -inf once it left the window."""
        return self._deadlines.get(token, float("-inf"))

    def renewed(self, tokens: Iterable[str], sent_at: float, lease_seconds: float) -> None:
        """A renewal of ``tokens`` sent at ``sent_at`` (monotonic) succeeded: push their deadlines forward.

        Only a lease still live by this relay's clock when the renewal was sent is pushed: one that had
        expired may have been taken over by another relay meanwhile, and the renewal (which changes only
        the rows still under the token) cannot tell this relay which of its rows are still its own.
        """
        deadline = sent_at + lease_seconds - lease_margin(lease_seconds)
        with self._lock:
            for token in tokens:
                if self._deadlines.get(token, float("-inf")) >= sent_at:
                    self._deadlines[token] = deadline


def lease_margin(lease_seconds: float) -> float:
    """How much earlier than its expiry a lease counts as lost: a sixth of it (the claim or renewal's
    own round trip, a scheduling delay). Renewals, every third of the lease, keep it well ahead."""
    return lease_seconds / 6


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

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        """A transaction of its own, for writes that must commit together (not while
        :meth:`connection` is open: on SQLite the two would wait on each other's write lock)."""
        with self.engine.begin() as tx:
            yield tx

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
        promoted: Callable[[Iterable[str]], None] = lambda keys: None,
        room: Callable[[], tuple[int, int]] | None = None,
        kept: Callable[[ClaimResult, float], bool] | None = None,
        topics: Callable[[], Topics | None] = lambda: None,
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
        #: told the keys whose queued rows a promotion brought back (relay._dispatch: contended keys)
        self.promoted = promoted
        #: kept runs (relay._claim, invariant 13): the room left in the relay's window (messages, bytes);
        #: None: a run's end promotes its key, it keeps nothing
        self.room = room
        #: hands kept rows to the fetcher as a claim of their own, with the monotonic time of their
        #: lease's start; False once the relay stops claiming (the rows are then released at once)
        self.kept = kept
        #: the topics the relay routes (relay._claim, invariant 15): a kept run stops at another one
        self.topics = topics
        # outcomes to write, each with the event to set once its write is over (None: nobody waits)
        self._outcomes: queue.SimpleQueue[tuple[Delivery, Outcome, threading.Event | None]] = (
            queue.SimpleQueue()
        )
        self._recording = 0  # outcomes being written now (taken from _outcomes)
        self._thread: int | None = None  # the ident of the thread in run()

    def report(self, delivery: Delivery, outcome: Outcome) -> None:
        """A publisher's report: ``delivery`` ended with ``outcome`` (called once per delivery)."""
        self._outcomes.put((delivery, outcome, None))

    def report_and_wait(self, delivery: Delivery, outcome: Outcome) -> None:
        """:meth:`report`, then wait until the outcome's write is over (committed, or given up after
        an outage), at most one lease: a message taken back from an expired lease must have its
        outcome durable before the next one starts (``relay._claim``, invariant 10), or a relay killed
        by that next one would count a second attempt for it."""
        if threading.get_ident() == self._thread:  # the timeout check's report: it would wait on itself
            self.report(delivery, outcome)
            return
        written = threading.Event()
        self._outcomes.put((delivery, outcome, written))
        written.wait(self.lease_seconds)

    def unrecorded(self) -> int:
        """Outcomes reported and not yet written: finished messages still counted in flight."""
        return self._outcomes.qsize() + self._recording

    def run(self, publishers_stopped: threading.Event, past_deadline: Callable[[], bool]) -> None:
        """Write outcomes until the publishers have stopped and every outcome is written; during an
        outage at stop, give up once ``past_deadline()``."""
        _leave_signals_to_other_threads()
        self._thread = threading.get_ident()
        renew_every = self.lease_seconds / 3
        next_renew = time.monotonic() + renew_every
        next_timeout_check = time.monotonic() + 0.2
        while True:
            taken = self._take()
            if taken:
                self._recording = len(taken)
                try:
                    self._write([(delivery, outcome) for delivery, outcome, _ in taken], past_deadline)
                finally:
                    self._recording = 0
                    for _, _, written in taken:
                        if written is not None:
                            written.set()
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

    def _take(self) -> list[tuple[Delivery, Outcome, threading.Event | None]]:
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
        delivered: dict[tuple[str, bool], list[int]] = defaultdict(list)
        released: dict[tuple[str, float], list[int]] = defaultdict(list)
        failures: dict[str, list[Failure]] = defaultdict(list)
        # Rows after which their key may go on (a run's end delivered, a keyed row dead): their mark and
        # the promotion of their key's queued rows commit together (ClaimQueries.promote), so that no
        # crash can come between them and leave the key's queued rows waiting for the safety net.
        key_ends: dict[tuple[str, bool], list[int]] = defaultdict(list)
        key_deaths: dict[str, list[Failure]] = defaultdict(list)
        finished_keys: list[int] = []
        key_went_on = False  # a key's run ended or a keyed row failed: its next rows may be claimable now
        counts: dict[str, int] = defaultdict(int)
        recorded: list[RecordedOutcome] = []
        watched = bool(self.observers.observers)
        now = utcnow()
        for delivery, outcome in batch:
            result: Result
            if isinstance(outcome, Delivered):
                counts["delivered"] += 1
                result = "delivered"
                ends_a_run = delivery.run_end and delivery.message.key is not None
                key_went_on = key_went_on or ends_a_run
                if not outcome.marked:  # else: marked, and promoted, in the handler's transaction
                    lease = (delivery.token, delivery.counted)
                    (key_ends if ends_a_run else delivered)[lease].append(delivery.seq)
                    if ends_a_run:
                        finished_keys.append(delivery.seq)
            elif isinstance(outcome, Released):
                counts["released"] += 1
                result = "released"
                released[(delivery.token, outcome.retry_after)].append(delivery.seq)
            else:
                failure = self._failure(delivery, outcome, now)
                counts["dead" if failure.retry_at is None else "failed"] += 1
                result = failure_result(failure.status)
                key_went_on = key_went_on or delivery.message.key is not None
                if failure.status is Status.DEAD and delivery.message.key is not None:
                    key_deaths[delivery.token].append(failure)
                    finished_keys.append(delivery.seq)
                else:
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
                for (token, counted), seqs in list(delivered.items()):
                    marked = self.claims.mark_delivered(conn, token, seqs, now=now, counted=counted)
                    fenced += len(seqs) - marked
                    del delivered[(token, counted)]
                for token, items in list(failures.items()):
                    self.claims.mark_failed(conn, token, items)
                    del failures[token]
                for (token, pause), seqs in list(released.items()):
                    self.claims.release(conn, token, seqs, due_at=now + dt.timedelta(seconds=pause))
                    del released[(token, pause)]
            if finished_keys or key_ends:
                # one transaction: these marks, then the promotion that reads them (a relay frozen
                # inside it holds only finished rows and queued ones, which no claim takes)
                with self.lease_writes.transaction() as tx:
                    for (token, counted), seqs in key_ends.items():
                        marked = self.claims.mark_delivered(tx, token, seqs, now=now, counted=counted)
                        fenced += len(seqs) - marked
                    for token, items in key_deaths.items():
                        self.claims.mark_failed(tx, token, items)
                    runs = self.claims.key_queue.queued_runs(tx, finished_keys)
                    began = time.monotonic()
                    kept, rest = self._keep(tx, runs)
                    self.claims.key_queue.promote_runs(tx, rest.values(), now=now)
                if runs:  # keys whose rows were queued: another relay's claim may queue them again
                    self.promoted(runs)
                key_ends.clear()
                key_deaths.clear()
                finished_keys.clear()
                if kept and not (self.kept is not None and self.kept(kept, began)):
                    with self.lease_writes.connection() as conn:  # the relay stops: give them back
                        self.claims.release(conn, kept[0].token, [r.seq for r in kept], due_at=now)

        try:
            self.db.run(write, give_up=past_deadline)
        except Exception:
            left = sum(map(len, delivered.values())) + sum(map(len, failures.values()))
            left += sum(map(len, key_ends.values())) + sum(map(len, key_deaths.values()))
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
        if counts.get("released") or key_went_on:  # (`released` itself is emptied as it is written)
            # the next rows of those keys (promoted, or due behind the finished row) or the released
            # rows can be claimed now; a delivery inside a run frees nothing (its run hands out the next)
            self.wake.set()

    def _keep(
        self, tx: sa.Connection, runs: dict[str, list[RunRow]]
    ) -> tuple[ClaimResult, dict[str, list[RunRow]]]:
        """Kept runs (relay._claim, invariant 13): of the keys' queued runs ``runs``, those this relay
        takes itself, within the room left in its window; and the runs left to promote."""
        if not runs or self.room is None:
            return ClaimResult(), runs
        count, nbytes = self.room()
        if count <= 0 or nbytes <= 0:
            return ClaimResult(), runs
        return self.claims.take_queued(
            tx,
            runs,
            limit=count,
            max_bytes=nbytes,
            lease_seconds=self.lease_seconds,
            now=utcnow(),
            topics=self.topics(),
        )

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
            return Failure(delivery.seq, status, None, outcome.error, attempt)
        retry_at = now + policy.retry.delay_after(attempt)
        log.warning(
            "message %s (%s) attempt %d failed, retry at %s: %s",
            delivery.message.id,
            delivery.message.topic,
            attempt,
            retry_at.isoformat(timespec="seconds"),
            outcome.error,
        )
        return Failure(delivery.seq, Status.FAILED, retry_at, outcome.error, attempt)

    def _renew_leases(self) -> None:
        tokens = self.in_flight.leases()
        if not tokens and self.relay_lock is None:
            return
        sent_at = time.monotonic()
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
            return
        self.in_flight.renewed(tokens, sent_at, self.lease_seconds)


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
