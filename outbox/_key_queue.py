"""A key's queued messages: the rows set aside behind an earlier message of their key, and their promotion.

A keyed message that a relay's claim finds blocked (an earlier message of its key still holds the key:
pending, in flight, failed or parked) is *queued*: it stays ``pending`` with ``due_at`` NULL, out of the
index the claim scans (``relay._claim``, invariant 8). It comes back by **promotion**: once nothing earlier
holds its key and its first pending message is queued, the key's first ``run`` pending messages, up to
the first one holding the key otherwise (in flight, failed, parked), get ``due_at = now``, and the next
claim takes them as one run. Promotion is idempotent and safe to run at any time; it changes nothing
while an earlier message holds the key.

Who promotes (``relay._claim``'s invariant 9): the relay's completer after a run's last message is
delivered or a message is dead, :meth:`outbox.admin._operations.Operations.purge` after deleting parked
messages, and the relay's maintenance thread as a safety net (:meth:`KeyQueue.sweep`), for a promotion a
crash came between (the delivered mark committed, the promotion not).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.visitors import InternalTraversal

from outbox._schema import KEY_HOLDING, OutboxTables, Status, status_in


def seqs_param(as_array: bool, seqs: Sequence[int]) -> str | list[int]:
    """A ``seqs`` parameter: a PostgreSQL array literal (``"{1,2,3}"``, bound as one text value and cast
    to ``bigint[]``: one statement text whatever the count), or a list for an expanding IN."""
    if as_array:
        return "{" + ",".join(map(str, seqs)) + "}"
    return list(seqs)


#: rows of one key promoted at once: a relay takes them as one run. Each run costs a claim's share and
#: a run-end transaction, so longer runs drain a deep key faster (BENCHMARKS.md, "Figures behind the
#: code"); longer than this they no longer fit a claim's pull budget (3/4 of max_batch_size).
RUN_LENGTH = 1024

#: the names SQLAlchemy gives MariaDB's dialect (``mysql+pymysql://``, ``mariadb+pymysql://``)
MARIADB_NAMES = frozenset({"mysql", "mariadb"})


def on_key_index(probe: sa.Select[Any], alias: Any, table: sa.Table) -> sa.Select[Any]:
    """``probe``, told on MariaDB to read ``alias`` (of ``table``) through the key's index
    ``(msg_key, status, seq)`` (``FORCE INDEX``). As its statistics stand, MariaDB may otherwise run a
    correlated probe of a key's rows as a read of the status index or of the primary key in order,
    filtered: the whole table for each probed row (BENCHMARKS.md, "MariaDB's plans")."""
    hint = f"FORCE INDEX (`ix_{table.name}_key`)"
    for name in MARIADB_NAMES:
        probe = probe.with_hint(alias, hint, dialect_name=name)
    return probe


#: one row of a key's queued run: ``(seq, payload bytes, topic)``, bytes -1 for a row already due
RunRow = tuple[int, int, str]

#: :func:`key_rows_after`'s ``ready``: a pending row that is queued (``due_at`` NULL), due (by ``now``), or
#: neither (a retry's backoff); and a row holding the key otherwise (in flight, failed, parked)
QUEUED, DUE, WAITING, OTHERWISE_HOLDING = 2, 1, 0, -1


def key_rows_after(t: sa.Table, *, holding_index: bool, inclusive: bool, now: Any = None) -> sa.Select[Any]:
    """A key's rows after row ``:after`` (from it, when ``inclusive``), in seq order, up to ``:count``, as
    ``(seq, ready, payload bytes, topic)``: the key's pending rows, and its first row holding the key
    otherwise (``ready`` :data:`OTHERWISE_HOLDING`), which a run must stop at. ``ready`` of a pending row is
    :data:`QUEUED` or :data:`DUE`; with ``now`` given, a pending row not due by then is :data:`WAITING`.

    On PostgreSQL (``holding_index``) one range of the partial index of holding rows; elsewhere a range of
    ``(msg_key, status, seq)`` over the pending rows, each compared with the key's first row after
    ``:after`` that holds it otherwise (one probe per status: normally none).
    """
    key = sa.bindparam("key", type_=t.c.msg_key.type)
    after = sa.bindparam("after", type_=sa.BigInteger)
    from_after = t.c.seq >= after if inclusive else t.c.seq > after
    due: Any = DUE if now is None else sa.case((t.c.due_at <= now, DUE), else_=WAITING)
    if holding_index:
        ready = sa.case(
            (t.c.status != Status.PENDING.value, OTHERWISE_HOLDING), (t.c.due_at.is_(None), QUEUED), else_=due
        )
        statuses: Iterable[Status] = KEY_HOLDING
    else:
        f = t.alias("f")
        fence = (
            sa.select(sa.func.min(f.c.seq))
            .where(
                f.c.msg_key == key,
                status_in(f.c.status, [Status.INFLIGHT, Status.FAILED, Status.PARKED]),
                f.c.seq >= after if inclusive else f.c.seq > after,
            )
            .scalar_subquery()
        )
        ready = sa.case(
            (t.c.seq > sa.func.coalesce(fence, t.c.seq), OTHERWISE_HOLDING),
            (t.c.due_at.is_(None), QUEUED),
            else_=due,
        )
        statuses = [Status.PENDING]
    return (
        sa.select(t.c.seq, ready, sa.func.length(t.c.payload), t.c.topic)
        .where(key_is(t.c.msg_key, key), status_in(t.c.status, statuses), from_after)
        .order_by(t.c.msg_key, t.c.seq)
        .limit(sa.bindparam("count", type_=sa.Integer))
    )


class _KeyIs(sa.sql.expression.ColumnElement[bool]):
    inherit_cache = True
    type = sa.Boolean()
    _is_implicitly_boolean = True  # a comparison: no "= 1" where booleans are integers
    # what the statement cache keys on: both parts (a clause each)
    _traverse_internals = [
        ("column", InternalTraversal.dp_clauseelement),
        ("key", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, column: sa.ColumnElement[str], key: Any) -> None:
        self.column = column
        self.key = key


@compiles(_KeyIs)
def _key_is(element: _KeyIs, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.column == element.key, **kw))


@compiles(_KeyIs, "postgresql")
def _key_is_postgresql(element: _KeyIs, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.column.between(element.key, element.key), **kw))


def key_is(column: sa.ColumnElement[str], key: Any) -> sa.ColumnElement[bool]:
    """``column = key``, for a statement that reads a key's rows in ``seq`` order with a LIMIT, ordered
    by ``(msg_key, seq)``; on PostgreSQL written as a range (``column BETWEEN key AND key``).

    With ``msg_key = :key``, PostgreSQL drops ``msg_key`` from the wanted order (a constant), and then
    the primary key gives ``seq`` order too: for a key it believes common (a hot key, after ANALYZE) it
    may read the table by ``seq`` from the row on, filtering, a full scan when the key's rows are far
    apart. A range keeps ``(msg_key, seq)`` wanted, which only the key's indexes give (partial there:
    they hold no finished row to step over). Elsewhere an equality, which the planners read as the key's
    index range (SQLite would not use ``seq`` within a range of ``msg_key``).
    """
    return _KeyIs(column, key)


class KeyQueue:
    """The promotion statements of one outbox table (PostgreSQL's, and those of MariaDB and SQLite).

    A promotion reads where each key stands in one statement, in index probes ordered by
    ``(msg_key, seq)`` (:func:`key_is`: no plan can read the table by ``seq``, as an earlier joined
    statement did under three relays: ``BENCHMARKS.md``, "Key depth"): on PostgreSQL, the key's first
    holding row, one probe of the partial index of holding rows; elsewhere its first pending row (and
    whether it is queued) and its first row of each other holding status. Only a key whose first
    holding row is pending and queued has its run read (one index range) and promoted; a key whose
    first pending row is due needs none (a claim takes that row, and its run's end promotes the key),
    so a relay that drains keys nobody queued pays one statement per promotion. Every statement has
    one shape whatever the number of keys or rows (rows go as an expanding parameter), so SQLAlchemy
    compiles each once.
    """

    def __init__(self, tables: OutboxTables, *, run_length: int = RUN_LENGTH) -> None:
        self.run_length = run_length
        t = self.t = tables.messages
        key = sa.bindparam("key", type_=t.c.msg_key.type)
        # The keys to look at: those of some rows, each from the first of them; or one given key, from 0.
        # Every probe starts there: each earlier row of the key is finished (a row is handled only once
        # those are), so a key's delivered history is never read.
        # PostgreSQL binds the seqs as one array literal (one statement text, planned once, as in
        # relay._claim); elsewhere as an expanding IN
        seq_array = sa.cast(sa.bindparam("seqs", type_=sa.Text()), postgresql.ARRAY(sa.BigInteger()))
        in_seqs = {
            "postgresql": t.c.seq == sa.any_(seq_array),
            "": t.c.seq.in_(sa.bindparam("seqs", expanding=True)),
        }
        # One row per given row, read by primary key: grouped by key in SQL ("min(seq) ... GROUP BY
        # msg_key"), MariaDB read the whole key index for its order instead (every keyed row of the table
        # at each run's end: 96 ms a run's end in a drain of 30,000 rows over 100 keys); a key given
        # several rows is probed from each, and queued_runs keeps its first.
        by_seqs = {
            family: sa.select(t.c.msg_key, t.c.seq.label("after"))
            .where(in_seq, t.c.msg_key.is_not(None))
            .subquery("k")
            for family, in_seq in in_seqs.items()
        }
        one_key = sa.select(key.label("msg_key"), sa.literal(0, sa.BigInteger).label("after")).subquery("k")
        #: per database family (the first name of the connection's dialect): the heads statements
        self._heads_of_rows = {
            "postgresql": self._first_holding(by_seqs["postgresql"]),
            "": self._heads(by_seqs[""]),
        }
        self._heads_of_key = {"postgresql": self._first_holding(one_key), "": self._heads(one_key)}
        # A key's pending rows from a row on, in seq order, up to its first row holding it otherwise
        self._rows_from = {
            "postgresql": key_rows_after(t, holding_index=True, inclusive=True),
            "": key_rows_after(t, holding_index=False, inclusive=True),
        }
        # by primary key: an UPDATE over the key's index range would lock index entries a claim is
        # moving (InnoDB), and the two would deadlock
        self._promote = {
            family: sa.update(t)
            .where(in_seq, status_in(t.c.status, [Status.PENDING]), t.c.due_at.is_(None))
            .values(due_at=sa.bindparam("now"))
            for family, in_seq in in_seqs.items()
        }
        self._queued_keys = (
            sa.select(t.c.msg_key)
            .where(status_in(t.c.status, [Status.PENDING]), t.c.due_at.is_(None), t.c.msg_key.is_not(None))
            .distinct()
            .limit(sa.bindparam("limit", type_=sa.Integer))
        )

    def _first_holding(self, k: Any) -> Any:
        """PostgreSQL: the keys whose first row holding them (any holding status) is pending and queued,
        with that row: one probe of the partial index of holding rows (``ix_<name>_holding``,
        ``(msg_key, seq)``), joined laterally. Probes by status would each need an index that gives
        ``seq`` order for one status; the planner may instead read every row of a status it believes
        rare (the in-flight ones, after a backlog's ANALYZE) once per key."""
        f = self.t.alias("f")
        first = (
            sa.select(f.c.seq, f.c.status, f.c.due_at)
            .where(key_is(f.c.msg_key, k.c.msg_key), status_in(f.c.status, KEY_HOLDING), f.c.seq >= k.c.after)
            .order_by(f.c.msg_key, f.c.seq)
            .limit(1)
            .lateral("h")
        )
        queued = sa.and_(first.c.status == Status.PENDING.value, first.c.due_at.is_(None))
        # a key whose first holding row is not queued needs nothing (see _run); it is returned all the
        # same, as a key given several rows must be judged from its first one (queued_runs)
        return sa.select(k.c.msg_key, k.c.after, first.c.seq, sa.case((queued, 1), else_=0)).select_from(
            k.join(first, sa.true())
        )

    def _heads(self, k: Any) -> Any:
        """Elsewhere: per key, its first pending row and whether it is queued, and its first row of each
        other holding status; each a probe of the key's index ``(msg_key, status, seq)``, ordered by
        ``(msg_key, seq)`` (see key_is). "The first holding row" in one probe would read every pending
        row of a deep key before an in-flight one (the index is over every status)."""
        t = self.t

        # MariaDB ran these probes as a read of the primary key in seq order, filtered, when it believed a
        # key common (a hot key: 15,000 rows of 30,000 estimated): the whole table at each run's end (slow
        # log: 30,000 rows examined a probe, 32-98 ms a run's end over 100 keys). The key's index,
        # forced, reads the one entry wanted.
        def first(status: Status, column: Any) -> Any:
            f = t.alias(f"f_{status.value}")
            probe = (
                sa.select(column(f))
                .where(
                    key_is(f.c.msg_key, k.c.msg_key), status_in(f.c.status, [status]), f.c.seq >= k.c.after
                )
                .order_by(f.c.msg_key, f.c.seq)
                .limit(1)
            )
            return on_key_index(probe, f, t).scalar_subquery()

        return sa.select(
            k.c.msg_key,
            k.c.after,
            first(Status.PENDING, lambda f: f.c.seq),
            first(Status.PENDING, lambda f: sa.case((f.c.due_at.is_(None), 1), else_=0)),
            *(first(status, lambda f: f.c.seq) for status in KEY_HOLDING if status is not Status.PENDING),
        )

    def _family(self, conn: sa.Connection, statements: dict[str, Any]) -> Any:
        return statements.get(conn.dialect.name, statements[""])

    def _seqs(self, conn: sa.Connection, seqs: Sequence[int]) -> str | list[int]:
        return seqs_param(conn.dialect.name == "postgresql", seqs)

    def promote(self, conn: sa.Connection, seqs: Sequence[int], *, now: dt.datetime) -> int:
        """Promote the keys of rows ``seqs`` (rows that just stopped holding their key); returns how many
        rows came back to the claim."""
        return sum(self.promote_by_key(conn, seqs, now=now).values())

    def promote_by_key(self, conn: sa.Connection, seqs: Sequence[int], *, now: dt.datetime) -> dict[str, int]:
        """:meth:`promote`, returning how many rows came back for each key that had queued rows."""
        runs = self.queued_runs(conn, seqs)
        if not self.promote_runs(conn, runs.values(), now=now):
            return {}
        return {key: sum(size >= 0 for _, size, _ in run) for key, run in runs.items()}

    def queued_runs(self, conn: sa.Connection, seqs: Sequence[int]) -> dict[str, list[RunRow]]:
        """The keys of rows ``seqs`` whose next run is queued with nothing earlier holding the key: per
        key, that run's pending rows as ``(seq, payload bytes, topic)`` in seq order, bytes -1 for a row
        that is due already (a promotion makes the others due; the relay that ended the key's run may take
        the leading queued ones itself instead, ``relay._claim``'s invariant 13)."""
        if not seqs:
            return {}
        statement = self._family(conn, self._heads_of_rows)
        firsts: dict[str, Any] = {}  # per key, its head probed from its first given row
        for head in conn.execute(statement, {"seqs": self._seqs(conn, seqs)}):
            if head[0] not in firsts or head[1] < firsts[head[0]][1]:
                firsts[head[0]] = head
        return {key: run for key, head in firsts.items() if (run := self._run(conn, key, *head[2:]))}

    def promote_runs(self, conn: sa.Connection, runs: Iterable[list[RunRow]], *, now: dt.datetime) -> int:
        """Make runs found by :meth:`queued_runs` (in this transaction) due now; returns the rows promoted."""
        return self._update(conn, [seq for run in runs for seq, size, _ in run if size >= 0], now)

    def promote_keys(self, conn: sa.Connection, keys: Iterable[str], *, now: dt.datetime) -> int:
        """Promote the given keys (for the few keys an operator's change touches, and the maintenance
        sweep)."""
        seqs: list[int] = []
        statement = self._family(conn, self._heads_of_key)
        for key in keys:
            for head in conn.execute(statement, {"key": key}):
                seqs += [seq for seq, size, _ in self._run(conn, key, *head[2:]) if size >= 0]
        return self._update(conn, seqs, now)

    def _run(
        self, conn: sa.Connection, key: str, first: int | None, queued: int | None, *holding: int | None
    ) -> list[RunRow]:
        """``key``'s next run: its pending rows from its first pending row ``first`` (seq, payload bytes:
        -1 for a row that is due, not queued, which a promotion leaves as it is), if that row is queued
        and no other holding row (``holding``: the first of each other holding status, none where
        ``first`` is the key's first holding row) is before it. A first
        pending row that is due needs no promotion: a claim takes it, and the end of its run promotes
        the key."""
        if first is None or not queued or any(seq is not None and seq < first for seq in holding):
            return []
        statement = self._family(conn, self._rows_from)
        run: list[RunRow] = []
        params = {"key": key, "after": first, "count": self.run_length}
        for seq, ready, size, topic in conn.execute(statement, params):
            if ready == OTHERWISE_HOLDING:  # the run ends there: what follows waits for that row
                break
            run.append((seq, int(size or 0) if ready == QUEUED else -1, topic))
        return run

    def sweep(self, conn: sa.Connection, *, now: dt.datetime, limit: int = 1000) -> int:
        """Promote every key (up to ``limit`` of them) whose queued rows nothing holds back any more."""
        keys = list(conn.execute(self._queued_keys, {"limit": limit}).scalars())
        return self.promote_keys(conn, keys, now=now)

    def _update(self, conn: sa.Connection, seqs: list[int], now: dt.datetime) -> int:
        if not seqs:
            return 0
        statement = self._family(conn, self._promote)
        return int(conn.execute(statement, {"seqs": self._seqs(conn, seqs), "now": now}).rowcount)
