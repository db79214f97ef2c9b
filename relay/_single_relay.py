"""SQLite: one relay at a time, by an operating-system lock that dies with its process.

SQLite has no row locks for relays to share a table by (one writer locks the whole file), so a relay on
SQLite first takes the table's relay lock, and another relay that finds it taken refuses to start
(:class:`outbox._errors.RelayConflict`).

**Who holds it is decided by the operating system**: an exclusive ``flock`` on a file next to the
database, ``<database>.<table>-relay.lock`` (``shop.db.outbox-relay.lock``), held as long as the relay
runs. The kernel drops it when the process ends, however it ends, so a relay started right after a
``kill -9`` starts at once (a lock row with a lease, which is all this used to be, kept the database
refused until the lease expired: 30 s by default). -- ``tests/test_concurrency.py::
test_sqlite_relay_starts_at_once_after_its_predecessor_was_killed``

The ``relay`` row in the table's locks table is still written, renewed with the leases and deleted on a
clean stop: it names the holder for people (and for the conflict message). Where no OS lock can be had
(an in-memory database, which no other process can open; a platform without ``fcntl``; a lock file that
cannot be created) the row decides alone, as before: a live row of someone else's refuses the start,
an expired one is taken over.

A relay that stops while handlers still run keeps the lock for ``lease_seconds`` more (the row expires,
and the OS lock is let go then), like those handlers' leases: a successor must not run their messages
while they may still be running. Rows a previous relay left in flight come back when their leases
expire, as everywhere else.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import threading

import sqlalchemy as sa

from outbox._clock import utcnow
from outbox._errors import RelayConflict
from outbox._schema import OutboxTables
from relay.publishers import describe_error

try:
    import fcntl
except ImportError:  # Windows: the lock row alone decides
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("outbox.relay")

#: the lock row's name
SQLITE_LOCK = "relay"


def lock_file_for(url: sa.URL, table: str) -> str | None:
    """The OS lock file of ``table``'s relay on the SQLite database at ``url``; ``None`` in memory."""
    database = url.database or ""
    if database.startswith("file:"):  # a URI filename (?uri=true): its path, without the query
        database = database[len("file:") :].split("?", 1)[0]
        if url.query.get("mode") == "memory" or "mode=memory" in (url.database or ""):
            return None
    if database in ("", ":memory:") or url.query.get("mode") == "memory":
        return None
    return f"{database}.{table}-relay.lock"


class SingleRelayLock:
    """The relay lock of one outbox table, held by ``holder`` (see the module docstring)."""

    def __init__(self, engine: sa.Engine, tables: OutboxTables, *, holder: str, lease_seconds: float) -> None:
        self.engine = engine
        self.locks = tables.locks
        self.holder = holder
        self.lease_seconds = lease_seconds
        #: the OS lock's file (None: the row decides alone), and its descriptor while held
        self.path = lock_file_for(engine.url, tables.name) if fcntl is not None else None
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RelayConflict` when another relay holds it."""
        exclusive = self._lock_file()
        try:
            self._write_row(exclusive)
        except BaseException:
            self._unlock_file()
            raise

    def _lock_file(self) -> bool:
        """Take the OS lock; False when there is none to take (the row decides alone)."""
        if self.path is None:
            return False
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            log.warning(
                "cannot open the SQLite relay lock file %s (%s): a relay killed with kill -9 keeps the "
                "database refused until its lease expires",
                self.path,
                exc,
            )
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RelayConflict(
                f"another relay ({self._row_holder() or holder or 'unknown'}) is running on this SQLite "
                f"database (it holds {self.path}); SQLite supports one relay at a time: stop it, or use "
                "PostgreSQL or MariaDB to run several relays"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.holder}\n".encode(), 0)
        self._fd = fd
        return True

    def _write_row(self, exclusive: bool) -> None:
        """Write the lock row; without the OS lock (``exclusive`` false) a live row of another holder
        refuses the start."""
        locks = self.locks
        now = utcnow()
        until = now + dt.timedelta(seconds=self.lease_seconds)
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(locks).where(locks.c.name == SQLITE_LOCK)).first()
            if not exclusive and row is not None and row.holder != self.holder and row.expires_at > now:
                raise RelayConflict(
                    f"another relay ({row.holder}) is running on this SQLite database; SQLite supports one "
                    "relay at a time: stop it, or use PostgreSQL or MariaDB to run several relays"
                )
            # With the OS lock, a row of another holder is a dead relay's: its process is gone.
            if row is None:
                conn.execute(sa.insert(locks).values(name=SQLITE_LOCK, holder=self.holder, expires_at=until))
            else:
                conn.execute(
                    sa.update(locks)
                    .where(locks.c.name == SQLITE_LOCK)
                    .values(holder=self.holder, expires_at=until)
                )

    def _row_holder(self) -> str | None:
        """Who the lock row names (for the conflict message); None when it cannot be read."""
        try:
            with self.engine.connect() as conn:
                holder = conn.execute(
                    sa.select(self.locks.c.holder).where(self.locks.c.name == SQLITE_LOCK)
                ).scalar()
        except Exception:
            return None
        return None if holder is None else str(holder)

    def renew(self, conn: sa.Connection) -> None:
        """Extend the lock row by ``lease_seconds`` from now, in ``conn``'s transaction (with the leases)."""
        locks = self.locks
        until = utcnow() + dt.timedelta(seconds=self.lease_seconds)
        conn.execute(
            sa.update(locks)
            .where(locks.c.name == SQLITE_LOCK, locks.c.holder == self.holder)
            .values(expires_at=until)
        )

    def release(self) -> None:
        """Delete the lock row if this relay still holds it and let the OS lock go (a failure to delete
        is logged: the row then expires, and the OS lock decides anyway)."""
        locks = self.locks
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    sa.delete(locks).where(locks.c.name == SQLITE_LOCK, locks.c.holder == self.holder)
                )
        except Exception as exc:
            log.warning("could not release the SQLite relay lock: %s", describe_error(exc))
        finally:
            self._unlock_file()

    def keep_until_expired(self) -> None:
        """Hold the lock ``lease_seconds`` longer, then let the OS lock go (handlers still run: the
        module docstring); the row is left to expire."""
        if self._fd is not None:
            timer = threading.Timer(self.lease_seconds, self._unlock_file)
            timer.daemon = True
            timer.name = "outbox-relay-lock-expiry"
            timer.start()

    def _unlock_file(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the only descriptor drops the flock


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
    return ""
