"""How ``outbox consume`` finishes one Kafka record: the handler's attempts, the inbox, the dead letters.

:class:`RecordProcessor` is the database side of :mod:`consumers._kafka` (it knows SQL and nothing of
kafka-python; the runner polls, commits offsets and calls :meth:`RecordProcessor.process` for each
record, in partition order). A record is *finished* when :meth:`~RecordProcessor.process` returns:

- **handled**: a session handler's transaction committed together with the group's inbox row; a
  handler without a session returned and its inbox row was then written;
- **duplicate**: the group's inbox already has the message id, so the handler did not run;
- **dead-lettered**: the last attempt failed (or the record cannot be read, or has no handler) and the
  record was written to the dead letters.

Each attempt is run by :func:`consumers.attempt.run_attempt`, the relay's attempt runner too: whatever
the handler raises, ``BaseException`` included (``sys.exit()``), fails the attempt, never the
consumer. A failing attempt is retried in place under the topic's policy (``max_attempts``, backoff); a
handler running past its ``timeout`` fails its attempt and is interrupted (a session handler's
transaction is then rolled back); one blocked where Python cannot interrupt it (in C) is abandoned on
its thread (:meth:`RecordProcessor.stuck_count`) and the consumer goes on. When the database is
unreachable (:func:`outbox._dialects.is_outage`) during a session handler's transaction, the inbox check
or a dead-letter write, the processor waits (backoff up to :data:`OUTAGE_BACKOFF_MAX` seconds) and tries
again: an outage is never an attempt and never dead-letters a record. When the runner stops meanwhile,
:class:`Stopping` is raised instead and the record stays unfinished (its offset is not committed).

Each attempt runs the handler inside a CONSUMER span (:func:`outbox._tracing.process_span`), child of
the record's ``traceparent``. With :class:`~consumers._metrics.ConsumerMetrics`, every attempt, finished
record and outage wait is counted there, labelled with the record's Kafka topic.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import orm

from consumers._dead_letters import DeadLetters
from consumers._inbox import Inbox
from consumers._records import KafkaRecord, UndecodableRecord, message_from_record, message_id_of
from consumers._registry import Handler, Registry
from consumers.attempt import (
    HANDOFF_GRACE,
    AttemptResult,
    Handled,
    Interruption,
    Outage,
    RolledBack,
    Skipped,
    Transaction,
    describe_error,
    run_attempt,
)
from outbox._dialects import is_outage
from outbox._errors import ConfigError
from outbox._message import Message
from outbox._policy import TopicPolicy
from outbox._schema import OutboxTables

if TYPE_CHECKING:
    from consumers._metrics import ConsumerMetrics, RecordResult

log = logging.getLogger("outbox.consumer")
T = TypeVar("T")

#: longest wait between two tries while the database is unreachable
OUTAGE_BACKOFF_MAX = 5.0


# --- what one attempt came to ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Done:
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class _Failed:
    error: str


@dataclass(frozen=True, slots=True)
class _Outage:
    error: str


_Outcome = _Done | _Failed | _Outage
_HANDLED = _Done()
_DUPLICATE = _Done(duplicate=True)


def _outcome(result: AttemptResult) -> _Outcome:
    """What an attempt's result means for a record."""
    if isinstance(result, Handled):
        return _HANDLED
    if isinstance(result, Skipped):
        return _DUPLICATE  # the inbox already had it
    if isinstance(result, Outage):
        return _Outage(result.error)
    if isinstance(result, RolledBack):
        return _Failed(result.reason)
    return _Failed(result.error)


class Counters(dict[str, int]):
    """The runner's counters, added to by several partition workers at once (:meth:`add` is atomic)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__(dict.fromkeys(names, 0))
        self._lock = threading.Lock()

    def add(self, name: str, count: int = 1) -> None:
        with self._lock:
            self[name] += count


class Stopping(Exception):
    """The runner is stopping: the current record is left unfinished (its offset is not committed)."""


class RecordProcessor:
    """Finishes records for one consumer group (see the module docstring).

    ``engine`` ``None``: no inbox and no dead letters (session handlers are refused, a record out of
    attempts is logged and skipped). ``stopping`` cuts waits short (raising :class:`Stopping`);
    ``before_wait`` is called before a retry's backoff (the runner commits what is finished);
    ``counters`` is the runner's, updated in place; ``metrics``, when given, are told of every attempt,
    finished record and outage wait.
    """

    def __init__(
        self,
        engine: sa.Engine | None,
        registry: Registry,
        *,
        group: str,
        tables: OutboxTables,
        default_policy: TopicPolicy,
        stopping: threading.Event,
        counters: Counters,
        before_wait: Callable[[], None] = lambda: None,
        metrics: ConsumerMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.group = group
        self.default_policy = default_policy
        self.counters = counters
        self.metrics = metrics
        self.stopping = stopping
        self._before_wait = before_wait
        self._sessions = orm.sessionmaker(engine) if engine is not None else None
        self.inbox = Inbox(tables, group) if engine is not None else None
        self._dead_letters = DeadLetters(tables)
        self._outage_logged = False
        #: handler threads abandoned after a timeout, still running (see stuck_count)
        self._abandoned: list[threading.Thread] = []

    def process(self, record: KafkaRecord, *, failed_in_batch: str | None = None) -> None:
        """Finish ``record`` (handled, duplicate, dead-lettered); :class:`Stopping` if stopped first.

        ``failed_in_batch``: the error of the record's first attempt, made in a batch
        (:mod:`consumers._batches`, which counted it as received): the next attempt is the second.
        """
        if failed_in_batch is None:
            self.counters.add("received")
        try:
            message = message_from_record(record)
        except UndecodableRecord as exc:
            self._dead_letter(record, message_id_of(record), f"UndecodableRecord: {exc}", attempts=0)
            return
        handler = self.registry.route(message.topic) or self.registry.route(record.topic)
        if handler is None:
            error = f"no handler for topic {message.topic}"
            self._dead_letter(record, message.id, error, attempts=0, message=message)
            return
        if handler.takes_session:
            if self._sessions is None:
                raise ConfigError(f"handler {handler.name} takes a session: the consumer needs a database")
            outcome, attempts = self._retry(record, message, handler, self._in_transaction, failed_in_batch)
        else:
            if self._already_processed(message):
                outcome, attempts = _DUPLICATE, 0
            else:
                outcome, attempts = self._retry(record, message, handler, self._plain, failed_in_batch)
                if outcome == _HANDLED:
                    self._record_processed(message)
        if isinstance(outcome, _Failed):
            self._dead_letter(record, message.id, outcome.error, attempts=attempts, message=message)
        elif outcome.duplicate:
            self.skipped(record, message)
        else:
            self.counters.add("handled")
            self.finished(record, "handled", message)

    def _retry(
        self,
        record: KafkaRecord,
        message: Message,
        handler: Handler,
        attempt_with: Callable[[Message, Handler, threading.Event, Interruption | None], _Outcome],
        failed_first: str | None = None,
    ) -> tuple[_Done | _Failed, int]:
        """Attempts under the topic's policy: ``(outcome, attempts made)``; outages are not attempts.

        ``failed_first``: the first attempt was made (in a batch) and failed with that error.
        """
        policy = handler.policy(self.default_policy)
        attempt = 1
        outage_wait = 0.2
        if failed_first is not None:
            if (give_up := self._after_failure(message, policy, attempt, failed_first)) is not None:
                return _Failed(failed_first), give_up
            attempt += 1
        while True:
            started = time.monotonic()
            outcome = self._run(
                functools.partial(attempt_with, dataclasses.replace(message, attempt=attempt), handler),
                policy.timeout,
            )
            if self.metrics is not None and outcome != _DUPLICATE and not isinstance(outcome, _Outage):
                # an attempt is a run of the handler: not an inbox hit, not a database outage
                failed = isinstance(outcome, _Failed)
                self.metrics.attempt(record.topic, time.monotonic() - started, failed=failed)
            if isinstance(outcome, _Done):
                self.outage_over()
                return outcome, attempt
            if isinstance(outcome, _Outage):
                self.outage(outcome.error)
                self._pause(outage_wait)
                outage_wait = min(outage_wait * 2, OUTAGE_BACKOFF_MAX)
                continue
            self.outage_over()
            if (give_up := self._after_failure(message, policy, attempt, outcome.error)) is not None:
                return outcome, give_up
            attempt += 1

    def _after_failure(self, message: Message, policy: TopicPolicy, attempt: int, error: str) -> int | None:
        """Count failed ``attempt``: the attempts made when they are exhausted, else wait its backoff."""
        self.counters.add("failed_attempts")
        if policy.retry.exhausted(attempt):
            return attempt
        delay = policy.retry.delay_after(attempt).total_seconds()
        log.warning(
            "message %s: attempt %d of %d failed (%s); retrying in %.1fs",
            message.id,
            attempt,
            policy.retry.max_attempts,
            error,
            delay,
        )
        self._before_wait()  # the runner commits what is finished so far
        self._pause(delay)
        return None

    def _run(
        self, work: Callable[[threading.Event, Interruption | None], _Outcome], timeout: float | None
    ) -> _Outcome:
        """Run one attempt; with a timeout, on a thread of its own, interrupted when late and abandoned
        when it does not stop (blocked where Python cannot interrupt it)."""
        cancelled = threading.Event()
        if timeout is None:
            return work(cancelled, None)
        interruption = Interruption()
        result: list[_Outcome] = []
        finished = threading.Event()

        def target() -> None:
            try:
                result.append(work(cancelled, interruption))
            finally:
                finished.set()

        thread = threading.Thread(target=target, name="outbox-consumer-handler", daemon=True)
        thread.start()
        if finished.wait(timeout) and result:
            return result[0]
        error = f"HandlerTimeout: handler ran longer than {timeout:g}s"
        cancelled.set()  # a session handler that returns late rolls back (never commits)
        give_up = time.monotonic() + HANDOFF_GRACE
        while not finished.is_set() and time.monotonic() < give_up:
            interruption.interrupt(error)  # again until it is armed (it may still be starting), once
            finished.wait(0.05)
        if finished.is_set() and result:
            outcome = result[0]
            # an outage or an inbox hit is not the handler's doing: not a failed attempt either
            return outcome if isinstance(outcome, _Outage) or outcome == _DUPLICATE else _Failed(error)
        self._abandoned = [t for t in self._abandoned if t.is_alive()] + [thread]
        log.warning(
            "a timed-out handler did not stop (blocked where Python cannot interrupt it, e.g. in a C call): "
            "its thread is abandoned (%d abandoned and still running)",
            len(self._abandoned),
        )
        return _Failed(error)

    def stuck_count(self) -> int:
        """Handler threads abandoned after a timeout they did not stop at, still running."""
        self._abandoned = [t for t in self._abandoned if t.is_alive()]
        return len(self._abandoned)

    def _in_transaction(
        self,
        message: Message,
        handler: Handler,
        cancelled: threading.Event,
        interruption: Interruption | None,
    ) -> _Outcome:
        assert self._sessions is not None and self.inbox is not None
        inbox, sessions = self.inbox, self._sessions

        def claim_inbox(session: orm.Session) -> str | None:
            return None if inbox.claim(session.connection(), message) else "already processed"

        def still_wanted(session: orm.Session) -> str | None:
            return "HandlerTimeout: rolled back after the timeout" if cancelled.is_set() else None

        transaction = Transaction(sessions, before=claim_inbox, before_commit=still_wanted)
        result = run_attempt(
            handler, message, transaction=transaction, interruption=interruption, system="kafka"
        )
        return _outcome(result)

    def _plain(
        self,
        message: Message,
        handler: Handler,
        cancelled: threading.Event,
        interruption: Interruption | None,
    ) -> _Outcome:
        return _outcome(run_attempt(handler, message, interruption=interruption, system="kafka"))

    def _already_processed(self, message: Message) -> bool:
        inbox, engine = self.inbox, self.engine
        if inbox is None or engine is None:
            return False

        def check() -> bool:
            with engine.connect() as conn:
                return inbox.contains(conn, message.id)

        return self.with_db(check)

    def _record_processed(self, message: Message) -> None:
        inbox, engine = self.inbox, self.engine
        if inbox is None or engine is None:
            return

        def record() -> None:
            with engine.begin() as conn:
                inbox.claim(conn, message)  # False: another consumer recorded it meanwhile; same thing

        self.with_db(record)

    def _dead_letter(
        self,
        record: KafkaRecord,
        message_id: Any,
        error: str,
        *,
        attempts: int,
        message: Message | None = None,
    ) -> None:
        log.error(
            "message %s (%s[%d]@%d) dead-lettered for group %r after %d attempt(s): %s",
            message_id,
            record.topic,
            record.partition,
            record.offset,
            self.group,
            attempts,
            error,
        )
        self.counters.add("dead_lettered")
        engine = self.engine
        if engine is None:
            log.error("no database to keep dead letters: the record is skipped")
            self.finished(record, "dead_lettered", message)
            return

        def write() -> bool:
            with engine.begin() as conn:
                return self._dead_letters.add(
                    conn,
                    group=self.group,
                    record=record,
                    message_id=message_id,
                    error=error,
                    attempts=attempts,
                )

        self.with_db(write)
        self.finished(record, "dead_lettered", message)

    # -- plumbing -----------------------------------------------------------------------------------------

    def with_db(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, waiting out database outages with backoff; raises Stopping if stopped meanwhile."""
        wait = 0.2
        while True:
            try:
                result = fn()
            except sa.exc.SQLAlchemyError as exc:
                if not is_outage(exc):
                    raise
                self.outage(describe_error(exc))
                self._pause(wait)
                wait = min(wait * 2, OUTAGE_BACKOFF_MAX)
                continue
            self.outage_over()
            return result

    def skipped(self, record: KafkaRecord, message: Message) -> None:
        """``record`` is a duplicate (its message is in the group's inbox already): counted, logged, done."""
        self.counters.add("duplicates")
        log.info(
            "message %s (%s[%d]@%d) already processed by group %r: skipped",
            message.id,
            record.topic,
            record.partition,
            record.offset,
            self.group,
        )
        self.finished(record, "duplicate", message)

    def finished(self, record: KafkaRecord, result: RecordResult, message: Message | None) -> None:
        if self.metrics is not None:
            self.metrics.finished(record.topic, result, message)

    def outage(self, error: str) -> None:
        self.counters.add("outages")
        if self.metrics is not None:
            self.metrics.outage()
        if not self._outage_logged:
            self._outage_logged = True
            log.warning("database unreachable (%s); waiting, the record is not failed", error)

    def outage_over(self) -> None:
        if self._outage_logged:
            self._outage_logged = False
            log.warning("database reachable again")

    def _pause(self, seconds: float) -> None:
        if self.stopping.wait(seconds):
            raise Stopping()
