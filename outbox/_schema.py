"""The outbox table, its companions, and the migrations that create them.

One outbox is five tables, all named from one configurable base name (default ``outbox``):

``<name>``
    One row per message. Its columns are documented below; the relay's claim path relies on two of them:
    ``due_at`` is non-NULL exactly while the row waits for a relay (pending, failed with a retry
    scheduled, or in flight, where it holds the lease expiry), so one index on ``due_at`` finds claimable
    work no matter how many delivered rows are kept; ``(msg_key, status, seq)`` answers "is an earlier
    message of this key still unfinished?" with a few index probes (on PostgreSQL one:
    ``(msg_key, seq)`` over the rows holding their key, the claim's).

    Indexes. On PostgreSQL every UPDATE of a row that changes an indexed column (each claim and each
    mark does) writes a new entry into *every* index whose condition the new row version meets, so the
    indexes are partial there: ``due_at`` only for rows that wait, ``(msg_key, status, seq)`` only for
    keyed rows that hold their key, ``(status, topic)`` only for rows not delivered, ``delivered_at``
    only for delivered rows. A message then costs 12 index entries over its life instead of 18 (the
    drain's database CPU per message fell by about 30 %). Queries that use a partial index write its
    status list into the SQL (:func:`status_in`), so the planner can see that it applies. MariaDB
    (InnoDB touches only the indexes whose columns change) and SQLite keep plain indexes.
``<name>_locks``
    Named leases between relay processes (the SQLite single-relay lock, the maintenance lease).
``<name>_meta``
    The schema version, so that ``outbox db upgrade`` knows what to apply and the relay can refuse to run
    against a table it does not understand.
``<name>_inbox``
    Written by ``outbox consume`` (:mod:`consumers._kafka`): one row per (consumer group, message id)
    the group has processed. Its primary key is what makes a session handler's effect happen once:
    the row is inserted in the handler's own transaction, so a redelivered message finds it and is
    skipped.
``<name>_dead_letters``
    Written by ``outbox consume``: a Kafka record whose handler failed its last attempt, kept with
    its exact key, value and headers and the error, until ``outbox dlq replay`` sends it back.

``outbox db upgrade`` applies :data:`MIGRATIONS` in order; so does a project's own Alembic revision,
through :mod:`outbox.alembic` (``docs/alembic.md``), which keeps autogenerate away from these tables.

Times are naive UTC ``datetime`` values from the writer's or relay's clock (see ``docs/guarantees.md``
about clock skew between relays).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from outbox._errors import ConfigError, SchemaError

DEFAULT_TABLE = "outbox"
SCHEMA_VERSION = 4

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,45}$")


class Status(StrEnum):
    """Where a message is in its life. Stored as the text value in the ``status`` column."""

    PENDING = "pending"  # waiting for its first delivery (possibly delayed until due_at)
    INFLIGHT = "inflight"  # claimed by a relay under a lease; due_at is the lease expiry
    FAILED = "failed"  # the last attempt failed; the next one is scheduled at due_at
    DELIVERED = "delivered"  # handled / acknowledged by the broker
    DEAD = "dead"  # retries exhausted or permanent error; later messages of its key go on
    PARKED = "parked"  # dead on a strict-order topic: later messages of its key wait for a replay or purge


#: statuses whose row holds back every later message of the same key
KEY_HOLDING = (Status.PENDING, Status.INFLIGHT, Status.FAILED, Status.PARKED)
#: statuses an operator may send back to pending with ``outbox replay``
REPLAYABLE = (Status.FAILED, Status.DEAD, Status.PARKED)


def status_in(column: sa.ColumnElement[str], statuses: Iterable[Status]) -> sa.ColumnElement[bool]:
    """``column IN ('a', 'b')`` with the statuses written into the SQL, not bound as parameters.

    PostgreSQL can then prove that the condition implies a partial index's predicate in every plan,
    including the generic plan of a prepared statement (a bound list would hide it), and the statement
    text is the same at every execution.
    """
    return column.in_([sa.literal_column(f"'{s.value}'", sa.String) for s in statuses])


_KEY_HOLDING_SQL = ", ".join(f"'{s.value}'" for s in KEY_HOLDING)

_BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TIME = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
_BLOB = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
_TEXT = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")


def validate_table_name(name: str) -> str:
    """Return ``name`` if it is a safe SQL identifier, else raise :class:`ConfigError`."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ConfigError(
            f"invalid outbox table name {name!r}: use 1-46 letters, digits or underscores, "
            "starting with a letter or underscore"
        )
    return name


@dataclass(frozen=True)
class OutboxTables:
    """The tables of one outbox, sharing one :class:`sqlalchemy.MetaData`."""

    name: str
    metadata: sa.MetaData
    messages: sa.Table
    locks: sa.Table
    meta: sa.Table
    inbox: sa.Table
    dead_letters: sa.Table


_cache: dict[str, OutboxTables] = {}


def tables_for(name: str = DEFAULT_TABLE) -> OutboxTables:
    """Return the (cached) table definitions for the outbox named ``name``."""
    found = _cache.get(name)
    if found is None:
        found = _cache[name] = _define(validate_table_name(name))
    return found


def metadata_for(name: str = DEFAULT_TABLE) -> sa.MetaData:
    """The SQLAlchemy metadata of the outbox named ``name`` (Alembic projects: :mod:`outbox.alembic`)."""
    return tables_for(name).metadata


def _define(name: str) -> OutboxTables:
    md = sa.MetaData()
    messages = sa.Table(
        name,
        md,
        sa.Column("seq", _BIGINT, primary_key=True, autoincrement=True, comment="insertion order"),
        sa.Column("id", sa.Uuid(), nullable=False, comment="message id, given to handlers and Kafka headers"),
        sa.Column("topic", sa.String(249), nullable=False),
        sa.Column("msg_key", sa.String(255), nullable=True, comment="ordering key; NULL = unordered"),
        sa.Column("payload", _BLOB, nullable=False),
        sa.Column("content_type", sa.String(64), nullable=False),
        sa.Column("headers", _TEXT, nullable=True, comment="JSON object of string headers"),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, default=0),
        sa.Column(
            "due_at", _TIME, nullable=True, comment="next claimable time / lease expiry; NULL when done"
        ),
        sa.Column("lease_token", sa.String(32), nullable=True, comment="token of the lease holding the row"),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("last_attempt_at", _TIME, nullable=True),
        sa.Column("delivered_at", _TIME, nullable=True),
        sa.Column("last_error", _TEXT, nullable=True),
        # PostgreSQL: partial indexes (see "Indexes" above); elsewhere the same indexes over every row
        sa.Index(f"ix_{name}_due", "due_at", postgresql_where=sa.text("due_at IS NOT NULL")),
        sa.Index(
            f"ix_{name}_key",
            "msg_key",
            "status",
            "seq",
            postgresql_where=sa.text(f"msg_key IS NOT NULL AND status IN ({_KEY_HOLDING_SQL})"),
        ),
        # PostgreSQL only: the claim's one probe for "the nearest earlier row holding this key" (relay._claim,
        # invariant 8). Elsewhere the claim probes ix_<name>_key once per holding status.
        sa.Index(
            f"ix_{name}_holding",
            "msg_key",
            "seq",
            postgresql_where=sa.text(f"msg_key IS NOT NULL AND status IN ({_KEY_HOLDING_SQL})"),
            info={"dialect": "postgresql"},
        ).ddl_if(dialect="postgresql"),
        sa.Index(
            f"ix_{name}_status",
            "status",
            "topic",
            postgresql_where=sa.text(f"status <> '{Status.DELIVERED.value}'"),
        ),
        sa.Index(f"ix_{name}_done", "delivered_at", postgresql_where=sa.text("delivered_at IS NOT NULL")),
        sa.UniqueConstraint("id", name=f"uq_{name}_id"),
    )
    locks = sa.Table(
        f"{name}_locks",
        md,
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("holder", sa.String(100), nullable=False),
        sa.Column("expires_at", _TIME, nullable=False),
    )
    meta = sa.Table(
        f"{name}_meta",
        md,
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("value", sa.String(255), nullable=False),
    )
    inbox = sa.Table(
        f"{name}_inbox",
        md,
        sa.Column("consumer_group", sa.String(255), primary_key=True),
        sa.Column("message_id", sa.Uuid(), primary_key=True),
        sa.Column("topic", sa.String(249), nullable=False, comment="the message's (outbox) topic"),
        sa.Column("processed_at", _TIME, nullable=False),
        sa.Index(f"ix_{name}_inbox_at", "processed_at"),
    )
    dead_letters = sa.Table(
        f"{name}_dead_letters",
        md,
        sa.Column("seq", _BIGINT, primary_key=True, autoincrement=True),
        sa.Column("consumer_group", sa.String(255), nullable=False),
        sa.Column("kafka_topic", sa.String(249), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("message_id", sa.Uuid(), nullable=True, comment="NULL when the record could not be read"),
        sa.Column("msg_key", sa.String(255), nullable=True, comment="the record key as text, for display"),
        sa.Column("raw_key", _BLOB, nullable=True, comment="the record key's exact bytes, for replay"),
        sa.Column("value", _BLOB, nullable=True, comment="the record value's exact bytes (NULL: tombstone)"),
        sa.Column("headers", _TEXT, nullable=True, comment="JSON array of [name, value] pairs"),
        sa.Column("error", _TEXT, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False, comment="when it was dead-lettered"),
        sa.Column("replayed_at", _TIME, nullable=True, comment="last `outbox dlq replay`"),
        sa.Index(f"ix_{name}_dlq_group", "consumer_group", "seq"),
        # one dead letter per record and group, even if a crash makes the consumer fail it twice
        sa.UniqueConstraint(
            "consumer_group", "kafka_topic", "partition", "offset", name=f"uq_{name}_dlq_rec"
        ),
    )
    return OutboxTables(
        name=name,
        metadata=md,
        messages=messages,
        locks=locks,
        meta=meta,
        inbox=inbox,
        dead_letters=dead_letters,
    )


# --- migrations -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """One step of the schema: ``apply`` runs inside a transaction on a connection."""

    version: int
    description: str
    apply: Callable[[sa.Connection, OutboxTables], None]


def _v1(conn: sa.Connection, t: OutboxTables) -> None:
    t.metadata.create_all(conn, tables=[t.messages, t.locks, t.meta])


def _v2(conn: sa.Connection, t: OutboxTables) -> None:
    t.metadata.create_all(conn, tables=[t.inbox, t.dead_letters])


def _v3(conn: sa.Connection, t: OutboxTables) -> None:
    if conn.dialect.name != "postgresql":
        return  # the same indexes as before elsewhere
    for index in t.messages.indexes:
        conn.execute(sa.schema.DropIndex(index, if_exists=True))
        conn.execute(sa.schema.CreateIndex(index))


def _v4(conn: sa.Connection, t: OutboxTables) -> None:
    for index in t.messages.indexes:
        if index.info.get("dialect") == conn.dialect.name:
            conn.execute(sa.schema.CreateIndex(index, if_not_exists=True))


def index_applies(index: sa.Index, dialect_name: str) -> bool:
    """Whether ``index`` exists on a database of ``dialect_name`` (some are PostgreSQL's alone)."""
    only = index.info.get("dialect")
    return only is None or only == dialect_name


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "create the outbox, locks and meta tables", _v1),
    Migration(2, "create the inbox and dead-letter tables of `outbox consume`", _v2),
    Migration(3, "PostgreSQL: partial indexes, so that claims and marks write fewer index entries", _v3),
    Migration(
        4, "PostgreSQL: an index of the rows holding each key, for the claim's one probe per keyed row", _v4
    ),
)


def current_version(conn: sa.Connection, name: str = DEFAULT_TABLE) -> int:
    """The schema version installed for outbox ``name`` (0 when nothing is installed)."""
    t = tables_for(name)
    if not sa.inspect(conn).has_table(t.meta.name):
        return 0
    value = conn.execute(sa.select(t.meta.c.value).where(t.meta.c.name == "schema_version")).scalar()
    return int(value) if value is not None else 0


def upgrade(conn: sa.Connection, name: str = DEFAULT_TABLE) -> list[Migration]:
    """Apply every migration newer than the installed version; return the ones applied.

    Runs in the caller's transaction (use ``engine.begin()``), so a failed step leaves nothing half-done
    on databases with transactional DDL (PostgreSQL, SQLite).
    """
    t = tables_for(name)
    installed = current_version(conn, name)
    if installed > SCHEMA_VERSION:
        raise SchemaError(
            f"outbox table {name!r} is at schema version {installed}, newer than this code "
            f"({SCHEMA_VERSION}): upgrade the outbox package"
        )
    applied = []
    for migration in MIGRATIONS:
        if migration.version > installed:
            migration.apply(conn, t)
            applied.append(migration)
    if applied:
        if installed == 0:
            conn.execute(sa.insert(t.meta).values(name="schema_version", value=str(SCHEMA_VERSION)))
        else:
            conn.execute(
                sa.update(t.meta).where(t.meta.c.name == "schema_version").values(value=str(SCHEMA_VERSION))
            )
    return applied


def check_version(conn: sa.Connection, name: str = DEFAULT_TABLE) -> None:
    """Raise :class:`SchemaError` with the fix unless the installed schema is the current one."""
    installed = current_version(conn, name)
    if installed == SCHEMA_VERSION:
        return
    if installed == 0:
        raise SchemaError(f"outbox table {name!r} does not exist: run `outbox db upgrade` first")
    raise SchemaError(
        f"outbox table {name!r} is at schema version {installed}, this code needs {SCHEMA_VERSION}: "
        "run `outbox db upgrade`"
    )
