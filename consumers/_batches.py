"""Batches: the records of one partition finished many to a database transaction.

:class:`BatchProcessor` is what a partition worker (:mod:`consumers._partitions`) calls with the records
of one partition, in offset order. Consecutive records whose handler can run in a batch (it routes, the
value decodes, and the topic's policy sets no timeout) are finished together, at most
``batch_records`` at a time, in **one transaction**: the inbox is asked for all of their ids in one
query, the handlers run in order (a session handler in the batch's session, its work flushed), the
inbox rows of every handled record are inserted in one statement, then one commit. The runner commits
the Kafka offsets after that commit. A record that cannot run in a batch is finished alone by
:meth:`consumers._processing.RecordProcessor.process`, in its place in the order.

A handler that fails in a batch is isolated, by ``isolation``:

- ``redo`` (the default: several times faster than savepoints on PostgreSQL, see BENCHMARKS.md,
  "Figures behind the code"): the transaction is rolled back and the records before the failing one
  are run again in a new transaction, which commits;
- ``savepoint``: each session handler runs inside a savepoint; the failing one's is rolled back and the
  records before it commit.

Either way the failing record then goes through the per-record path (its batch run was its first
attempt: retries with backoff, then the dead letters), and the records after it start a new batch.

The invariants, next to the code that keeps them, and the test that would catch each violation:

- **A batch commits the handlers' work and the inbox rows of exactly the records it handled,
  together.** The inbox rows are written in the batch's transaction, after the handlers, in one
  statement: a record is in the inbox exactly when its handler's work committed.
  ``tests/test_consumer_batches.py::test_killed_mid_batch_twice_every_effect_exactly_once``
- **A failing handler undoes no other record's work and is not recorded as handled.** Its work is
  rolled back (with the whole transaction, or its savepoint); the records before it commit without it;
  it alone is retried and dead-lettered.
  ``tests/test_consumer_batches.py::test_a_failing_record_mid_batch_leaves_the_others_once``
- **Records of a partition start in offset order, a failing record's retries included.** A batch runs
  its handlers in order, a failed record is retried before the records after it run, and a partition
  is in one worker's hands at a time.
  ``tests/test_consumer_batches.py::test_partitions_in_parallel_keep_their_order``
- **A record already in the inbox, or twice in one batch, does not run again.** The one inbox query of
  the batch sees the rows committed before it; a row committed meanwhile by another member of the group
  (a rebalance moved the partition) makes the batch's insert fail on the primary key: the batch is
  rolled back and run again, and the new query sees that row.
  ``tests/test_consumer_batches.py::test_a_second_consumer_joining_skips_nothing_and_doubles_nothing``
- **An outage is waited out and never an attempt.** A batch whose database fails with an outage
  (:func:`outbox._dialects.is_outage`) is rolled back and run again once the database answers; no record
  of it counts an attempt. ``tests/test_consumer.py::test_database_outage_is_waited_out_not_counted``

Handlers without a session run in the batch too (their inbox rows are written in its transaction): they
stay at least once, and a ``redo`` runs the ones before a failing record a second time.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import orm

from consumers._inbox import Inbox
from consumers._processing import RecordProcessor, Stopping
from consumers._records import KafkaRecord, UndecodableRecord, message_from_record
from consumers._registry import Handler
from consumers.attempt import HandlerFailed, run_in_batch
from outbox._dialects import is_outage
from outbox._errors import ConfigError
from outbox._message import Message

log = logging.getLogger("outbox.consumer")

#: how a failing handler is kept from undoing the others (see the module docstring)
ISOLATIONS = ("redo", "savepoint")


def check_batching(*, batch_records: int, isolation: str, batch_ms: int = 0) -> None:
    """ConfigError unless ``batch_records`` is at least 1, ``batch_ms`` at least 0 and ``isolation`` known."""
    for name, value, least in (("batch records", batch_records, 1), ("batch milliseconds", batch_ms, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{name} must be a whole number of at least {least}, got {value!r}")
    if isolation not in ISOLATIONS:
        raise ConfigError(f"batch isolation must be one of {', '.join(ISOLATIONS)}, got {isolation!r}")


@dataclass(frozen=True, slots=True)
class _Entry:
    record: KafkaRecord
    message: Message
    handler: Handler


@dataclass(frozen=True, slots=True)
class _Committed:
    """A transaction over ``entries[:count]`` committed; ``failure``: ``entries[count]`` failed."""

    count: int
    failure: HandlerFailed | None = None


class _RolledBack(Exception):
    """Leave the transaction block by an exception, which rolls it back."""

    def __init__(
        self, failed_at: int | None = None, failure: HandlerFailed | None = None, *, unflushed: bool = False
    ) -> None:
        self.failed_at = failed_at
        self.failure = failure
        #: the flush of the whole batch failed: which handler's work it was is not known
        self.unflushed = unflushed


class BatchProcessor:
    """Finishes the records of one partition in batches (see the module docstring).

    ``processor`` finishes what cannot run in a batch, waits out outages and holds the counters and
    metrics; it needs a database (``processor.engine``).
    """

    def __init__(self, processor: RecordProcessor, *, batch_records: int, isolation: str = "redo") -> None:
        if processor.engine is None or processor.inbox is None:
            raise ConfigError("batches need a database")
        check_batching(batch_records=batch_records, isolation=isolation)
        self.processor = processor
        self.batch_records = batch_records
        self.savepoints = isolation == "savepoint"
        self._inbox: Inbox = processor.inbox
        self._sessions = orm.sessionmaker(processor.engine)

    def process(self, records: Sequence[KafkaRecord], finished: Callable[[KafkaRecord], None]) -> None:
        """Finish ``records`` (one partition's, in offset order), calling ``finished`` with the last
        record of each step that committed; :class:`Stopping` when stopped between two steps."""
        at = 0
        while at < len(records):
            if self.processor.stopping.is_set():
                raise Stopping()
            run: list[_Entry] = []
            while at + len(run) < len(records) and len(run) < self.batch_records:
                entry = self._batchable(records[at + len(run)])
                if entry is None:
                    break
                run.append(entry)
            if not run:  # this record is finished alone
                self.processor.process(records[at])
                finished(records[at])
                at += 1
                continue
            done = self._commit_run(run)
            self.processor.counters.add("received", done.count + (done.failure is not None))
            if done.count:
                finished(run[done.count - 1].record)
            at += done.count
            if done.failure is not None:
                self.processor.process(records[at], failed_in_batch=done.failure.error)
                finished(records[at])
                at += 1

    def _batchable(self, record: KafkaRecord) -> _Entry | None:
        try:
            message = message_from_record(record)
        except UndecodableRecord:
            return None
        handler = self.processor.registry.route(message.topic) or self.processor.registry.route(record.topic)
        if handler is None or handler.policy(self.processor.default_policy).timeout is not None:
            return None
        return _Entry(record, message, handler)

    def _commit_run(self, run: list[_Entry]) -> _Committed:
        """Commit as much of ``run`` as runs through: all of it, or the records before the first failing
        one (then named); redone after an outage or a race on the inbox."""
        limit, failure = len(run), None
        flush_each = self.savepoints
        while True:
            if limit == 0:
                return _Committed(0, failure)
            try:
                done = self.processor.with_db(functools.partial(self._transaction, run[:limit], flush_each))
            except _RolledBack as rolled_back:
                if rolled_back.unflushed:
                    flush_each = True  # again, each handler's work flushed after it, to find the failing one
                    continue
                if rolled_back.failed_at is None:
                    continue  # another member inserted one of the inbox rows meanwhile: look again
                limit, failure = rolled_back.failed_at, rolled_back.failure  # redo without it
                continue
            return done if done.failure is not None else _Committed(done.count, failure)

    def _transaction(self, run: list[_Entry], flush_each: bool) -> _Committed:
        """One transaction over ``run``; raises :class:`_RolledBack` when it was rolled back.

        Without ``flush_each`` the handlers' work is flushed once, after the last of them (SQLAlchemy
        then inserts the rows of many handlers in one statement): the fast way, when nothing fails.
        """
        started = time.monotonic()
        handled: list[tuple[_Entry, float]] = []
        duplicates: list[_Entry] = []
        failed: tuple[int, HandlerFailed] | None = None
        with self._sessions() as session, session.begin() as transaction:
            seen = self._inbox.processed_among(session.connection(), [e.message.id for e in run])
            for index, entry in enumerate(run):
                if entry.message.id in seen:
                    duplicates.append(entry)
                    continue
                seen.add(entry.message.id)
                began = time.monotonic()
                failure = self._run(entry, session, flush_each)
                if failure is not None:
                    if self.processor.metrics is not None:
                        self.processor.metrics.attempt(
                            entry.record.topic, time.monotonic() - began, failed=True
                        )
                    if not self.savepoints:
                        raise _RolledBack(index, failure)
                    failed = (index, failure)
                    break
                handled.append((entry, time.monotonic() - began))
            if not flush_each:
                self._flush(session)
            if not handled:
                transaction.rollback()  # only duplicates (or a first record failing): nothing to commit
            elif not self._inbox.claim_many(session.connection(), [e.message for e, _ in handled]):
                raise _RolledBack()
        self._count(handled, duplicates, time.monotonic() - started)
        if failed is not None:
            return _Committed(failed[0], failed[1])
        return _Committed(len(run))

    @staticmethod
    def _flush(session: orm.Session) -> None:
        try:
            session.flush()
        except sa.exc.SQLAlchemyError as exc:
            if is_outage(exc):
                raise
            raise _RolledBack(unflushed=True) from exc

    def _run(self, entry: _Entry, session: orm.Session, flush: bool) -> HandlerFailed | None:
        message = entry.message  # attempt 1
        if not entry.handler.takes_session:
            return run_in_batch(entry.handler, message, None)
        if not self.savepoints:
            return run_in_batch(entry.handler, message, session, flush=flush)
        savepoint = session.begin_nested()
        failure = run_in_batch(entry.handler, message, session)
        if failure is None:
            savepoint.commit()
        else:
            savepoint.rollback()
        return failure

    def _count(self, handled: list[tuple[_Entry, float]], duplicates: list[_Entry], seconds: float) -> None:
        processor = self.processor
        processor.outage_over()
        processor.counters.add("handled", len(handled))
        for entry in duplicates:
            processor.skipped(entry.record, entry.message)
        for entry, took in handled:
            if processor.metrics is not None:
                processor.metrics.attempt(entry.record.topic, took, failed=False)
            processor.finished(entry.record, "handled", entry.message)
        log.debug("batch of %d committed in %.1f ms", len(handled) + len(duplicates), seconds * 1000)
