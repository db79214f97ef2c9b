"""The outbox table, its companions, and the migrations that create them.

One outbox is eight tables, all named from one configurable base name (default ``outbox``):

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

``<name>_relays``
    One row per relay process: its heartbeat (``seen_at``, written every few seconds), its last
    progress and what it has done since it started (:mod:`relay._heartbeat`); ``outbox status`` and the
    dashboard show the relays alive from it.
``<name>_stats``
    Per relay and per minute: how many messages it delivered, failed (a retry scheduled) and killed
    (dead or parked), and its delivery latencies as counts per :data:`LATENCY_BUCKETS_MS` bucket: the
    dashboard's charts and percentiles read a few hundred of these rows instead of counting messages.
``<name>_audit``
    One row per action run from the web dashboard (who, from where, what, how many messages).

The relays, stats and audit rows are kept for :data:`ACTIVITY_RETENTION_DAYS` days (the relays'
heartbeat deletes older ones).

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
SCHEMA_VERSION = 5
#: upper bounds (milliseconds) of the delivery-latency buckets counted in ``<name>_stats``; one more
#: bucket counts everything slower
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000, 300000)
#: how long the relays', stats' and audit rows are kept
ACTIVITY_RETENTION_DAYS = 8

#: the dialect names of every supported database but PostgreSQL (MariaDB answers to both of the first)
_NOT_POSTGRESQL = ("mysql", "mariadb", "sqlite")


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
#: statuses of a keyed row that no longer holds its key: on PostgreSQL, ix_<name>_key_done's
KEY_FINISHED = (Status.DELIVERED, Status.DEAD)
_KEY_FINISHED_SQL = ", ".join(f"'{s.value}'" for s in KEY_FINISHED)

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
    relays: sa.Table
    stats: sa.Table
    audit: sa.Table


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
        # The dashboard's lists of one key and of one topic (outbox.web; schema version 5). On PostgreSQL
        # ix_<name>_key holds a key's rows while they hold it; this one holds them once they are finished
        # (delivered, dead), so a row enters it once, at its last mark (an index over every keyed row
        # would take a new entry at each claim and mark too: 15 % of a keyed drain's database CPU); the
        # two answer every status of a key (Operations.list_messages). MariaDB's and SQLite's
        # ix_<name>_key holds every row already; they get (topic, seq) instead: their status index
        # cannot answer a topic alone, and InnoDB writes it once per message (its columns never change).
        sa.Index(
            f"ix_{name}_key_done",
            "msg_key",
            "seq",
            postgresql_where=sa.text(f"msg_key IS NOT NULL AND status IN ({_KEY_FINISHED_SQL})"),
            info={"dialect": "postgresql"},
        ).ddl_if(dialect="postgresql"),
        # a tuple of dialect names works (DDLIf._should_execute), though typed as one name
        sa.Index(f"ix_{name}_topic", "topic", "seq", info={"dialect": _NOT_POSTGRESQL}).ddl_if(
            dialect=_NOT_POSTGRESQL  # type: ignore[arg-type]
        ),
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
    relays = sa.Table(
        f"{name}_relays",
        md,
        sa.Column("relay_id", sa.String(64), primary_key=True, comment="host:pid:random, one per start"),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(32), nullable=False, comment="the outbox package's version"),
        sa.Column("routes", sa.String(1000), nullable=False, comment="the topics it claims, or *"),
        sa.Column("started_at", _TIME, nullable=False),
        sa.Column("seen_at", _TIME, nullable=False, comment="its last heartbeat"),
        sa.Column("progress_at", _TIME, nullable=True, comment="when it last finished a message"),
        sa.Column("stopped_at", _TIME, nullable=True, comment="set by a graceful stop"),
        sa.Column("delivered", _BIGINT, nullable=False),
        sa.Column("failed", _BIGINT, nullable=False),
        sa.Column("dead", _BIGINT, nullable=False),
        sa.Index(f"ix_{name}_relays_seen", "seen_at"),
    )
    stats = sa.Table(
        f"{name}_stats",
        md,
        sa.Column("minute", _TIME, primary_key=True, comment="the minute's start (UTC)"),
        sa.Column("relay_id", sa.String(64), primary_key=True),
        sa.Column("delivered", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("dead", sa.Integer(), nullable=False),
        sa.Column("latency", sa.String(400), nullable=False, comment="JSON counts per latency bucket"),
    )
    audit = sa.Table(
        f"{name}_audit",
        md,
        sa.Column("seq", _BIGINT, primary_key=True, autoincrement=True),
        sa.Column("at", _TIME, nullable=False),
        sa.Column("who", sa.String(255), nullable=False),
        sa.Column("client", sa.String(255), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("target", _TEXT, nullable=False, comment="the ids or the filter acted on"),
        sa.Column("count", sa.Integer(), nullable=False, comment="messages changed"),
        sa.Index(f"ix_{name}_audit_at", "at"),
    )
    return OutboxTables(
        name=name,
        metadata=md,
        messages=messages,
        locks=locks,
        meta=meta,
        inbox=inbox,
        dead_letters=dead_letters,
        relays=relays,
        stats=stats,
        audit=audit,
    )


# --- migrations -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """One step of the schema: ``apply`` runs inside a transaction on a connection.

    ``additive``: code of the previous version still runs on the schema this step leaves (it only adds
    tables, indexes, or columns with defaults that older code never has to write). See
    :func:`check_version` for what that allows.
    """

    version: int
    description: str
    apply: Callable[[sa.Connection, OutboxTables], None]
    additive: bool = False


def _v1(conn: sa.Connection, t: OutboxTables) -> None:
    t.metadata.create_all(conn, tables=[t.messages, t.locks, t.meta])


def _v2(conn: sa.Connection, t: OutboxTables) -> None:
    t.metadata.create_all(conn, tables=[t.inbox, t.dead_letters])


def _v3(conn: sa.Connection, t: OutboxTables) -> None:
    if conn.dialect.name != "postgresql":
        return  # the same indexes as before elsewhere
    # the indexes of versions 1 and 2, made partial (an explicit CreateIndex ignores ddl_if: name them)
    partial = {f"ix_{t.name}_{suffix}" for suffix in ("due", "key", "status", "done")}
    for index in t.messages.indexes:
        if index.name in partial:
            conn.execute(sa.schema.DropIndex(index, if_exists=True))
            conn.execute(sa.schema.CreateIndex(index))


def _v4(conn: sa.Connection, t: OutboxTables) -> None:
    holding = f"ix_{t.name}_holding"
    for index in t.messages.indexes:
        if index.name == holding and index_applies(index, conn.dialect.name):
            conn.execute(sa.schema.CreateIndex(index, if_not_exists=True))


def _v5(conn: sa.Connection, t: OutboxTables) -> None:
    t.metadata.create_all(conn, tables=[t.relays, t.stats, t.audit])
    for index in t.messages.indexes:
        if index.name in (f"ix_{t.name}_key_seq", f"ix_{t.name}_topic") and index_applies(
            index, conn.dialect.name
        ):
            conn.execute(sa.schema.CreateIndex(index, if_not_exists=True))


def index_applies(index: sa.Index, dialect_name: str) -> bool:
    """Whether ``index`` exists on a database of ``dialect_name`` (some are PostgreSQL's alone, one is
    everyone's but PostgreSQL's)."""
    only = index.info.get("dialect")
    return only is None or dialect_name == only or (isinstance(only, tuple) and dialect_name in only)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "create the outbox, locks and meta tables", _v1),
    Migration(2, "create the inbox and dead-letter tables of `outbox consume`", _v2, additive=True),
    Migration(
        3,
        "PostgreSQL: partial indexes, so that claims and marks write fewer index entries",
        _v3,
        additive=True,
    ),
    Migration(
        4,
        "PostgreSQL: an index of the rows holding each key, for the claim's one probe per keyed row",
        _v4,
        additive=True,
    ),
    Migration(
        5,
        "create the relays' heartbeat, per-minute stats and dashboard audit tables, and the dashboard's "
        "index by key (PostgreSQL) or by topic (MariaDB, SQLite)",
        _v5,
        additive=True,
    ),
)


def compatible_from(version: int) -> int:
    """The oldest code version that runs on schema ``version``: the last step up to it that was not
    additive (older code would misread what that step changed)."""
    return max(m.version for m in MIGRATIONS if m.version <= version and not m.additive)


def current_version(conn: sa.Connection, name: str = DEFAULT_TABLE) -> int:
    """The schema version installed for outbox ``name`` (0 when nothing is installed)."""
    return _meta_int(conn, name, "schema_version") or 0


def _meta_int(conn: sa.Connection, name: str, key: str) -> int | None:
    t = tables_for(name)
    if not sa.inspect(conn).has_table(t.meta.name):
        return None
    value = conn.execute(sa.select(t.meta.c.value).where(t.meta.c.name == key)).scalar()
    return int(value) if value is not None else None


def _newer_but_compatible(conn: sa.Connection, name: str, installed: int) -> bool:
    """Whether schema ``installed``, newer than this code's, still runs this code: every step after
    this code's version was additive (the newer code's upgrade wrote the oldest code it still runs)."""
    oldest = _meta_int(conn, name, "compatible_from")
    return oldest is not None and oldest <= SCHEMA_VERSION < installed


def _set_meta(conn: sa.Connection, t: OutboxTables, key: str, value: int) -> None:
    if conn.execute(sa.update(t.meta).where(t.meta.c.name == key).values(value=str(value))).rowcount == 0:
        conn.execute(sa.insert(t.meta).values(name=key, value=str(value)))


def upgrade(conn: sa.Connection, name: str = DEFAULT_TABLE) -> list[Migration]:
    """Apply every migration newer than the installed version; return the ones applied.

    Runs in the caller's transaction (use ``engine.begin()``), so a failed step leaves nothing half-done
    on databases with transactional DDL (PostgreSQL, SQLite). A schema newer than this code is left
    alone when this code still runs on it (see :func:`check_version`), else :class:`SchemaError`.
    """
    t = tables_for(name)
    installed = current_version(conn, name)
    if installed > SCHEMA_VERSION:
        if _newer_but_compatible(conn, name, installed):
            return []
        raise SchemaError(
            f"outbox table {name!r} is at schema version {installed}, newer than this code "
            f"({SCHEMA_VERSION}) can run on: upgrade the outbox package"
        )
    applied = []
    for migration in MIGRATIONS:
        if migration.version > installed:
            migration.apply(conn, t)
            applied.append(migration)
    if applied:
        _set_meta(conn, t, "schema_version", SCHEMA_VERSION)
        _set_meta(conn, t, "compatible_from", compatible_from(SCHEMA_VERSION))
    return applied


def check_version(conn: sa.Connection, name: str = DEFAULT_TABLE) -> None:
    """Raise :class:`SchemaError` with the fix unless this code runs on the installed schema.

    The rule of compatible upgrades: code runs on its own schema version, and on a newer one when every
    step after its version was additive (:attr:`Migration.additive`: new tables, indexes, columns it
    never has to write). So a deployment upgrades the database first (``outbox db upgrade`` with the
    new package) while relays of the previous version keep running, then rolls out the new package.
    An older schema always needs ``outbox db upgrade``: the new code uses what the upgrade adds.
    """
    installed = current_version(conn, name)
    if installed == SCHEMA_VERSION:
        return
    if installed == 0:
        raise SchemaError(f"outbox table {name!r} does not exist: run `outbox db upgrade` first")
    if installed > SCHEMA_VERSION:
        if _newer_but_compatible(conn, name, installed):
            return
        raise SchemaError(
            f"outbox table {name!r} is at schema version {installed}, newer than this code "
            f"({SCHEMA_VERSION}) can run on: upgrade the outbox package"
        )
    raise SchemaError(
        f"outbox table {name!r} is at schema version {installed}, this code needs {SCHEMA_VERSION}: "
        "run `outbox db upgrade`"
    )
