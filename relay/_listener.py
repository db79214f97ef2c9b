"""PostgreSQL LISTEN: wake a relay's fetcher as soon as a writer's NOTIFY arrives.

Writers send ``NOTIFY <table>_wake`` after their commit (:mod:`outbox._wakeup`, at most one per
``NOTIFY_GAP``); the listener holds a connection of its own in ``LISTEN`` and sets the relay's wake-up
event for each notification, and once after every (re)connection, for whatever was committed while
nobody listened. A lost connection is reopened with backoff; it is never handed back to the pool
(a pooled connection must not stay subscribed). Notifications are only a hint: the relay also polls.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import sqlalchemy as sa

from relay.publishers import describe_error

log = logging.getLogger("outbox.relay")


def listen(engine: sa.Engine, channel: str, wake: threading.Event, stopping: threading.Event) -> None:
    """Set ``wake`` on every notification on ``channel`` until ``stopping`` is set (a thread's body)."""
    backoff = 0.1
    while not stopping.is_set():
        raw = None
        try:
            raw = engine.raw_connection()
            pg = raw.driver_connection
            assert pg is not None
            raw.rollback()
            pg.autocommit = True
            pg.execute(f'LISTEN "{channel}"')
            wake.set()  # anything committed while we were not listening
            backoff = 0.1
            while not stopping.is_set():
                for _ in pg.notifies(timeout=0.5, stop_after=1):
                    wake.set()
        except Exception as exc:
            if not stopping.is_set():
                log.debug("LISTEN connection lost (%s); reconnecting in %.1fs", describe_error(exc), backoff)
                stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            if raw is not None:
                raw.invalidate()
                raw = None
        finally:
            if raw is not None:
                with contextlib.suppress(Exception):
                    raw.invalidate()  # never hand a LISTENing connection back to the pool
