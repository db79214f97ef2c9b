"""The write side: ``add()`` puts a message into the caller's own transaction.

Promises:

- **Atomic with the business change.** The row is written through the caller's ``Session``,
  ``AsyncSession`` or ``Connection`` and so commits or rolls back with it (savepoints included).
- **Validated before anything is written.** Topic, key, headers, delay and payload are checked first,
  sizes included (``max_payload_bytes``, ``MAX_HEADERS_BYTES``), and so is text no database can store (a
  NUL in a key, a lone surrogate); a bad value raises a :class:`outbox.MessageError` subclass naming it,
  and the transaction is untouched: no database gets a row it would refuse.
- **Wakes relays on commit.** Relays in the same process wake right after the commit; on PostgreSQL a
  ``pg_notify`` sent after the commit (from a connection of its own, never for a rollback) wakes listening
  relays elsewhere: at once after a quiet moment, and at most one per ``NOTIFY_GAP`` (20 ms) while
  commits keep coming, since relays woken by the first keep looking every few milliseconds (see
  :mod:`outbox._wakeup`). An ``AsyncSession`` on an async driver other than psycopg notifies inside
  the transaction instead.

How each session type writes:

- ``Session`` and ``Connection``: an ``INSERT`` runs at once in the current transaction (autobegun if none).
- ``AsyncSession``: ``add()`` is a plain (non-async) call, no ``await``, so nothing can run yet: the row
  waits in the session and its ``INSERT`` runs before the session's next flush of your ORM changes, its
  next query (``await session.execute(...)``) or its commit, whichever comes first; a savepoint rolled
  back before then drops it.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, orm

from outbox._clock import utcnow
from outbox._errors import ConfigError, DelayError, HeaderError, MessageKeyError, PayloadError, TopicError
from outbox._schema import DEFAULT_TABLE, OutboxTables, Status, tables_for
from outbox._serialization import encode_headers, encode_payload
from outbox._tracing import inject_current
from outbox._wakeup import (
    notify_after_commit,
    notify_channel,
    remember_conninfo,
    wake_local,
)

#: Kafka's rule; used with fullmatch (a "$" also matches before a final newline: "abc\n" passed)
TOPIC_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,249}")
MAX_KEY_LENGTH = 255
#: the longest ``delay``: 100 years. Its due time must fit a Python ``datetime`` (year 9999) and a MariaDB
#: DATETIME; longer, ``now + delay`` raised OverflowError instead of a DelayError.
MAX_DELAY = dt.timedelta(days=36_525)
#: ``outbox.add``'s and the relay's default largest payload (encoded), 4 MiB. A row the database refuses
#: fails in the caller's transaction and poisons it: MariaDB's default ``max_allowed_packet`` is 16 MiB
#: for the whole INSERT, and PyMySQL sends bytes as hex, twice their size (measured here: a 7 MiB payload
#: is written, an 8 MiB one gets "server has gone away" and the transaction is lost). 4 MiB leaves half
#: of the packet for the headers and the rest. Kafka's brokers take 1 MB records by default: lower it for
#: topics published to Kafka. PostgreSQL and SQLite take much more (raise it with ``max_payload_bytes``).
DEFAULT_MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
#: the largest headers, as stored (compact JSON): 64 KiB, so that headers too never make the row too big
#: for MariaDB's packet (above); a Kafka record's headers are small.
MAX_HEADERS_BYTES = 64 * 1024

try:  # SQLAlchemy's asyncio extension needs greenlet; without it, AsyncSession is simply not supported.
    from sqlalchemy.ext.asyncio import AsyncSession
except ImportError:  # pragma: no cover
    AsyncSession = None  # type: ignore[assignment,misc]


_uuid_lock = threading.Lock()
_last_ms = 0
_counter = 0


def new_message_id() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): time-ordered, so ids of one writer sort by creation and index well."""
    global _last_ms, _counter
    with _uuid_lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            ms = _last_ms
            _counter += 1
        else:
            _counter = int.from_bytes(os.urandom(2), "big") & 0x3FF
        _last_ms = ms
        rand_a = _counter & 0xFFF
    rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    return uuid.UUID(int=value)


# --- validation -------------------------------------------------------------------------------------------


def validate_topic(topic: object) -> str:
    if not isinstance(topic, str) or not TOPIC_PATTERN.fullmatch(topic):
        raise TopicError(
            f"invalid topic {topic!r}: use 1-249 characters from letters, digits, '.', '_' and '-'"
        )
    return topic


def _lone_surrogate(text: str) -> str | None:
    """The first lone surrogate in ``text`` (``"\\ud800"``, left by a bad decode), or ``None``.

    It has no UTF-8 form, so every driver failed to send it, with a ``UnicodeEncodeError``.
    """
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return text[exc.start]
    return None


def _validate_key(key: object) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str):
        raise MessageKeyError(f"invalid key {key!r}: a key must be a str (or None), not {type(key).__name__}")
    if len(key) > MAX_KEY_LENGTH or not key:
        raise MessageKeyError(f"invalid key {key[:40]!r}: use 1-{MAX_KEY_LENGTH} characters")
    # A NUL is refused by PostgreSQL (a DataError that also aborts the caller's transaction) and kept by
    # MariaDB and SQLite: refused here, the same key means the same thing on every database.
    if "\x00" in key:
        raise MessageKeyError(f"invalid key {key[:40]!r}: it contains a NUL character (\\x00); remove it")
    if (surrogate := _lone_surrogate(key)) is not None:
        raise MessageKeyError(
            f"invalid key {key[:40]!r}: it contains {surrogate!r}, a lone surrogate with no UTF-8 form; "
            "use valid Unicode text"
        )
    return key


def _validate_headers(headers: object) -> dict[str, str] | None:
    if headers is None:
        return None
    if not isinstance(headers, Mapping):
        raise HeaderError(f"headers must be a mapping of str to str, not {type(headers).__name__}")
    for name, value in headers.items():
        if not isinstance(name, str) or not name:
            raise HeaderError(f"header name {name!r} must be a non-empty str")
        if not isinstance(value, str):
            raise HeaderError(f"header {name!r} has a {type(value).__name__} value {value!r:.60}; use a str")
        # Stored as JSON, which escapes a NUL (kept on every database), but a lone surrogate cannot be sent.
        for part, text in (("name", name), ("value", value)):
            if (surrogate := _lone_surrogate(text)) is not None:
                raise HeaderError(
                    f"header {name[:40]!r}: its {part} contains {surrogate!r}, a lone surrogate with no "
                    "UTF-8 form; use valid Unicode text"
                )
    return dict(headers)


def _validate_delay(delay: object) -> dt.timedelta:
    if delay is None:
        return dt.timedelta(0)
    if isinstance(delay, dt.timedelta):
        seconds = delay.total_seconds()
    elif isinstance(delay, int | float) and not isinstance(delay, bool):
        seconds = float(delay)
    else:
        raise DelayError(f"delay must be seconds (int/float) or a timedelta, not {type(delay).__name__}")
    if not seconds >= 0:  # also rejects NaN
        raise DelayError(f"delay must be zero or more seconds, got {delay!r}")
    if seconds > MAX_DELAY.total_seconds():  # also rejects infinity
        raise DelayError(f"delay {delay!r} is too long: use at most {MAX_DELAY.days} days (100 years)")
    return dt.timedelta(seconds=seconds)


# --- wake-ups -------------------------------------------------------------------------------------------

_INFO_KEY = "outbox.tables"  # set of outbox tables written in the current transaction
_QUEUED_KEY = "outbox.queued"  # AsyncSession: [(outbox, row, owning transaction)] not yet written
_NOTIFIED_KEY = "outbox.notified"  # set of tables whose pg_notify was already sent in this transaction
_AFTER_COMMIT_KEY = "outbox.notify_after_commit"  # set of (engine, table) to wake once committed


def _wake_after_commit(tables: set[str] | None, pairs: set[tuple[sa.Engine, str]] | None) -> None:
    """Wake this process's relays of ``tables``, and ask for the NOTIFYs of ``pairs``."""
    if tables:
        wake_local(tables)
    if pairs:
        notify_after_commit(pairs)


@event.listens_for(orm.Session, "after_commit")
def _session_committed(session: orm.Session) -> None:
    tables = session.info.pop(_INFO_KEY, None)
    session.info.pop(_NOTIFIED_KEY, None)
    pairs = session.info.pop(_AFTER_COMMIT_KEY, None)
    _wake_after_commit(tables, pairs)


@event.listens_for(orm.Session, "after_rollback")
def _session_rolled_back(session: orm.Session) -> None:
    session.info.pop(_INFO_KEY, None)
    session.info.pop(_NOTIFIED_KEY, None)
    session.info.pop(_AFTER_COMMIT_KEY, None)


def _pop_connection_flags(conn: sa.Connection) -> tuple[set[str] | None, set[tuple[sa.Engine, str]] | None]:
    # These listeners run for every transaction of every engine in the process. On a connection the
    # server just dropped, touching ``conn.info`` raises; it must never replace the driver's error
    # that the caller is about to see (and its info is discarded with the connection anyway).
    if conn.invalidated:
        return None, None
    try:
        info = conn.info
    except sa.exc.SQLAlchemyError:
        return None, None
    info.pop(_NOTIFIED_KEY, None)
    tables: set[str] | None = info.pop(_INFO_KEY, None)
    pairs: set[tuple[sa.Engine, str]] | None = info.pop(_AFTER_COMMIT_KEY, None)
    return tables, pairs


@event.listens_for(sa.Engine, "commit")
def _connection_committed(conn: sa.Connection) -> None:
    # SQLAlchemy fires this just before the COMMIT reaches the server; a relay woken a moment too early
    # looks again shortly (see relay._runner), and the notifier's own round trip comes after the commit's.
    _wake_after_commit(*_pop_connection_flags(conn))


@event.listens_for(sa.Engine, "rollback")
def _connection_rolled_back(conn: sa.Connection) -> None:
    _pop_connection_flags(conn)


def _write_queued(session: orm.Session) -> None:
    """AsyncSession path: INSERT the rows ``add`` queued in ``session``, on its connection.

    Runs inside the session's flush or commit, which an AsyncSession drives from its greenlet, so
    the statements can run here although ``add`` could not run them. One INSERT per row on the
    sync-``Session`` path's statement: an ORM object per row, flushed by the unit of work, cost the
    writer twice as much. Then the PostgreSQL wake-up: on psycopg, by the notifier after the commit,
    as for a sync ``Session``; another async driver (asyncpg, say) cannot lend the notifier its
    connection parameters, so ``pg_notify`` goes in the transaction itself (which serialises the
    commits of notifying transactions: see :class:`outbox._wakeup.Notifier`).
    """
    queued = session.info.get(_QUEUED_KEY)
    if not queued:
        return
    session.info[_QUEUED_KEY] = []
    conn = session.connection()
    after_commit = conn.dialect.driver == "psycopg" and remember_conninfo(conn)
    for writer, row, _owner in queued:
        writer._write(conn, row)
        writer._mark_written(conn, session.info, notify_after_commit=after_commit)


def _notify(conn: sa.Connection, table: str, info: dict[Any, Any]) -> None:
    done: set[str] = info.setdefault(_NOTIFIED_KEY, set())
    if table not in done:
        conn.execute(sa.text("SELECT pg_notify(:channel, '')"), {"channel": notify_channel(table)})
        done.add(table)


@event.listens_for(orm.Session, "before_flush")
def _session_flushing(session: orm.Session, flush_context: Any, instances: Any) -> None:
    _write_queued(session)  # before a query's autoflush too: the transaction's reads see the rows


@event.listens_for(orm.Session, "do_orm_execute")
def _session_executing(state: orm.ORMExecuteState) -> None:
    _write_queued(state.session)  # a query through a session with nothing else to flush, too


@event.listens_for(orm.Session, "before_commit")
def _session_committing(session: orm.Session) -> None:
    _write_queued(session)  # a session with nothing else to flush commits without flushing


@event.listens_for(orm.Session, "after_soft_rollback")
def _drop_queued(session: orm.Session, previous_transaction: orm.SessionTransaction) -> None:
    """Rows queued inside a transaction or savepoint that rolled back are never written."""
    queued = session.info.get(_QUEUED_KEY)
    if not queued:
        return

    def inside(owner: orm.SessionTransaction | None) -> bool:
        while owner is not None:
            if owner is previous_transaction:
                return True
            owner = owner.parent
        return False

    session.info[_QUEUED_KEY] = [entry for entry in queued if not inside(entry[2])]


# --- the outbox -------------------------------------------------------------------------------------------


class Outbox:
    """An outbox table and how messages are written to it.

    ``outbox.add`` is :meth:`add` of a default ``Outbox()`` (table ``outbox``); create your own with
    ``Outbox(table="orders_outbox")`` for another table, ``notify=False`` to skip PostgreSQL's
    ``pg_notify`` on commit (relays then find new messages by polling), or ``max_payload_bytes`` for
    another largest payload than ``DEFAULT_MAX_PAYLOAD_BYTES`` (4 MiB; the relays reading the table need
    the same ``--max-payload-bytes``, and on MariaDB a ``max_allowed_packet`` above twice it).
    """

    def __init__(
        self,
        *,
        table: str = DEFAULT_TABLE,
        notify: bool = True,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        if not isinstance(max_payload_bytes, int) or max_payload_bytes < 1:
            raise ConfigError(
                f"max_payload_bytes must be a whole number of bytes, at least 1, got {max_payload_bytes!r}"
            )
        self.tables: OutboxTables = tables_for(table)
        self.notify = notify
        self.max_payload_bytes = max_payload_bytes
        # inline(): no RETURNING of the new seq, which nothing reads
        self._insert = sa.insert(self.tables.messages).inline()
        self._driver_sql: dict[type, str] = {}

    @property
    def table_name(self) -> str:
        return self.tables.name

    def add(
        self,
        session: Any,
        topic: str,
        payload: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        delay: float | dt.timedelta | None = None,
    ) -> uuid.UUID:
        """Write a message in ``session``'s current transaction and return its id.

        ``session`` is a SQLAlchemy ``Session``, ``AsyncSession`` or ``Connection``. ``payload`` is
        JSON-serialisable (see ``outbox._serialization``) or ``bytes``. Messages with the same ``key`` are
        delivered one at a time in the order they were added; ``delay`` (seconds or ``timedelta``)
        holds the message back. Raises a :class:`outbox.MessageError` subclass on invalid input,
        before anything is written. With OpenTelemetry installed and a span active, its W3C
        ``traceparent`` is added to the headers unless they have one (:mod:`outbox._tracing`).
        """
        row = self.build_row(topic, payload, key=key, headers=headers, delay=delay)
        if isinstance(session, orm.Session):
            conn = session.connection()
            self._write(conn, row)
            self._mark_written(conn, session.info)  # woken by the session's after_commit
        elif isinstance(session, sa.Connection):
            self._write(session, row)
            self._mark_written(session, session.info)
        elif AsyncSession is not None and isinstance(session, AsyncSession):
            # No statement can run here (add is not awaited): the row waits in the session for its next
            # flush or its commit, whichever comes first (_write_queued), tagged with the transaction
            # it belongs to, so that a savepoint rolled back first drops it (_drop_queued).
            sync = session.sync_session
            # begun if none is, as a Session's add begins one (no statement runs: it starts lazily)
            owner = sync.get_nested_transaction() or sync.get_transaction() or sync.begin()
            sync.info.setdefault(_QUEUED_KEY, []).append((self, row, owner))
        else:
            raise TypeError(
                "outbox.add() needs a SQLAlchemy Session, AsyncSession or Connection, "
                f"not {type(session).__name__}"
            )
        return row["id"]  # type: ignore[no-any-return]

    def build_row(
        self,
        topic: str,
        payload: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        delay: float | dt.timedelta | None = None,
    ) -> dict[str, Any]:
        """Validate and encode one message into the column values of its row (nothing is written)."""
        validate_topic(topic)
        key = _validate_key(key)
        valid_headers = inject_current(_validate_headers(headers))  # the writer's trace, if any
        wait = _validate_delay(delay)
        stored_headers = encode_headers(valid_headers)
        # Sizes are checked before the database can refuse the row inside the caller's transaction (the
        # headers encoded only when they might be too large: a character is at most 4 bytes in UTF-8).
        if (
            stored_headers is not None
            and len(stored_headers) > MAX_HEADERS_BYTES // 4
            and (size := len(stored_headers.encode())) > MAX_HEADERS_BYTES
        ):
            raise HeaderError(
                f"headers of {size} bytes (as JSON) exceed {MAX_HEADERS_BYTES}: put large values in the "
                "payload"
            )
        body, content_type = encode_payload(payload)
        if len(body) > self.max_payload_bytes:
            raise PayloadError(
                f"payload of {len(body)} bytes exceeds max_payload_bytes {self.max_payload_bytes}: send a "
                "reference to the data instead, or raise Outbox(max_payload_bytes=...) and the relay's too"
            )
        now = utcnow()
        return {
            "id": new_message_id(),
            "topic": topic,
            "msg_key": key,
            "payload": body,
            "content_type": content_type,
            "headers": stored_headers,
            "status": Status.PENDING.value,
            "attempts": 0,
            "due_at": now + wait,
            "created_at": now,
        }

    def _write(self, conn: sa.Connection, row: dict[str, Any]) -> None:
        """INSERT ``row`` on ``conn``.

        On psycopg the statement is compiled once and sent with ``exec_driver_sql`` (SQLAlchemy's events
        and logging still see it): every value is one psycopg takes as it is, and skipping the Core
        statement's per-execution work halves the INSERT's cost on the writer's side (BENCHMARKS.md,
        "Figures behind the code"), which is most of what ``outbox.add`` adds to a business
        transaction. Other drivers need SQLAlchemy's value conversions (UUIDs and times stored as
        text), so they keep the Core statement.
        """
        dialect = conn.dialect
        if dialect.driver != "psycopg":
            conn.execute(self._insert, row)
            return
        sql = self._driver_sql.get(type(dialect))
        if sql is None:
            columns = self.tables.messages.c
            values = {name: sa.bindparam(name, type_=columns[name].type) for name in row}
            statement = sa.insert(self.tables.messages).values(values).inline()
            sql = self._driver_sql[type(dialect)] = str(statement.compile(dialect=dialect))
        conn.exec_driver_sql(sql, row)

    def _mark_written(
        self, conn: sa.Connection, info: dict[Any, Any], *, notify_after_commit: bool = True
    ) -> None:
        """Remember, in the session's or connection's info, whom to wake when this transaction commits.

        On PostgreSQL the NOTIFY goes after the commit, from the engine's notifier; with
        ``notify_after_commit=False`` (an AsyncSession whose driver cannot lend the notifier its
        connection parameters) it goes in the transaction itself, once per table.
        """
        info.setdefault(_INFO_KEY, set()).add(self.table_name)
        if self.notify and conn.dialect.name == "postgresql":
            if notify_after_commit:
                info.setdefault(_AFTER_COMMIT_KEY, set()).add((conn.engine, self.table_name))
            else:
                _notify(conn, self.table_name, info)


default_outbox = Outbox()


def add(
    session: Any,
    topic: str,
    payload: Any,
    *,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    delay: float | dt.timedelta | None = None,
) -> uuid.UUID:
    """Write a message in ``session``'s transaction with the default outbox. See :meth:`Outbox.add`."""
    return default_outbox.add(session, topic, payload, key=key, headers=headers, delay=delay)


def configure(
    *, table: str = DEFAULT_TABLE, notify: bool = True, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> Outbox:
    """Replace the default outbox used by :func:`add` (table name, PostgreSQL notify on commit, largest
    payload)."""
    global default_outbox
    default_outbox = Outbox(table=table, notify=notify, max_payload_bytes=max_payload_bytes)
    return default_outbox
