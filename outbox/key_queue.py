"""A key's queued messages: the rows set aside behind an earlier message of their key, and their promotion.

A keyed message that a relay's claim finds blocked (an earlier message of its key still holds the key:
pending, in flight, failed or parked) is *queued*: it stays ``pending`` with ``due_at`` NULL, out of the
index the claim scans (``relay.claim``, invariant 8). It comes back by **promotion**: once nothing earlier
holds its key, the key's first ``run`` pending messages get ``due_at = now``, and the next claim takes
them as one run. Promotion is idempotent and safe to run at any time; it changes nothing while an
earlier message holds the key.

Who promotes (``relay.claim``'s invariant 9): the relay's completer after a run's last message is
delivered or a message is dead, :meth:`outbox.operations.Operations.purge` after deleting parked
messages, and the relay's maintenance thread as a safety net (:meth:`KeyQueue.sweep`), for a promotion a
crash came between (the delivered mark committed, the promotion not).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa

from outbox.schema import KEY_HOLDING, OutboxTables, Status, status_in

#: rows of one key promoted at once: a relay takes them as one run
RUN_LENGTH = 256


#: a ``seq`` past every row's (the upper bound of a key's last run, which has no row past it)
_NO_END = 2**62


class KeyQueue:
    """The promotion statements of one outbox table (the same on PostgreSQL, MariaDB and SQLite).

    Every statement has one shape whatever the number of keys (the keys or rows go as expanding
    parameters), so SQLAlchemy compiles each once: a statement with a clause per key would be compiled
    and planned anew for every promotion, which cost half a second for a thousand keys.
    """

    def __init__(self, tables: OutboxTables, *, run_length: int = RUN_LENGTH) -> None:
        self.run_length = run_length
        t = self.t = tables.messages
        queued = (status_in(t.c.status, [Status.PENDING]), t.c.due_at.is_(None))
        # The keys of some rows (by seq), or one given key; per key: its first pending row, the pending
        # row one run past it, and whether anything earlier still holds the key. Each is an index probe.
        # Every probe starts after the finished row (``after``): each earlier row of its key is finished
        # too (a row is handled only once those are), so a key's delivered history is never read.
        by_seq = (
            sa.select(t.c.msg_key, sa.func.min(t.c.seq).label("after"))
            .where(t.c.seq.in_(sa.bindparam("seqs", expanding=True)), t.c.msg_key.is_not(None))
            .group_by(t.c.msg_key)
        )
        self._by_seqs = self._heads(by_seq.subquery("k"))
        self._by_key = self._heads(
            sa.select(
                sa.bindparam("key", type_=t.c.msg_key.type).label("msg_key"),
                sa.literal(0, sa.BigInteger).label("after"),
            ).subquery("k")
        )
        # then each such key's queued rows of that run: a range of the key's index (a statement a key,
        # so that no plan can read the table once per key, or per row)
        from_first = (
            t.c.msg_key == sa.bindparam("key", type_=t.c.msg_key.type),
            t.c.seq >= sa.bindparam("first", type_=sa.BigInteger),
            *queued,
        )
        self._queued_from = sa.select(t.c.seq).where(*from_first)  # the key's last run: no bound
        self._queued_in_range = sa.select(t.c.seq).where(
            *from_first, t.c.seq < sa.bindparam("past", type_=sa.BigInteger)
        )
        # by primary key: an UPDATE over the key's index range would lock index entries a claim is
        # moving (InnoDB), and the two would deadlock
        self._promote = (
            sa.update(t)
            .where(t.c.seq.in_(sa.bindparam("seqs", expanding=True)), *queued)
            .values(due_at=sa.bindparam("now"))
        )
        self._queued_keys = (
            sa.select(t.c.msg_key)
            .where(status_in(t.c.status, [Status.PENDING]), t.c.due_at.is_(None), t.c.msg_key.is_not(None))
            .distinct()
            .limit(sa.bindparam("limit", type_=sa.Integer))
        )

    def _heads(self, k: Any) -> Any:
        t = self.t
        p = t.alias("p")
        first = (
            sa.select(sa.func.min(p.c.seq))
            .where(p.c.msg_key == k.c.msg_key, status_in(p.c.status, [Status.PENDING]), p.c.seq >= k.c.after)
            .scalar_subquery()
        )
        p2 = t.alias("p2")
        past = (
            sa.select(p2.c.seq)
            .where(
                p2.c.msg_key == k.c.msg_key, status_in(p2.c.status, [Status.PENDING]), p2.c.seq >= k.c.after
            )
            .order_by(p2.c.seq)
            .limit(1)
            .offset(sa.bindparam("run", type_=sa.Integer))
            .scalar_subquery()
        )
        heads = sa.select(k.c.msg_key, k.c.after, first.label("first"), past.label("past")).subquery("h")
        e = t.alias("e")
        held_earlier = (
            sa.select(sa.literal(1))
            .where(
                e.c.msg_key == heads.c.msg_key,
                # every holding status, though only the others can be earlier than the first pending
                # row: so that PostgreSQL probes its index of holding rows (relay.claim), not the rows
                # of a status it believes rare (in flight, after a backlog's ANALYZE), all of them
                status_in(e.c.status, KEY_HOLDING),
                e.c.seq >= heads.c.after,
                e.c.seq < heads.c.first,
            )
            .exists()
        )
        q = t.alias("q")
        has_queued = (
            sa.select(sa.literal(1))
            .where(
                q.c.msg_key == heads.c.msg_key,
                status_in(q.c.status, [Status.PENDING]),
                q.c.seq >= heads.c.first,
                q.c.seq < sa.func.coalesce(heads.c.past, _NO_END),
                q.c.due_at.is_(None),
            )
            .exists()
        )
        return sa.select(heads.c.msg_key, heads.c.first, heads.c.past).where(
            heads.c.first.is_not(None), ~held_earlier, has_queued
        )

    def promote(self, conn: sa.Connection, seqs: Sequence[int], *, now: dt.datetime) -> int:
        """Promote the keys of rows ``seqs`` (rows that just stopped holding their key); returns how many
        rows came back to the claim."""
        if not seqs:
            return 0
        heads = conn.execute(self._by_seqs, {"seqs": list(seqs), "run": self.run_length}).all()
        return self._update(conn, self._queued(conn, heads), now)

    def promote_keys(self, conn: sa.Connection, keys: Iterable[str], *, now: dt.datetime) -> int:
        """Promote the given keys (a statement or two each: for the few keys an operator's change
        touches, and the maintenance sweep)."""
        heads: list[Any] = []
        for key in keys:
            heads.extend(conn.execute(self._by_key, {"key": key, "run": self.run_length}).all())
        return self._update(conn, self._queued(conn, heads), now)

    def _queued(self, conn: sa.Connection, heads: Sequence[Any]) -> list[int]:
        """The queued rows of each head's run: ``(key, first, past)``, past None for a key's last run."""
        seqs: list[int] = []
        for key, first, past in heads:
            if past is None:
                found = conn.execute(self._queued_from, {"key": key, "first": first})
            else:
                found = conn.execute(self._queued_in_range, {"key": key, "first": first, "past": past})
            seqs.extend(found.scalars())
        return seqs

    def sweep(self, conn: sa.Connection, *, now: dt.datetime, limit: int = 1000) -> int:
        """Promote every key (up to ``limit`` of them) whose queued rows nothing holds back any more."""
        keys = list(conn.execute(self._queued_keys, {"limit": limit}).scalars())
        return self.promote_keys(conn, keys, now=now)

    def _update(self, conn: sa.Connection, seqs: list[int], now: dt.datetime) -> int:
        if not seqs:
            return 0
        return int(conn.execute(self._promote, {"seqs": seqs, "now": now}).rowcount)
