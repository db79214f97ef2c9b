"""The inbox: which messages a consumer group has processed (``<table>_inbox``).

One row per (consumer group, message id), primary key on both. The rule that makes a session handler's
effect happen once (see :mod:`consumers._kafka`): the row is inserted **first**, in the handler's own
transaction, and the handler runs only if the insert succeeded. Then:

- the row exists exactly when the handler's database work committed (same transaction);
- a redelivered message (the consumer died after the commit, before the Kafka offset commit) finds the
  row and is skipped, without running the handler;
- two consumers handling the same message at once (a rebalance moved the partition while the first one
  was still working) both insert the same key: the database makes the second wait for the first
  transaction and then refuses the duplicate key, so one of them commits and the other rolls back and
  counts a duplicate. Caught by ``tests/test_consumer.py::test_inbox_claim_is_refused_twice``.

A batch (:mod:`consumers._batches`) asks for all of its ids at once (:meth:`Inbox.processed_among`, one
query) and writes the rows of every record it handled in one statement (:meth:`Inbox.claim_many`), in
the batch's transaction: the same rule, for many rows. On PostgreSQL both are one statement text
whatever the count (arrays bound as one parameter, ``INSERT ... SELECT unnest(...)``), prepared once;
elsewhere an expanding ``IN`` and a multi-row insert.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence

import sqlalchemy as sa

from outbox._clock import utcnow
from outbox._dialects import dialect_for
from outbox._message import Message
from outbox._schema import OutboxTables


class Inbox:
    """The inbox rows of one consumer group."""

    def __init__(self, tables: OutboxTables, group: str) -> None:
        self.table = tables.inbox
        self.group = group

    def claim(self, conn: sa.Connection, message: Message) -> bool:
        """Insert the row for ``message`` in ``conn``'s transaction; False when the group already has it.

        After False the transaction is unusable on PostgreSQL (the statement failed): roll it back.
        """
        try:
            conn.execute(
                sa.insert(self.table).values(
                    consumer_group=self.group,
                    message_id=message.id,
                    topic=message.topic[:249],
                    processed_at=utcnow(),
                )
            )
        except sa.exc.IntegrityError:
            return False
        return True

    def contains(self, conn: sa.Connection, message_id: uuid.UUID) -> bool:
        """True when the group has processed ``message_id``."""
        t = self.table
        query = sa.select(t.c.message_id).where(
            t.c.consumer_group == self.group, t.c.message_id == message_id
        )
        return conn.execute(query).first() is not None

    def processed_among(self, conn: sa.Connection, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """The ids among ``ids`` that the group has processed (one query)."""
        if not ids:
            return set()
        if dialect_for(conn).array_params:
            found = conn.execute(self._select_any(conn), {"group": self.group, "ids": list(ids)})
        else:
            t = self.table
            query = sa.select(t.c.message_id).where(t.c.consumer_group == self.group, t.c.message_id.in_(ids))
            found = conn.execute(query)
        return {row[0] for row in found}

    def claim_many(self, conn: sa.Connection, messages: Sequence[Message]) -> bool:
        """Insert the rows of ``messages`` in one statement; False when one of them is there already
        (another consumer committed it meanwhile): roll the transaction back and look again."""
        if not messages:
            return True
        now = utcnow()
        try:
            if dialect_for(conn).array_params:
                values = {
                    "group": self.group,
                    "ids": [m.id for m in messages],
                    "topics": [m.topic[:249] for m in messages],
                    "at": now,
                }
                conn.execute(self._insert_unnest(conn), values)
            else:
                rows = [
                    {
                        "consumer_group": self.group,
                        "message_id": m.id,
                        "topic": m.topic[:249],
                        "processed_at": now,
                    }
                    for m in messages
                ]
                conn.execute(sa.insert(self.table), rows)
        except sa.exc.IntegrityError:
            return False
        return True

    def _name(self, conn: sa.Connection) -> str:
        return conn.dialect.identifier_preparer.format_table(self.table)

    def _select_any(self, conn: sa.Connection) -> sa.TextClause:
        # One primary-key probe per id, whatever the table's statistics: the plain form
        # (message_id = ANY(:ids)) is planned, on a fresh inbox not analyzed yet, as a scan of the
        # group's whole key range filtering the ids, whose cost grew with the inbox (BENCHMARKS.md,
        # Consume); a LATERAL with LIMIT cannot be turned
        # into such a scan.
        return sa.text(
            "SELECT x.id FROM unnest(CAST(:ids AS uuid[])) AS x(id) CROSS JOIN LATERAL "
            f"(SELECT 1 FROM {self._name(conn)} AS i "
            "WHERE i.consumer_group = :group AND i.message_id = x.id LIMIT 1) AS hit"
        )

    def _insert_unnest(self, conn: sa.Connection) -> sa.TextClause:
        return sa.text(
            f"INSERT INTO {self._name(conn)} (consumer_group, message_id, topic, processed_at) "
            "SELECT :group, unnest(CAST(:ids AS uuid[])), unnest(CAST(:topics AS varchar[])), :at"
        ).bindparams(sa.bindparam("at", type_=sa.DateTime()))


def delete_old_inbox_rows(
    conn: sa.Connection, tables: OutboxTables, cutoff: dt.datetime, limit: int
) -> tuple[int, int]:
    """One batch: delete at most ``limit`` inbox rows (any group) processed before ``cutoff``, oldest
    first (the ``processed_at`` index); ``(rows found, rows deleted)``. Used by the relays' retention
    (:mod:`relay._retention`) and by ``outbox purge --inbox`` (:mod:`outbox.admin._operations`)."""
    t = tables.inbox
    old = t.c.processed_at < cutoff
    pick = sa.select(t.c.consumer_group, t.c.message_id).where(old).order_by(t.c.processed_at).limit(limit)
    keys = [tuple(row) for row in conn.execute(pick)]
    if not keys:
        return 0, 0
    named = sa.tuple_(t.c.consumer_group, t.c.message_id).in_(keys)
    return len(keys), conn.execute(sa.delete(t).where(named, old)).rowcount
