"""Retention: what the maintenance lease holder deletes, in small batches, so that no table grows forever.

Two kinds of rows outlive their use once they are older than the relay's ``retention``:

- **delivered messages** in ``<table>``, aged by ``delivered_at`` (:func:`delivered_batch`);
- **inbox rows** in ``<table>_inbox``, aged by ``processed_at`` (:func:`inbox_batch`): the consumer
  groups' record of the messages they processed (:mod:`consumers._inbox`). A message Kafka delivers
  again after its inbox row was deleted is no longer recognised as a duplicate and is handled again,
  so the retention must exceed the longest time a record can be redelivered (see ``docs/guarantees.md``).

:func:`run_retention` deletes one kind, ``batch_size`` rows per short transaction, and is called by
:class:`relay.maintenance.Maintenance` under its lease. Invariants (each names the test that would catch
its violation):

1. **Only what is old enough, and only finished messages.** Each DELETE names its rows by primary key
   *and* re-checks the age (and, for messages, ``status = 'delivered'``), so a message replayed in
   between is kept; pending, in-flight, failed, dead and parked messages are never deleted (dead and
   parked ones wait for ``outbox replay`` or ``outbox purge``).
   -- ``tests/test_maintenance.py::test_retention_deletes_only_old_delivered_while_relays_deliver``,
   ``tests/test_maintenance.py::test_inbox_retention_deletes_only_old_inbox_rows_in_batches``
2. **No long locks.** Each batch is its own transaction of at most ``batch_size`` rows, found through
   the ``delivered_at`` / ``processed_at`` index, so relays claiming and marking (and consumers writing
   their inbox) next to it wait for milliseconds, never for a table-sized DELETE; a run stops after
   ``max_batches`` and goes on at the next tick. -- the same tests
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from consumers._inbox import delete_old_inbox_rows
from outbox._clock import utcnow
from outbox._schema import OutboxTables, Status

#: one batch, in the caller's transaction: delete at most ``limit`` rows older than ``cutoff``;
#: returns ``(rows found, rows deleted)``
Batch = Callable[[sa.Connection, dt.datetime, int], tuple[int, int]]


@dataclass(frozen=True)
class RetentionRun:
    """One retention run: how many rows older than ``cutoff`` it deleted."""

    started_at: dt.datetime
    cutoff: dt.datetime
    deleted: int
    batches: int
    seconds: float
    #: stopped at ``max_batches`` (or on stop / lost lease) with more to delete
    incomplete: bool = False


def delivered_batch(tables: OutboxTables) -> Batch:
    """Delivered messages older than the cutoff, oldest first (the ``delivered_at`` index: no scan)."""
    t = tables.messages

    def batch(conn: sa.Connection, cutoff: dt.datetime, limit: int) -> tuple[int, int]:
        old_delivered = (t.c.status == Status.DELIVERED.value, t.c.delivered_at < cutoff)
        pick = sa.select(t.c.seq).where(*old_delivered).order_by(t.c.delivered_at).limit(limit)
        seqs = list(conn.execute(pick).scalars())
        if not seqs:
            return 0, 0
        return len(seqs), conn.execute(sa.delete(t).where(t.c.seq.in_(seqs), *old_delivered)).rowcount

    return batch


def inbox_batch(tables: OutboxTables) -> Batch:
    """Inbox rows (any consumer group) processed before the cutoff, oldest first (``processed_at`` index)."""

    def batch(conn: sa.Connection, cutoff: dt.datetime, limit: int) -> tuple[int, int]:
        return delete_old_inbox_rows(conn, tables, cutoff, limit)

    return batch


def run_retention(
    engine: sa.Engine,
    batch: Batch,
    *,
    retention: dt.timedelta,
    batch_size: int,
    max_batches: int,
    go_on: Callable[[], bool],
    now: dt.datetime | None = None,
) -> RetentionRun:
    """Apply ``batch`` until nothing older than ``retention`` is left, ``max_batches`` ran, or ``go_on()``
    (called between batches: the caller pauses there, checks its stop flag and renews its lease) says no.
    """
    started, started_at = time.monotonic(), utcnow()
    cutoff = (now or started_at) - retention
    deleted = batches = 0
    more = True
    while more:
        with engine.begin() as conn:
            found, gone = batch(conn, cutoff, batch_size)
        deleted += gone
        batches += 1 if found else 0
        more = found == batch_size
        if not more or batches >= max_batches or not go_on():
            break
    return RetentionRun(started_at, cutoff, deleted, batches, time.monotonic() - started, incomplete=more)
