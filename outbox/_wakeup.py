"""Waking relays when messages commit: in this process at once, elsewhere by PostgreSQL NOTIFY.

Relays in the writer's process register a wake-up event (:func:`register_waiter`) and are woken right
after a commit that added to their table (:func:`wake_local`). Relays elsewhere LISTEN on
:func:`notify_channel`; on PostgreSQL a :class:`Notifier` per engine sends the NOTIFY after the commit,
from a connection and a thread of its own (never for a rollback): at once after a quiet moment, and at
most one per ``NOTIFY_GAP`` (20 ms) while commits keep coming, since relays woken by the first keep
looking every few milliseconds (``RELAY_AWAKE_SECONDS``). If the process dies between the commit and the
NOTIFY, relays find the message at their next poll. :mod:`outbox.writer` decides when to call these.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
import weakref
from typing import Any

import sqlalchemy as sa

_local_waiters: dict[str, set[threading.Event]] = {}
_waiters_lock = threading.Lock()


def register_waiter(table: str, waiter: threading.Event) -> None:
    """A relay in this process asks to be woken when a transaction that added to ``table`` commits."""
    with _waiters_lock:
        _local_waiters.setdefault(table, set()).add(waiter)


def unregister_waiter(table: str, waiter: threading.Event) -> None:
    with _waiters_lock:
        _local_waiters.get(table, set()).discard(waiter)


def wake_local(tables: set[str]) -> None:
    """Wake the relays of this process that wait on any of ``tables``."""
    for table in tables:
        for waiter in list(_local_waiters.get(table, ())):
            waiter.set()


# At most one NOTIFY per table every NOTIFY_GAP seconds from a process: the first at once, the others of a
# gap merged into one at its end. Relays keep looking every few milliseconds for RELAY_AWAKE_SECONDS after
# any wake-up, so a message whose NOTIFY was merged away is found by that looking, and the merged NOTIFY
# at the gap's end wakes (and keeps awake) relays for the messages committed during it.
NOTIFY_GAP = 0.02
RELAY_AWAKE_SECONDS = 0.05  # relay._runner's awake window; longer than NOTIFY_GAP, with room for transit


class Notifier:
    """Sends PostgreSQL wake-ups for one engine from a connection of its own, after the writer's commit.

    Why not ``pg_notify`` inside the writer's transaction: PostgreSQL serialises the commits of all
    transactions that notify (a global lock on the notification queue), which cut concurrent writers'
    commit rates by a third to a half here. Sent after the commit instead, from one connection and a
    thread of its own, the wake-up costs the writer's transaction nothing but handing over a table name.

    Why at most one every ``NOTIFY_GAP``: each NOTIFY is a transaction of its own on the server and a
    thread switch in this process; sent for every commit they cost a writer at 500 commits/s a fifth
    of its rate here. The first request after a quiet gap is sent at once (the idle wake-up stays
    within a millisecond or so); requests during the gap are merged into one NOTIFY at its end, and a
    relay woken by the first keeps looking meanwhile (``RELAY_AWAKE_SECONDS``), so the merged messages
    wait for at most the relay's next look, not for the gap. If the process dies between the commit
    and the notify, relays find the message at their next poll.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = weakref.ref(engine)  # the notifier ends with its engine
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="outbox-notifier", daemon=True)
        self._thread.start()

    def request(self, table: str) -> None:
        with self._lock:
            self._pending.add(table)
            self._idle.clear()
        self._wanted.set()

    def flush(self, timeout: float) -> None:
        """Wait until every requested wake-up was sent (at exit: a script that commits and ends)."""
        self._idle.wait(timeout)

    def _run(self) -> None:
        raw: Any = None
        next_allowed = 0.0
        while True:
            if not self._wanted.wait(60.0):
                if self._engine() is None:
                    break  # the engine is gone: so is the need for its wake-ups
                continue
            wait = next_allowed - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # inside the gap: what arrives meanwhile goes out in this one NOTIFY
            self._wanted.clear()
            with self._lock:
                tables, self._pending = self._pending, set()
            try:
                if raw is None:
                    raw = self._connect()
                    if raw is None:
                        break
                    # A NOTIFY commits a transaction of its own (PostgreSQL gives it a transaction id and a
                    # commit record): nothing in it needs to be durable, so it need not wait for the WAL
                    # flush, and the wake-up leaves a moment sooner.
                    raw.driver_connection.execute("SET synchronous_commit = off")
                for table in tables:
                    raw.driver_connection.execute("SELECT pg_notify(%s, '')", (notify_channel(table),))
            except Exception:  # the relays' poll interval is the fallback; try a new connection next time
                if raw is not None:
                    with contextlib.suppress(Exception):
                        raw.invalidate()
                raw = None
            next_allowed = time.monotonic() + NOTIFY_GAP
            with self._lock:
                if not self._pending:
                    self._idle.set()

    def _connect(self) -> Any:
        """An autocommit connection of the notifier's own (``None``: the engine is gone)."""
        engine = self._engine()
        if engine is None:
            return None
        conninfo = _conninfos.get(engine)
        if conninfo is not None:
            # An AsyncEngine's pool cannot be used from this thread: a psycopg connection opened with the
            # parameters of a connection the writer used (remember_conninfo) instead.
            import psycopg

            return _OwnConnection(psycopg.connect(conninfo, autocommit=True))
        raw: Any = engine.raw_connection()  # never returned to the pool: invalidated when it fails
        raw.rollback()
        raw.driver_connection.autocommit = True
        return raw


class _OwnConnection:
    """A psycopg connection opened outside any pool, with the two methods the notifier uses."""

    def __init__(self, connection: Any) -> None:
        self.driver_connection = connection

    def invalidate(self) -> None:
        self.driver_connection.close()


#: libpq parameters of a connection an AsyncEngine on psycopg gave a writer (see Notifier)
_conninfos: weakref.WeakKeyDictionary[sa.Engine, str] = weakref.WeakKeyDictionary()


def remember_conninfo(conn: sa.Connection) -> bool:
    """Keep the parameters of ``conn`` (an AsyncEngine's, on psycopg) for its engine's notifier."""
    engine = conn.engine
    if engine in _conninfos:
        return True
    try:
        info = conn.connection.driver_connection.info  # type: ignore[union-attr]
        from psycopg.conninfo import make_conninfo

        parameters = info.get_parameters()
        if info.password:
            parameters["password"] = info.password
        _conninfos[engine] = make_conninfo(**parameters)
    except Exception:  # not psycopg after all: notify inside the transaction instead
        return False
    return True


_notifiers: weakref.WeakKeyDictionary[sa.Engine, Notifier] = weakref.WeakKeyDictionary()
_notifiers_lock = threading.Lock()


@atexit.register
def _flush_notifiers() -> None:
    for notifier in list(_notifiers.values()):
        notifier.flush(1.0)


def notify_after_commit(pairs: set[tuple[sa.Engine, str]]) -> None:
    """Ask each ``(engine, table)``'s notifier for a NOTIFY (called once the writer has committed)."""
    for engine, table in pairs:
        notifier = _notifiers.get(engine)
        if notifier is None:
            with _notifiers_lock:
                notifier = _notifiers.get(engine)
                if notifier is None:
                    notifier = _notifiers[engine] = Notifier(engine)
        notifier.request(table)


def notify_channel(table: str) -> str:
    """The PostgreSQL LISTEN/NOTIFY channel that relays of ``table`` listen on."""
    return f"{table}_wake"
