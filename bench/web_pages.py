"""The web dashboard's pages on a big outbox: how long each answers (issue 18).

``python -m bench.web_pages --db postgresql`` (or ``mariadb``, ``sqlite``) fills a database of its own,
``webbench`` (a file, ``/tmp/webbench.db``, for SQLite), with ``--delivered`` delivered messages (default
5,000,000) and ``--waiting`` waiting ones (default 100,000: pending, some due later, inflight under a
lease, failed, dead, and parked keys with messages queued behind them), then drives the dashboard
(:func:`outbox.web.create_app`, actions allowed) in process with Starlette's ``TestClient`` and times
each page's GET: one warm-up request, then ``--rounds`` timed ones. The pages are the issue's list (the
overview, lists by status, topic, key and a deep keyset page, a message with its key's neighbours, the
keys page, the actions' dry runs), then three of them asked about something rare (a key with few
messages, a topic with none, a message alone in its key), where no index covers the filter. The table
gives per page the median, p90 and maximum, the time spent in the driver's ``execute`` (median over the
rounds) and the statement count, the answer's size and what it showed, and PASS/FAIL against the
issue's target: a median under 300 ms on PostgreSQL, under 1 s on MariaDB (SQLite: reported against
PostgreSQL's target, as a guide only). For every page over its target it then prints the statements the
page ran, with their time, and the plan of the costly ones, run again with the same parameters
(PostgreSQL: ``EXPLAIN (ANALYZE, BUFFERS)``; MariaDB: ``ANALYZE``; SQLite: ``EXPLAIN QUERY PLAN``).

The load is set-based: the waiting rows are laid out here and inserted in one batch, the delivered rows
by ``INSERT ... SELECT`` over a generated series (PostgreSQL ``generate_series``, MariaDB's sequence
engine, a recursive CTE on SQLite), with the secondary indexes dropped during the load and rebuilt after
it, then ``VACUUM ANALYZE`` / ``ANALYZE TABLE`` / ``ANALYZE``. ``--keep`` reuses a database already
loaded with the same counts (the database is left in place after every run). Rows follow a live outbox's
shape: ``seq`` in ``created_at`` order over the last 7 days, 20 topics, half of the messages keyed over
10,000 keys, JSON payloads of about 200 bytes, delivered a few milliseconds after their creation; the
waiting backlog is the newest rows, dead and parked messages are spread over the whole week, failed ones
over its last hours. Where the schema has the relays' heartbeat tables, they get two relays' week of
per-minute rows (what the overview's charts read). The built indexes are denser than those of a table
that grew row by row, so these are lower bounds for a table of the same size.

Run it alone (``flock /tmp/bench.lock python -m bench.web_pages --db postgresql``): it measures
latency. A benchmark, not a test: it records nothing under ``bench/results``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import sqlalchemy as sa
from starlette.testclient import TestClient

import outbox
from bench.harness import MARIADB_ADMIN, POSTGRES_ADMIN, log, percentile
from outbox._clock import utcnow
from outbox._schema import index_applies, tables_for
from outbox.web import create_app

DATABASE = "webbench"
SQLITE_PATH = Path("/tmp/webbench.db")
#: a page's median must stay under this (issue 18); SQLite has no target of its own
TARGET_MS = {"postgresql": 300.0, "mariadb": 1000.0, "sqlite": 300.0}

TOPICS = (
    "orders.created",
    "orders.paid",
    "orders.shipped",
    "orders.cancelled",
    "orders.refunded",
    "payments.authorized",
    "payments.captured",
    "payments.failed",
    "invoices.issued",
    "invoices.paid",
    "mail.sent",
    "mail.bounced",
    "sms.sent",
    "users.signed_up",
    "users.updated",
    "users.deleted",
    "inventory.reserved",
    "inventory.released",
    "shipments.dispatched",
    "shipments.delivered",
)
#: every second message is keyed, over this many keys; held keys (failed, parked) come after them
KEYS = 10_000
#: messages queued behind each parked key
QUEUED_PER_PARKED = 10
HISTORY = dt.timedelta(days=7)
#: rows per INSERT ... SELECT of delivered messages (one transaction each)
CHUNK = 500_000
#: relays whose heartbeat and per-minute stats rows the overview reads
RELAYS = 2


def key_name(number: int) -> str:
    return f"customer-{number:05d}"


# --- the data ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Which ``seq`` holds what. Row ``i`` (1-based) was created ``i * step_us`` after ``start``; unless
    :attr:`waiting_rows` says otherwise it is delivered, with the topic, key and payload the loader's SQL
    gives it (the same rules as :meth:`topic_of` and :meth:`key_of`)."""

    delivered: int
    waiting: int
    now: dt.datetime

    @property
    def total(self) -> int:
        return self.delivered + self.waiting

    @property
    def start(self) -> dt.datetime:
        return self.now.replace(microsecond=0) - HISTORY

    @property
    def step_us(self) -> int:
        return int(HISTORY.total_seconds() * 1_000_000) // self.total

    def created(self, seq: int) -> dt.datetime:
        return self.start + dt.timedelta(microseconds=seq * self.step_us)

    @staticmethod
    def topic_of(seq: int) -> str:
        return TOPICS[(seq // 7) % len(TOPICS)]

    @staticmethod
    def key_of(seq: int) -> str | None:
        return key_name((seq // 2) % KEYS) if seq % 2 == 0 else None

    @staticmethod
    def payload_of(seq: int, reference: str) -> bytes:
        value = {
            "order_id": seq,
            "customer": f"c-{seq % 100_000}",
            "amount_cents": (seq * 37) % 100_000,
            "currency": "EUR",
            "items": 1 + seq % 5,
            "reference": reference,
            "note": uuid.uuid4().hex,
        }
        return json.dumps(value).encode()

    # the counts of each kind of waiting message (100,000 waiting: 1,000 failed, 2,000 dead, 100 parked
    # keys with 1,000 queued messages, 500 inflight, 95,400 pending of which a tenth is due later)
    @property
    def failed(self) -> int:
        return self.waiting // 100

    @property
    def dead(self) -> int:
        return self.waiting // 50

    @property
    def parked(self) -> int:
        return self.waiting // 1000

    @property
    def inflight(self) -> int:
        return self.waiting // 200

    @property
    def pending(self) -> int:
        spread = self.failed + self.dead + self.parked * (1 + QUEUED_PER_PARKED)
        return self.waiting - spread - self.inflight

    @cached_property
    def waiting_rows(self) -> dict[int, dict[str, Any]]:
        """Every message not delivered, by seq: the newest rows are the backlog (inflight first, then
        pending), dead and parked ones are spread over the week (each parked head with its queued
        messages a little later), failed ones over the hours before the backlog."""
        rows: dict[int, dict[str, Any]] = {}
        backlog = self.inflight + self.pending
        history = self.total - backlog
        now = self.now

        def free(seq: int) -> int:
            """``seq`` if no row has it yet, else the nearest free one after it, or before it, in the
            history (the backlog's seqs are all taken)."""
            seq = max(1, min(seq, history))
            later = next((s for s in range(seq, history + 1) if s not in rows), None)
            return later if later is not None else next(s for s in range(seq - 1, 0, -1) if s not in rows)

        def add(seq: int, status: str, key: str | None, **columns: Any) -> None:
            created = self.created(seq)
            rows[seq] = {
                "seq": seq,
                "id": uuid.uuid4(),
                "topic": self.topic_of(seq),
                "msg_key": key,
                "payload": self.payload_of(seq, uuid.uuid4().hex),
                "content_type": "application/json",
                "headers": None,
                "status": status,
                "attempts": 0,
                "due_at": None,
                "lease_token": None,
                "created_at": created,
                "last_attempt_at": None,
                "delivered_at": None,
                "last_error": None,
                **columns,
            }

        def gave_up(seq: int) -> dict[str, Any]:
            return {
                "attempts": 10,
                "last_attempt_at": self.created(seq) + dt.timedelta(minutes=30),
                "last_error": "BrokerError: topic authorization failed (permanent)",
            }

        finished = self.dead + self.parked
        every = finished // max(1, self.parked) if self.parked else 0
        held = 0
        for n in range(finished):
            seq = free(max(1, (2 * n + 1) * history // (2 * finished)))
            if every and n % every == every - 1 and held < self.parked:
                held_key = key_name(KEYS + held)
                held += 1
                add(seq, "parked", held_key, **gave_up(seq))
                for j in range(1, QUEUED_PER_PARKED + 1):
                    add(free(seq + 13 * j), "pending", held_key)  # queued: due_at NULL until the key is free
            else:
                add(seq, "dead", self.key_of(seq), **gave_up(seq))
        recent = max(self.failed * 10, history // 50)  # failed: spread over the hours before the backlog
        for n in range(self.failed):
            seq = free(history - recent + 1 + n * recent // max(1, self.failed))
            add(
                seq,
                "failed",
                key_name(KEYS + self.parked + n) if n % 2 == 0 else None,
                attempts=1 + n % 8,
                due_at=now + dt.timedelta(seconds=5 + n % 600),
                last_attempt_at=now - dt.timedelta(seconds=1 + n % 60),
                last_error="BrokerError: KafkaTimeoutError: batch expired after 30000 ms",
            )
        for n, seq in enumerate(range(history + 1, self.total + 1)):
            key = self.key_of(seq)
            if n < self.inflight:
                lease = {"lease_token": uuid.uuid4().hex, "last_attempt_at": now - dt.timedelta(seconds=2)}
                add(seq, "inflight", key, attempts=1, due_at=now + dt.timedelta(seconds=28), **lease)
            elif n % 10 == 9:
                add(seq, "pending", key, due_at=now + dt.timedelta(minutes=1 + n % 120))  # delayed
            else:
                add(seq, "pending", key, due_at=self.created(seq))
        assert len(rows) == self.waiting, (len(rows), self.waiting)
        return rows

    def middle_keyed_delivered(self) -> int:
        seq = self.total // 2 + (self.total // 2) % 2
        while seq in self.waiting_rows:
            seq += 2
        return seq

    def middle_dead(self) -> int:
        middle = self.total // 2
        dead = [s for s, row in self.waiting_rows.items() if row["status"] == "dead"]
        return min(dead, key=lambda s: abs(s - middle))

    def newest_failed_keyed(self) -> int:
        """A message whose key has no other message before or after it: a retry's held key."""
        return max(s for s, row in self.waiting_rows.items() if row["status"] == "failed" and row["msg_key"])


class Fragments:
    """The few SQL expressions the loader writes differently on each database."""

    def __init__(self, backend: str, uuid_type: str = "uuid") -> None:
        self.backend = backend
        self.uuid_type = uuid_type

    def series(self, lo: int, hi: int) -> tuple[str, str, str]:
        """(a ``WITH`` before the INSERT, the FROM item, the expression of the row's number)."""
        if self.backend == "postgresql":
            return "", f"generate_series(CAST({lo} AS bigint), {hi}) AS g(i)", "g.i"
        if self.backend == "mariadb":
            return "", f"seq_{lo}_to_{hi} AS g", "g.seq"
        recursive = f"WITH RECURSIVE g(i) AS (SELECT {lo} UNION ALL SELECT i + 1 FROM g WHERE i < {hi}) "
        return recursive, "g", "g.i"

    def div(self, a: str, b: int) -> str:
        return f"({a} DIV {b})" if self.backend == "mariadb" else f"({a} / {b})"

    def concat(self, *parts: str) -> str:
        if self.backend == "mariadb":
            return f"CONCAT({', '.join(parts)})"
        if self.backend == "postgresql":
            return " || ".join(f"CAST({p} AS text)" if not p.startswith("'") else p for p in parts)
        return " || ".join(p if p.startswith("'") else f"({p})" for p in parts)

    def key(self, number: str) -> str:
        if self.backend == "postgresql":
            return f"'customer-' || lpad(CAST({number} AS text), 5, '0')"
        if self.backend == "mariadb":
            return f"CONCAT('customer-', LPAD({number}, 5, '0'))"
        return f"printf('customer-%05d', {number})"

    def hex32(self, i: str) -> str:
        """32 hex digits, different per row."""
        if self.backend == "postgresql":
            return f"md5(CAST({i} AS text))"
        if self.backend == "mariadb":
            return f"MD5({i})"
        return "lower(hex(randomblob(16)))"

    def as_bytes(self, text: str) -> str:
        if self.backend == "postgresql":
            return f"convert_to({text}, 'UTF8')"
        return text if self.backend == "mariadb" else f"CAST({text} AS BLOB)"

    def new_id(self) -> str:
        if self.backend == "postgresql":
            return "gen_random_uuid()"
        if self.backend == "mariadb":
            # a native UUID column on MariaDB 10.7+ (what sa.Uuid creates there), else CHAR(32) hex
            return "UUID()" if self.uuid_type == "uuid" else "REPLACE(UUID(), '-', '')"
        return "lower(hex(randomblob(16)))"  # sa.Uuid on SQLite: CHAR(32) hex

    def at(self, micros: str) -> str:
        """``:start`` plus ``micros`` microseconds, as the column stores a time."""
        if self.backend == "postgresql":
            return f"(CAST(:start AS timestamp) + ({micros}) * INTERVAL '1 microsecond')"
        if self.backend == "mariadb":
            return f"TIMESTAMPADD(MICROSECOND, {micros}, :start)"
        # SQLAlchemy's SQLite DateTime: 'YYYY-MM-DD HH:MM:SS.ffffff'
        return (
            f"(strftime('%Y-%m-%d %H:%M:%S', :start_epoch + ({micros}) / 1000000, 'unixepoch')"
            f" || '.' || printf('%06d', ({micros}) % 1000000))"
        )


def sql_text(value: str) -> str:
    """``value`` as an SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def delivered_insert(frag: Fragments, lo: int, hi: int) -> str:
    """``INSERT ... SELECT`` of the delivered rows ``lo..hi`` (skipping the seqs in ``webbench_taken``)."""
    with_clause, source, i = frag.series(lo, hi)
    topic = " ".join(f"WHEN {n} THEN '{name}'" for n, name in enumerate(TOPICS))
    payload = frag.concat(  # the JSON of Layout.payload_of
        sql_text('{"order_id": '),
        i,
        sql_text(', "customer": "c-'),
        f"{i} % 100000",
        sql_text('", "amount_cents": '),
        f"({i} * 37) % 100000",
        sql_text(', "currency": "EUR", "items": '),
        f"1 + {i} % 5",
        sql_text(', "reference": "'),
        frag.hex32(i),
        sql_text('", "note": "'),
        frag.hex32(f"{i} + 1"),
        sql_text('"}'),
    )
    created = f"{i} * :step"
    return f"""{with_clause}INSERT INTO outbox (seq, id, topic, msg_key, payload, content_type, headers,
        status, attempts, due_at, lease_token, created_at, last_attempt_at, delivered_at, last_error)
    SELECT {i}, {frag.new_id()},
        CASE {frag.div(i, 7)} % {len(TOPICS)} {topic} END,
        CASE WHEN {i} % 2 = 0 THEN {frag.key(f"{frag.div(i, 2)} % {KEYS}")} END,
        {frag.as_bytes(payload)}, 'application/json', NULL, 'delivered', 1, NULL, NULL,
        {frag.at(created)}, {frag.at(f"{created} + 1000")}, {frag.at(f"{created} + (2 + {i} % 40) * 1000")},
        NULL
    FROM {source}
    WHERE NOT EXISTS (SELECT 1 FROM webbench_taken w WHERE w.seq = {i})"""


# --- the database ------------------------------------------------------------------------------------------


def admin_engine(backend: str) -> sa.Engine:
    """An AUTOCOMMIT engine on the server (PostgreSQL: its ``postgres`` database), to create databases."""
    if backend == "postgresql":
        url = sa.make_url(POSTGRES_ADMIN).set(database="postgres")
    else:
        url = sa.make_url(MARIADB_ADMIN).set(database=None)
    text = url.render_as_string(hide_password=False)
    return outbox.create_engine(text, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")


def database_url(backend: str) -> str:
    if backend == "sqlite":
        return f"sqlite:///{SQLITE_PATH}"
    admin = POSTGRES_ADMIN if backend == "postgresql" else MARIADB_ADMIN
    return sa.make_url(admin).set(database=DATABASE).render_as_string(hide_password=False)


def loaded_rows(backend: str) -> int | None:
    """The outbox's row count in the existing ``webbench`` database; None if there is none."""
    if backend == "sqlite":
        if not SQLITE_PATH.exists():
            return None
    else:
        admin = admin_engine(backend)
        query = (
            "SELECT 1 FROM pg_database WHERE datname = :name"
            if backend == "postgresql"
            else "SELECT 1 FROM information_schema.schemata WHERE schema_name = :name"
        )
        with admin.connect() as conn:
            exists = conn.execute(sa.text(query), {"name": DATABASE}).first() is not None
        admin.dispose()
        if not exists:
            return None
    engine = outbox.create_engine(database_url(backend), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("outbox"):
                return None
            return int(conn.execute(sa.text("SELECT count(*) FROM outbox")).scalar_one())
    finally:
        engine.dispose()


def recreate_database(backend: str) -> None:
    if backend == "sqlite":
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{SQLITE_PATH}{suffix}").unlink(missing_ok=True)
        return
    admin = admin_engine(backend)
    force = " WITH (FORCE)" if backend == "postgresql" else ""
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {DATABASE}{force}"))
        conn.execute(sa.text(f"CREATE DATABASE {DATABASE}"))
    admin.dispose()


def secondary_indexes(backend: str) -> list[sa.Index]:
    dialect = "mysql" if backend == "mariadb" else backend
    return [ix for ix in tables_for().messages.indexes if index_applies(ix, dialect)]


def drop_indexes(conn: sa.Connection, backend: str) -> None:
    """Drop the secondary indexes (and, but on SQLite, the unique id) so the load writes only the table."""
    indexes = secondary_indexes(backend)
    if backend == "mariadb":
        drops = ", ".join(f"DROP INDEX {ix.name}" for ix in indexes)
        conn.execute(sa.text(f"ALTER TABLE outbox DROP INDEX uq_outbox_id, {drops}"))
        return
    for index in indexes:
        conn.execute(sa.schema.DropIndex(index))
    if backend == "postgresql":
        conn.execute(sa.text("ALTER TABLE outbox DROP CONSTRAINT uq_outbox_id"))


def build_indexes(conn: sa.Connection, backend: str) -> None:
    """Build what :func:`drop_indexes` dropped, exactly as the schema declares it, from the loaded rows."""
    indexes = secondary_indexes(backend)
    if backend == "mariadb":  # one ALTER: one pass over the table for every index
        adds = ", ".join(f"ADD INDEX {ix.name} ({', '.join(c.name for c in ix.columns)})" for ix in indexes)
        conn.execute(sa.text(f"ALTER TABLE outbox ADD UNIQUE INDEX uq_outbox_id (id), {adds}"))
        return
    if backend == "postgresql":
        conn.execute(sa.text("SET maintenance_work_mem = '1GB'"))
        conn.execute(sa.text("ALTER TABLE outbox ADD CONSTRAINT uq_outbox_id UNIQUE (id)"))
    for index in indexes:
        conn.execute(sa.schema.CreateIndex(index))


def fill_activity(engine: sa.Engine, layout: Layout) -> None:
    """What the relays' heartbeats would have written over the week, where the schema has those tables
    and they are empty: a row per relay, a per-minute stats row per relay (the overview's charts read
    them) and a few dashboard audit rows."""
    tables = tables_for()
    relays, stats, audit = (getattr(tables, name, None) for name in ("relays", "stats", "audit"))
    if relays is None or stats is None or audit is None:
        return
    with engine.begin() as conn:
        if conn.execute(sa.select(sa.func.count()).select_from(stats)).scalar_one():
            return
        now = layout.now.replace(second=0, microsecond=0)
        minutes = int(HISTORY.total_seconds() // 60) + 24 * 60  # the 8 days the heartbeats keep
        per_minute = max(1, layout.delivered // (minutes - 24 * 60) // RELAYS)
        for n in range(RELAYS):
            relay_id = f"relay-{n}.example:{4000 + n}:{n:08x}"
            conn.execute(
                sa.insert(relays).values(
                    relay_id=relay_id,
                    host=f"relay-{n}.example",
                    pid=4000 + n,
                    version=outbox.__version__,
                    routes="*",
                    started_at=now - HISTORY,
                    seen_at=layout.now,
                    progress_at=layout.now,
                    stopped_at=None,
                    delivered=layout.delivered // RELAYS,
                    failed=layout.failed // RELAYS,
                    dead=layout.dead // RELAYS,
                )
            )
            rows = [
                {
                    "minute": now - dt.timedelta(minutes=m),
                    "relay_id": relay_id,
                    "delivered": per_minute + m % 7,
                    "failed": int(m % 5 == 0),
                    "dead": int(m % 97 == 0),
                    "latency": json.dumps(
                        [0, 2, 10, 40, 120, 200, per_minute // 2, 30, 8, 3, 1, 0, 0, 0, 0, 0, 0]
                    ),
                }
                for m in range(minutes)
            ]
            for at in range(0, len(rows), 5000):
                conn.execute(sa.insert(stats), rows[at : at + 5000])
        conn.execute(
            sa.insert(audit),
            [
                {
                    "at": layout.now - dt.timedelta(hours=5 * n),
                    "who": "ops@example.com",
                    "client": "10.0.0.7",
                    "action": "replay",
                    "target": "status=dead topic=orders.*",
                    "count": 10 + n,
                }
                for n in range(30)
            ],
        )


def load(backend: str, layout: Layout) -> float:
    """Create ``webbench`` afresh and fill it as ``layout`` says; the seconds it took."""
    began = time.perf_counter()
    recreate_database(backend)
    engine = outbox.create_engine(database_url(backend))
    t = tables_for().messages
    taken = sa.Table("webbench_taken", sa.MetaData(), sa.Column("seq", sa.BigInteger, primary_key=True))
    with engine.begin() as conn:
        outbox.upgrade(conn)
        drop_indexes(conn, backend)
        taken.create(conn)
    uuid_type = "uuid"
    if backend == "mariadb":
        with engine.connect() as conn:
            uuid_type = conn.execute(
                sa.text(
                    "SELECT data_type FROM information_schema.columns "
                    "WHERE table_schema = DATABASE() AND table_name = 'outbox' AND column_name = 'id'"
                )
            ).scalar_one()
    frag = Fragments(backend, uuid_type)

    rows = list(layout.waiting_rows.values())
    log(f"{backend}: inserting {len(rows):,} waiting rows")
    with engine.begin() as conn:
        for at in range(0, len(rows), 10_000):
            batch = rows[at : at + 10_000]
            conn.execute(sa.insert(t), batch)
            conn.execute(sa.insert(taken), [{"seq": row["seq"]} for row in batch])
    start_epoch = int(layout.start.replace(tzinfo=dt.UTC).timestamp())  # stored times are naive UTC
    params = {"step": layout.step_us, "start": layout.start, "start_epoch": start_epoch}
    for lo in range(1, layout.total + 1, CHUNK):
        hi = min(layout.total, lo + CHUNK - 1)
        sql = delivered_insert(frag, lo, hi)
        used = set(re.findall(r"(?<![:\w]):(\w+)", sql))
        with engine.begin() as conn:
            conn.execute(sa.text(sql), {k: v for k, v in params.items() if k in used})
        log(f"{backend}: delivered rows up to seq {hi:,} ({time.perf_counter() - began:.0f} s)")
    log(f"{backend}: building the indexes")
    with engine.begin() as conn:
        taken.drop(conn)
        build_indexes(conn, backend)
        if backend == "postgresql":
            conn.execute(sa.text(f"SELECT setval(pg_get_serial_sequence('outbox', 'seq'), {layout.total})"))
    fill_activity(engine, layout)
    log(f"{backend}: analyzing ({time.perf_counter() - began:.0f} s)")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        if backend == "postgresql":
            # VACUUM too: autovacuum would do it soon after such a load anyway (the visibility map lets
            # index-only scans skip the heap); doing it now keeps runs from depending on when it does
            conn.execute(sa.text("VACUUM (ANALYZE) outbox"))
        elif backend == "mariadb":
            conn.execute(sa.text("ANALYZE TABLE outbox")).all()
        else:
            conn.execute(sa.text("ANALYZE"))
    engine.dispose()
    return time.perf_counter() - began


def describe_server(engine: sa.Engine) -> str:
    """Server version, memory settings and the table's size on disk (context for the numbers)."""
    backend = engine.dialect.name
    with engine.connect() as conn:
        if backend == "postgresql":
            return str(
                conn.execute(
                    sa.text(
                        "SELECT concat_ws(', ', split_part(version(), ' on ', 1), "
                        "'shared_buffers=' || current_setting('shared_buffers'), "
                        "'work_mem=' || current_setting('work_mem'), "
                        "'table=' || pg_size_pretty(pg_table_size('outbox')), "
                        "'indexes=' || pg_size_pretty(pg_indexes_size('outbox')))"
                    )
                ).scalar_one()
            )
        if backend in ("mysql", "mariadb"):
            version, pool, data, index = conn.execute(
                sa.text(
                    "SELECT version(), @@innodb_buffer_pool_size, data_length, index_length "
                    "FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = 'outbox'"
                )
            ).one()
            mib = 1024 * 1024
            return (
                f"MariaDB {version}, innodb_buffer_pool_size={int(pool) // mib} MiB, "
                f"table={int(data) // mib} MiB, indexes={int(index) // mib} MiB"
            )
        version = conn.execute(sa.text("SELECT sqlite_version()")).scalar_one()
        return f"SQLite {version}, file={SQLITE_PATH.stat().st_size // (1024 * 1024)} MiB"


# --- timing the pages --------------------------------------------------------------------------------------


@dataclass
class Statement:
    text: str
    params: Any
    ms: float


class StatementLog:
    """Every statement the engine runs while :attr:`recording`, with its parameters and duration."""

    def __init__(self, engine: sa.Engine) -> None:
        self.recording = False
        self.statements: list[Statement] = []
        sa.event.listen(engine, "before_cursor_execute", self._before)
        sa.event.listen(engine, "after_cursor_execute", self._after)

    def _before(
        self, conn: sa.Connection, _cursor: Any, text: str, params: Any, context: Any, _many: bool
    ) -> None:
        conn.info.setdefault("webbench_started", []).append(time.perf_counter())

    def _after(
        self, conn: sa.Connection, _cursor: Any, text: str, params: Any, context: Any, _many: bool
    ) -> None:
        started = conn.info["webbench_started"].pop()
        if self.recording:
            self.statements.append(Statement(text, params, (time.perf_counter() - started) * 1000))

    def take(self) -> list[Statement]:
        taken, self.statements = self.statements, []
        return taken


@dataclass(frozen=True)
class Page:
    name: str
    path: str


@dataclass
class Timing:
    page: Page
    ms: list[float] = field(default_factory=list)
    sql_ms: list[float] = field(default_factory=list)
    statements: list[Statement] = field(default_factory=list)  # those of the median request
    http_status: int = 0
    size: int = 0
    shown: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.ms)


def pages_of(layout: Layout) -> list[Page]:
    """The issue's pages, then the same pages asked what is rare: they cost the most where an index does
    not cover the filter (the list's newest page then reads back until it has a page, or to the start)."""
    busy_key = key_name(42)
    held_key = key_name(KEYS)  # a parked head and the messages queued behind it
    return [
        Page("overview", "/"),
        Page("messages", "/messages"),
        Page("messages status=dead", "/messages?status=dead"),
        Page("messages status=pending", "/messages?status=pending"),
        Page("messages topic=orders.*", "/messages?" + urlencode({"topic": "orders.*"})),
        Page(f"messages key={busy_key}", "/messages?" + urlencode({"key": busy_key})),
        Page("messages delivered, deep page", f"/messages?status=delivered&after={layout.total // 2}"),
        Page("message (keyed, middle)", f"/messages/{layout.middle_keyed_delivered()}"),
        Page("keys", "/keys"),
        Page("replay dry run status=dead", "/actions/replay?status=dead"),
        Page("purge dry run status=delivered", "/actions/purge?status=delivered"),
        Page("replay dry run ref=<dead seq>", f"/actions/replay?ref={layout.middle_dead()}"),
        # the same pages, asked about something rare
        Page(f"rare: messages key={held_key}", "/messages?" + urlencode({"key": held_key})),
        Page("rare: messages topic=<none of it>", "/messages?" + urlencode({"topic": "orders.archived"})),
        Page("rare: message (key has no other)", f"/messages/{layout.newest_failed_keyed()}"),
    ]


def shown(html: str) -> str:
    """What a page showed: the dry run's count, the rows or keys listed, the overview's total."""
    if found := re.search(r'id="dry-count">(more than )?(\d+)<', html):
        return f"count {'> ' if found.group(1) else ''}{int(found.group(2)):,}"
    if keys := html.count("data-key="):
        return f"{keys} keys"
    if found := re.search(r"</code>: (about )?(\d+) message\(s\)", html):
        return f"total {'~' if found.group(1) else ''}{int(found.group(2)):,}"
    return f"{html.count('data-seq=')} rows"


def time_pages(engine: sa.Engine, pages: list[Page], rounds: int) -> list[Timing]:
    statements = StatementLog(engine)
    app = create_app(engine, allow_actions=True)
    timings = []
    # a page that fails is reported (its HTTP status in the table), not the end of the run
    with TestClient(app, raise_server_exceptions=False) as client:
        for page in pages:
            timing = Timing(page)
            answer = client.get(page.path)  # warm-up
            runs: list[tuple[float, list[Statement]]] = []
            for _ in range(rounds):
                statements.recording = True
                began = time.perf_counter()
                answer = client.get(page.path)
                ms = (time.perf_counter() - began) * 1000
                statements.recording = False
                runs.append((ms, statements.take()))
            timing.ms = [ms for ms, _ in runs]
            timing.sql_ms = [sum(s.ms for s in ran) for _, ran in runs]
            timing.statements = sorted(runs, key=lambda run: run[0])[len(runs) // 2][1]
            timing.http_status = answer.status_code
            timing.size = len(answer.content)
            timing.shown = shown(answer.text)
            log(f"{page.name}: median {timing.median:,.1f} ms")
            timings.append(timing)
    return timings


def print_table(backend: str, timings: list[Timing]) -> None:
    target = TARGET_MS[backend]
    header = (
        f"{'page':34} {'median ms':>10} {'p90 ms':>9} {'max ms':>9} {'sql ms':>9} {'stmts':>5}"
        f" {'http':>4} {'KiB':>6}  {'shown':18} verdict (< {target:.0f} ms)"
    )
    print(header)
    print("-" * len(header))
    for t in timings:
        ordered = sorted(t.ms)
        verdict = "PASS" if t.median < target else "FAIL"
        if backend == "sqlite":
            verdict = f"({verdict}, guide only)"
        print(
            f"{t.page.name:34} {t.median:10.1f} {percentile(ordered, 0.9):9.1f} {ordered[-1]:9.1f}"
            f" {statistics.median(t.sql_ms):9.1f} {len(t.statements):5d} {t.http_status:4d}"
            f" {t.size / 1024:6.1f}  {t.shown:18} {verdict}"
        )


def explain(engine: sa.Engine, statement: Statement) -> list[str]:
    """The plan of ``statement`` run again with its parameters (and rolled back)."""
    backend = engine.dialect.name
    prefix = {
        "postgresql": "EXPLAIN (ANALYZE, BUFFERS) ",
        "mysql": "ANALYZE ",
        "mariadb": "ANALYZE ",
        "sqlite": "EXPLAIN QUERY PLAN ",
    }[backend]
    with engine.connect() as conn:
        result = conn.exec_driver_sql(prefix + statement.text, statement.params)
        names = list(result.keys())
        rows = result.all()
        conn.rollback()
    if backend == "postgresql":
        return [row[0] for row in rows]
    if backend == "sqlite":
        return [str(row[-1]) for row in rows]
    return [" | ".join(names)] + [" | ".join("" if v is None else str(v) for v in row) for row in rows]


def print_slow(engine: sa.Engine, backend: str, timings: list[Timing]) -> None:
    """For each page over its target: its statements (grouped by text) and the plans of the costly ones."""
    target = TARGET_MS[backend]
    for t in timings:
        if t.median < target:
            continue
        print(f"\n=== {t.page.name} ({t.page.path}): median {t.median:,.1f} ms, target {target:.0f} ms ===")
        grouped: dict[str, list[Statement]] = {}
        for s in t.statements:
            grouped.setdefault(s.text, []).append(s)
        total = sum(s.ms for s in t.statements) or 1.0
        ranked = sorted(grouped.values(), key=lambda same: -sum(s.ms for s in same))
        for n, same in enumerate(ranked):
            spent = sum(s.ms for s in same)
            share = 100 * spent / total
            print(f"\n-- statement {n + 1}: run {len(same)}x, {spent:,.1f} ms ({share:.0f} % of SQL)")
            print(same[0].text.strip())
            print(f"-- parameters (first run): {same[0].params!r}")
            if n < 3 and spent >= 0.05 * total:
                for line in explain(engine, same[0]):
                    print(f"   {line}")


# --- the command -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.web_pages", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=("postgresql", "mariadb", "sqlite"), required=True)
    parser.add_argument(
        "--delivered", type=int, default=5_000_000, help="delivered messages (default 5,000,000)"
    )
    parser.add_argument("--waiting", type=int, default=100_000, help="waiting messages (default 100,000)")
    parser.add_argument("--rounds", type=int, default=7, help="timed requests per page (default 7)")
    parser.add_argument(
        "--keep", action="store_true", help="reuse the webbench database if it holds as many rows already"
    )
    args = parser.parse_args(argv)
    if args.waiting < 1000 or args.delivered < 1000 or args.rounds < 1:
        parser.error("--delivered and --waiting must be at least 1000, --rounds at least 1")
    backend: str = args.db
    layout = Layout(args.delivered, args.waiting, utcnow())

    found = loaded_rows(backend) if args.keep else None
    if found == layout.total:
        print(f"{backend}: reusing database {DATABASE} ({found:,} rows)")
        engine = outbox.create_engine(database_url(backend))
        with engine.begin() as conn:
            outbox.upgrade(conn)  # tables a newer schema added since the load (additive)
        fill_activity(engine, layout)
        engine.dispose()
    else:
        if args.keep:
            log(f"{backend}: {DATABASE} holds {found or 0:,} rows, not {layout.total:,}: loading it afresh")
        seconds = load(backend, layout)
        print(
            f"{backend}: loaded {layout.delivered:,} delivered + {layout.waiting:,} waiting messages "
            f"in {seconds:,.1f} s"
        )

    engine = outbox.create_engine(database_url(backend))
    print(describe_server(engine))
    timings = time_pages(engine, pages_of(layout), args.rounds)
    print()
    print(f"{backend}: {layout.total:,} messages, median of {args.rounds} requests after one warm-up")
    print_table(backend, timings)
    print_slow(engine, backend, timings)
    engine.dispose()
    failed = [t.page.name for t in timings if t.median >= TARGET_MS[backend]]
    print(
        f"\n{len(timings) - len(failed)} of {len(timings)} pages under {TARGET_MS[backend]:.0f} ms"
        + (f"; over it: {', '.join(failed)}" if failed else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
