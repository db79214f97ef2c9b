"""What differs between PostgreSQL, MariaDB/MySQL and SQLite, in one place.

Everything else asks :func:`dialect_for` for a :class:`Dialect` and reads its fields; no other module
tests the database name. The differences:

============================  ==================  =====================  ==================
                              PostgreSQL          MariaDB / MySQL        SQLite
============================  ==================  =====================  ==================
driver added to a bare URL    psycopg 3           PyMySQL                sqlite3
claim: scan, then take      SELECT ... FOR      SELECT ... FOR UPDATE  SELECT, then
                              UPDATE SKIP LOCKED, SKIP LOCKED, UPDATE,   UPDATE ...
                              UPDATE ... RETURNING then SELECT          RETURNING
relays side by side           any number          any number             one (lock row)
cross-process wake-up         LISTEN/NOTIFY       polling                polling
relay isolation level         READ COMMITTED      READ COMMITTED         (serialised)
consumer partition workers    several             several                one (one writer)
============================  ==================  =====================  ==================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from outbox._errors import ConfigError
from outbox.redaction import mask_url


@dataclass(frozen=True)
class Dialect:
    """The capabilities of one database family, as the relay and the CLI need them."""

    name: str
    #: the claim is one ``UPDATE ... RETURNING`` statement (else: locking SELECT, then UPDATE)
    claim_returning: bool
    #: ``FOR UPDATE SKIP LOCKED`` is available, so relays can claim side by side
    skip_locked: bool
    #: only one relay may run at a time (enforced with a lock row)
    single_relay: bool
    #: LISTEN/NOTIFY wakes relays in other processes
    listen_notify: bool
    #: one writing transaction at a time (``outbox consume`` then finishes one partition at a time)
    single_writer: bool = False
    #: lists bind as one array parameter (``= ANY(:ids)``): one statement text, prepared once
    array_params: bool = False
    #: the SQL function that returns the greatest of its arguments (SQLite's multi-argument ``max``)
    greatest_function: str = "greatest"
    #: a transaction reads without taking the write lock (pysqlite begins only before a write), so a
    #: claim that must see the rows it reads stay as they are takes the database's write lock first
    write_lock_first: bool = False
    #: the table has ``ix_<name>_holding`` (a partial index of the rows holding each key), so the claim
    #: finds a keyed row's nearest earlier holding row with one probe (else: one per holding status)
    holding_index: bool = False
    #: a correlated range probe (``max(seq) ... WHERE msg_key = c.msg_key AND seq < c.seq``) is run as a
    #: range of the key's index; MariaDB runs it as a ``ref`` on ``(msg_key, status)`` that reads every
    #: row of the key, so there the claim probes with constants, per key, after the scan
    correlated_range: bool = True
    #: how the claim compares topics with a relay's topic patterns, case-sensitively: ``like``
    #: (PostgreSQL), ``binary`` (MariaDB: ``LIKE`` and ``IN`` on the bytes, not under the column's
    #: case-insensitive collation), ``glob`` (SQLite: ``GLOB`` has the shell's syntax)
    topic_match: str = "like"

    def engine_options(self) -> dict[str, Any]:
        """Extra ``create_engine`` keyword arguments for this database."""
        if self.name == "sqlite":
            return {"connect_args": {"timeout": 30.0}}
        # A connect timeout, so that an unroutable host fails in seconds rather than minutes.
        if self.name == "mysql":
            return {
                "isolation_level": "READ COMMITTED",
                "pool_pre_ping": True,
                "pool_recycle": 3600,
                "connect_args": {"connect_timeout": 10},
            }
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}


POSTGRESQL = Dialect(
    "postgresql",
    claim_returning=True,
    skip_locked=True,
    single_relay=False,
    listen_notify=True,
    array_params=True,
    holding_index=True,
)
MARIADB = Dialect(
    "mysql",
    claim_returning=False,
    skip_locked=True,
    single_relay=False,
    listen_notify=False,
    correlated_range=False,
    topic_match="binary",
)
SQLITE = Dialect(
    "sqlite",
    claim_returning=True,
    skip_locked=False,
    single_relay=True,
    listen_notify=False,
    single_writer=True,
    greatest_function="max",
    write_lock_first=True,
    topic_match="glob",
)


def dialect_for(engine_or_conn: sa.Engine | sa.Connection) -> Dialect:
    """The :class:`Dialect` of an engine or connection; :class:`ConfigError` for unsupported databases."""
    name = engine_or_conn.dialect.name
    if name == "postgresql":
        return POSTGRESQL
    if name in ("mysql", "mariadb"):
        return MARIADB
    if name == "sqlite":
        return SQLITE
    raise ConfigError(f"database {name!r} is not supported: use PostgreSQL, MariaDB/MySQL or SQLite")


_DEFAULT_DRIVERS = {
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
}


def normalise_url(url: str) -> sa.URL:
    """Parse a database URL, adding our default driver when none is named (``postgresql://`` -> psycopg 3).

    Raises :class:`ConfigError` with the expected form when the URL cannot be parsed.
    """
    if not url or not isinstance(url, str):
        raise ConfigError("no database URL: pass --database-url or set OUTBOX_DATABASE_URL")
    try:
        parsed = make_url(url)
    except Exception:
        raise ConfigError(
            "invalid database URL (it cannot be parsed): expected e.g. postgresql://user@host/db, "
            "mysql://root@127.0.0.1/db or sqlite:///path/to/file.db"
        ) from None
    driver = _DEFAULT_DRIVERS.get(parsed.drivername)
    if driver:
        parsed = parsed.set(drivername=driver)
    backend = parsed.get_backend_name()
    if backend not in ("postgresql", "mysql", "mariadb", "sqlite"):
        raise ConfigError(f"database {backend!r} is not supported: use PostgreSQL, MariaDB/MySQL or SQLite")
    return parsed


def create_engine(url: str, *, must_exist: bool = False, **overrides: Any) -> sa.Engine:
    """An engine for ``url`` with the options this project relies on (see :meth:`Dialect.engine_options`).

    ``must_exist``: refuse a SQLite file that does not exist yet (instead of creating an empty one), for
    commands that only read or operate on an existing outbox.
    """
    parsed = normalise_url(url)
    backend = parsed.get_backend_name()
    family = {"postgresql": POSTGRESQL, "sqlite": SQLITE}.get(backend, MARIADB)
    if must_exist and family is SQLITE:
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            from pathlib import Path

            if not Path(database).exists():
                raise ConfigError(
                    f"SQLite database {database!r} does not exist: check the path, or create it with "
                    "`outbox db upgrade`"
                )
    options = family.engine_options()
    connect_args = {**options.get("connect_args", {}), **overrides.pop("connect_args", {})}
    options.update(overrides)
    if connect_args:
        options["connect_args"] = connect_args
    try:
        engine = sa.create_engine(parsed, **options)
    except Exception as exc:  # bad driver name, bad query-string option
        raise ConfigError(f"cannot use database URL {mask_url(url)!r}: {exc}") from None
    if family is SQLITE:
        sa.event.listen(engine, "connect", _sqlite_on_connect)
    return engine


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets writers and the relay work side by side; NORMAL sync is durable at commit in WAL mode
    # except on power loss, the usual trade-off for a development database.
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


# PostgreSQL SQLSTATE classes/codes that mean "the server is away", not "your statement is wrong".
# Deadlock and serialization failure too: the database rolled the statement back and the same work,
# run again, goes through; like an outage, it is no fault of a message.
_PG_OUTAGE_STATES = ("08", "57P01", "57P02", "57P03", "53300", "40P01", "40001")
# MySQL/MariaDB client errors: can't connect, server gone away, lost connection, shutdown in progress.
# ... and deadlock (1213) or lock wait timeout (1205): rolled back, to be run again.
_MYSQL_OUTAGE_CODES = {1053, 1077, 1152, 1205, 1213, 2002, 2003, 2005, 2006, 2013, 2055}


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` means the database is unreachable (restart, network) or rolled the work back
    on a conflict (deadlock), so the work should be retried later without counting against a message's
    attempts."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sa.exc.DBAPIError) and current.connection_invalidated:
            return True
        orig = getattr(current, "orig", None)
        if orig is not None and orig is not current and _is_driver_outage(orig):
            return True
        if _is_driver_outage(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _is_driver_outage(err: BaseException) -> bool:
    sqlstate = getattr(err, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate.startswith(_PG_OUTAGE_STATES):
        return True
    module = type(err).__module__
    if module.startswith("psycopg") and type(err).__name__ == "OperationalError" and sqlstate is None:
        return True  # psycopg raises a bare OperationalError when it cannot connect at all
    if module.startswith("pymysql"):
        args: tuple[object, ...] = getattr(err, "args", ())
        return bool(args) and args[0] in _MYSQL_OUTAGE_CODES
    return False
