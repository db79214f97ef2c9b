"""SQLite: one relay at a time, by a lease row in the outbox's locks table.

SQLite has no row locks for relays to share a table by (one writer locks the whole file), so a relay
on SQLite first takes the ``relay`` lock: a row naming its holder and when it expires. Another relay
finding a live lock of someone else's refuses to start (:class:`outbox._errors.RelayConflict`); an expired
one is taken over. The holder renews it with its leases and deletes it on a clean stop, unless handlers
are still running (then it expires, like their leases).
"""

from __future__ import annotations

import datetime as dt
import logging

import sqlalchemy as sa

from outbox._clock import utcnow
from outbox._errors import RelayConflict
from outbox._schema import OutboxTables
from relay.publishers import describe_error

log = logging.getLogger("outbox.relay")

#: the lock row's name
SQLITE_LOCK = "relay"


class SingleRelayLock:
    """The ``relay`` lock of one outbox table, held by ``holder`` for ``lease_seconds`` at a time."""

    def __init__(self, engine: sa.Engine, tables: OutboxTables, *, holder: str, lease_seconds: float) -> None:
        self.engine = engine
        self.locks = tables.locks
        self.holder = holder
        self.lease_seconds = lease_seconds

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RelayConflict` when another relay holds it."""
        locks = self.locks
        now = utcnow()
        until = now + dt.timedelta(seconds=self.lease_seconds)
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(locks).where(locks.c.name == SQLITE_LOCK)).first()
            if row is not None and row.holder != self.holder and row.expires_at > now:
                raise RelayConflict(
                    f"another relay ({row.holder}) is running on this SQLite database; SQLite supports one "
                    "relay at a time: stop it, or use PostgreSQL or MariaDB to run several relays"
                )
            if row is None:
                conn.execute(sa.insert(locks).values(name=SQLITE_LOCK, holder=self.holder, expires_at=until))
            else:
                conn.execute(
                    sa.update(locks)
                    .where(locks.c.name == SQLITE_LOCK)
                    .values(holder=self.holder, expires_at=until)
                )
            # Rows a previous relay left in flight come back when their leases expire, like everywhere
            # else: forcing them back now could run a handler that an abandoned relay still executes.

    def renew(self, conn: sa.Connection) -> None:
        """Extend the lock by ``lease_seconds`` from now, in ``conn``'s transaction (with the leases)."""
        locks = self.locks
        until = utcnow() + dt.timedelta(seconds=self.lease_seconds)
        conn.execute(
            sa.update(locks)
            .where(locks.c.name == SQLITE_LOCK, locks.c.holder == self.holder)
            .values(expires_at=until)
        )

    def release(self) -> None:
        """Delete the lock if this relay still holds it (a failure is logged: the lock then expires)."""
        locks = self.locks
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    sa.delete(locks).where(locks.c.name == SQLITE_LOCK, locks.c.holder == self.holder)
                )
        except Exception as exc:
            log.warning("could not release the SQLite relay lock: %s", describe_error(exc))
