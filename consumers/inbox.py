"""The inbox: which messages a consumer group has processed (``<table>_inbox``).

One row per (consumer group, message id), primary key on both. The rule that makes a session handler's
effect happen once (see :mod:`consumers.kafka`): the row is inserted **first**, in the handler's own
transaction, and the handler runs only if the insert succeeded. Then:

- the row exists exactly when the handler's database work committed (same transaction);
- a redelivered message (the consumer died after the commit, before the Kafka offset commit) finds the
  row and is skipped, without running the handler;
- two consumers handling the same message at once (a rebalance moved the partition while the first one
  was still working) both insert the same key: the database makes the second wait for the first
  transaction and then refuses the duplicate key, so one of them commits and the other rolls back and
  counts a duplicate. Caught by ``tests/test_consumer.py::test_inbox_claim_is_refused_twice``.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa

from outbox.message import Message
from outbox.schema import OutboxTables
from outbox.writer import utcnow


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
