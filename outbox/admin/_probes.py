"""What ``outbox doctor`` asks each database, in one table: :data:`PROBES`, one :class:`Probes` per
database family (keyed by its :class:`~outbox._dialects.Dialect`).

The probes return facts (transactions, dead rows, the server's clock, whether a NOTIFY arrived);
:mod:`outbox.admin._doctor` judges them against its thresholds and words the findings. A probe a family cannot
have is ``None`` there, and its check is not run:

==================  ==========================  ============================  =====================
                    PostgreSQL                  MariaDB / MySQL               SQLite
==================  ==========================  ============================  =====================
long transactions   pg_stat_activity            information_schema.innodb_trx (none: one process)
                    (this database)             (the whole server: InnoDB
                                                purge is server-wide)
bloat               pg_stat_user_tables         information_schema.tables     PRAGMA freelist_count
                    n_dead_tup vs n_live_tup    data_free vs data + index
server clock        clock_timestamp()           NOW(6)                        (none: no server)
LISTEN round trip   LISTEN + pg_notify          (none)                        (none)
==================  ==========================  ============================  =====================
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from outbox._dialects import MARIADB, POSTGRESQL, SQLITE, Dialect


@dataclass(frozen=True)
class Transaction:
    """An open transaction: ``ident`` is what ends it (a PostgreSQL pid, a MariaDB thread id)."""

    ident: int
    seconds: float
    state: str
    query: str


@dataclass(frozen=True)
class Bloat:
    dead: int  # dead rows (PostgreSQL) or free bytes (MariaDB, SQLite)
    live: int  # live rows, or bytes in use
    unit: str  # "rows" or "bytes"


@dataclass(frozen=True)
class ListenResult:
    """A LISTEN/NOTIFY round trip between two connections, and signs of a transaction-mode pooler."""

    channel: str
    heard: bool
    seconds: float
    pooler_signs: tuple[str, ...]


@dataclass(frozen=True)
class Probes:
    label: str
    version_sql: str
    #: SQL giving the database's clock as seconds since the epoch (None: no server clock, SQLite)
    server_epoch: str | None
    bloat: Callable[[sa.Connection, str], Bloat | None]
    #: what to run about bloat (``{table}`` is filled in)
    bloat_fix: str
    long_transactions: Callable[[sa.Connection, float], list[Transaction]] | None = None
    #: how to end a transaction found by ``long_transactions``
    kill_hint: str = ""
    listen: Callable[[sa.Engine, float], ListenResult] | None = None


# --- PostgreSQL -----------------------------------------------------------------------------------------


def _pg_long_transactions(conn: sa.Connection, seconds: float) -> list[Transaction]:
    # Only this database's: other databases' transactions do not hold back VACUUM of its tables.
    rows = conn.execute(
        sa.text(
            "SELECT pid, EXTRACT(EPOCH FROM clock_timestamp() - xact_start), state, coalesce(query, '') "
            "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend' AND xact_start IS NOT NULL "
            "AND clock_timestamp() - xact_start > make_interval(secs => :seconds) ORDER BY xact_start"
        ),
        {"seconds": seconds},
    )
    return [Transaction(int(r[0]), float(r[1]), str(r[2] or ""), str(r[3])) for r in rows]


def _pg_bloat(conn: sa.Connection, table: str) -> Bloat | None:
    row = conn.execute(
        sa.text(
            "SELECT n_dead_tup, n_live_tup FROM pg_stat_user_tables "
            "WHERE relname = :table AND schemaname = current_schema()"
        ),
        {"table": table},
    ).first()
    return None if row is None else Bloat(int(row[0]), int(row[1]), "rows")


def _pg_listen(engine: sa.Engine, timeout: float) -> ListenResult:
    """A NOTIFY from one connection must reach a LISTEN on another: that is what wakes relays elsewhere.

    PgBouncer in transaction mode cannot be asked directly (``SHOW pool_mode`` exists only on its admin
    console), so look for its traces: the server process behind one client connection changes between
    transactions, or the port is PgBouncer's default.
    """
    signs: list[str] = []
    with engine.connect() as conn:
        pids = set()
        for _ in range(5):
            pids.add(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar())
            conn.commit()
    if len(pids) > 1:
        signs.append("the server process changed between transactions of one connection")
    if engine.url.port == 6432:
        signs.append("the port is 6432, PgBouncer's default")
    channel = f"outbox_doctor_{secrets.token_hex(6)}"
    raw = engine.raw_connection()
    try:
        pg = raw.driver_connection
        assert pg is not None
        raw.rollback()
        pg.autocommit = True
        pg.execute(f'LISTEN "{channel}"')
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_notify(:channel, 'doctor')"), {"channel": channel})
            conn.commit()
        started = time.monotonic()
        heard = any(n.channel == channel for n in pg.notifies(timeout=timeout, stop_after=1))
        waited = time.monotonic() - started
    finally:
        raw.invalidate()  # never hand a LISTENing connection back to the pool
    return ListenResult(channel, heard, waited, tuple(signs))


# --- MariaDB / MySQL ------------------------------------------------------------------------------------


def _mariadb_long_transactions(conn: sa.Connection, seconds: float) -> list[Transaction]:
    rows = conn.execute(
        sa.text(
            "SELECT trx_mysql_thread_id, TIMESTAMPDIFF(MICROSECOND, trx_started, NOW(6)) / 1000000, "
            "trx_state, COALESCE(trx_query, '') FROM information_schema.innodb_trx "
            "WHERE trx_mysql_thread_id <> CONNECTION_ID() "
            "AND trx_started < NOW(6) - INTERVAL :seconds SECOND ORDER BY trx_started"
        ),
        {"seconds": seconds},
    )
    return [Transaction(int(r[0]), float(r[1]), str(r[2] or ""), str(r[3])) for r in rows]


def _mariadb_bloat(conn: sa.Connection, table: str) -> Bloat | None:
    row = conn.execute(
        sa.text(
            "SELECT data_free, data_length + index_length FROM information_schema.tables "
            "WHERE table_schema = DATABASE() AND table_name = :table"
        ),
        {"table": table},
    ).first()
    return None if row is None else Bloat(int(row[0] or 0), int(row[1] or 0), "bytes")


# --- SQLite ---------------------------------------------------------------------------------------------


def _sqlite_bloat(conn: sa.Connection, table: str) -> Bloat | None:
    # The free pages are the whole file's: SQLite keeps one free list per database, not per table.
    free = int(conn.exec_driver_sql("PRAGMA freelist_count").scalar_one())
    pages = int(conn.exec_driver_sql("PRAGMA page_count").scalar_one())
    size = int(conn.exec_driver_sql("PRAGMA page_size").scalar_one())
    return Bloat(free * size, (pages - free) * size, "bytes")


PROBES: dict[Dialect, Probes] = {
    POSTGRESQL: Probes(
        label="PostgreSQL",
        version_sql="SHOW server_version",
        server_epoch="SELECT EXTRACT(EPOCH FROM clock_timestamp())",
        bloat=_pg_bloat,
        bloat_fix=(
            "run VACUUM (VERBOSE) {table}; if it comes back, end long transactions and make autovacuum "
            "more eager on this table: ALTER TABLE {table} SET (autovacuum_vacuum_scale_factor = 0.02)"
        ),
        long_transactions=_pg_long_transactions,
        kill_hint="SELECT pg_terminate_backend(<pid>); idle_in_transaction_session_timeout ends them for you",
        listen=_pg_listen,
    ),
    MARIADB: Probes(
        label="MariaDB/MySQL",
        version_sql="SELECT VERSION()",
        server_epoch="SELECT UNIX_TIMESTAMP(NOW(6))",
        bloat=_mariadb_bloat,
        bloat_fix="run OPTIMIZE TABLE {table} at a quiet time (InnoDB rebuilds the table online)",
        long_transactions=_mariadb_long_transactions,
        kill_hint="KILL <thread id>; wait_timeout / idle_transaction_timeout end idle ones for you",
    ),
    SQLITE: Probes(
        label="SQLite",
        version_sql="SELECT sqlite_version()",
        server_epoch=None,
        bloat=_sqlite_bloat,
        bloat_fix="run VACUUM on the database file while no relay runs (or PRAGMA auto_vacuum = INCREMENTAL)",
    ),
}
