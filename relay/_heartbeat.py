"""The relay's heartbeat: its row in ``<name>_relays`` and its per-minute counts in ``<name>_stats``.

A :class:`Heartbeat` is an observer (:mod:`relay.observers`) that every relay runs: it counts outcomes
as the completer writes them (delivered, failed, dead or parked, and each delivery's latency from
``outbox.add`` to its delivered mark, by :data:`~outbox._schema.LATENCY_BUCKETS_MS` bucket), and a thread
of its own writes them every :data:`HEARTBEAT_INTERVAL` seconds:

- the relay's row (``relay_id`` = the relay's name): ``seen_at`` now, ``progress_at`` the last outcome,
  its totals since start, what it routes; a graceful stop writes ``stopped_at``;
- one row per minute that saw outcomes: that minute's counts and latency buckets, rewritten whole (one
  relay writes its rows from one thread: no other writer can race it).

What it promises:

- **It never disturbs delivery.** The hooks only add to counters under a lock; the database writes are
  on the heartbeat's own thread (but the first, at start, right after the schema check), each an
  UPDATE (an INSERT the first time) of a few small rows, and a failed write (a database outage) is
  logged once and retried with the next beat, never raised. A stop waits at most :data:`STOP_WAIT`
  seconds for the last beat: a frozen database never holds it.
  -- ``tests/test_heartbeat.py``
- **Bounded**: a relay writes one row of its own and, per minute, one stats row; rows older than
  :data:`~outbox._schema.ACTIVITY_RETENTION_DAYS` days (relays not seen since, stats, the dashboard's
  audit) are deleted by the heartbeats, a few times an hour.
- **A relay alive is a relay seen**: readers (``outbox status``, the dashboard) call a relay alive when
  its ``seen_at`` is within ``outbox._defaults.ALIVE_WITHIN`` seconds and it did not stop.
"""

from __future__ import annotations

import bisect
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import sqlalchemy as sa

from outbox import __version__
from outbox import _defaults as defaults
from outbox._clock import utcnow
from outbox._schema import ACTIVITY_RETENTION_DAYS, LATENCY_BUCKETS_MS, OutboxTables
from relay._outcomes import RecordedOutcome
from relay.observers import RelayObserver

if TYPE_CHECKING:
    from relay._runner import Relay

log = logging.getLogger("outbox.relay")

HEARTBEAT_INTERVAL = defaults.HEARTBEAT_INTERVAL
#: seconds a relay's stop waits for the heartbeat's last beat
STOP_WAIT = 2.0
#: seconds between two deletions of rows older than ACTIVITY_RETENTION_DAYS
CLEANUP_INTERVAL = 600.0


@dataclass(eq=True)
class _Minute:
    delivered: int = 0
    failed: int = 0
    dead: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))


#: the bucket bounds as durations: a delivery's wait is bucketed without converting it to a number
_BOUNDS = tuple(dt.timedelta(milliseconds=ms) for ms in LATENCY_BUCKETS_MS)


def latency_bucket(milliseconds: float) -> int:
    """The index of the bucket ``milliseconds`` falls in (the last one: slower than every bound)."""
    return bisect.bisect_left(_BOUNDS, dt.timedelta(milliseconds=milliseconds))


class Heartbeat(RelayObserver):
    """Counts a relay's outcomes and writes them, with its heartbeat, every ``interval`` seconds."""

    def __init__(self, engine: sa.Engine, tables: OutboxTables, *, interval: float = HEARTBEAT_INTERVAL):
        self.engine = engine
        self.tables = tables
        self.interval = interval
        self._lock = threading.Lock()
        self._minutes: dict[dt.datetime, _Minute] = {}  # written each beat, then the past ones dropped
        self._totals = _Minute()
        self._progress_at: dt.datetime | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._relay_id = ""
        self._routes = "*"
        self._started_at = utcnow()
        self._failing = False
        self._cleaned: float | None = None  # when old rows were last deleted (monotonic)

    # -- hooks (the relay's threads) -------------------------------------------------------------------

    def on_start(self, relay: Relay) -> None:
        self._relay_id = relay.name[:64]
        topics = relay.dispatcher.claimable()
        self._routes = "*" if topics is None else ", ".join([*sorted(topics.names), *topics.patterns])[:1000]
        self._started_at = utcnow()
        self._beat(first=True)
        self._thread = threading.Thread(target=self._run, name="outbox-heartbeat", daemon=True)
        self._thread.start()

    def on_outcomes(self, outcomes: Sequence[RecordedOutcome]) -> None:
        # on the completer's path for every message: one pass, no per-item call but bisect
        now = utcnow()
        waited = [now - item.delivery.message.created_at for item in outcomes if item.result == "delivered"]
        failed = dead = 0
        if len(waited) != len(outcomes):
            results = [item.result for item in outcomes]
            failed = results.count("failed")
            dead = results.count("dead") + results.count("parked")
        minute = now.replace(second=0, microsecond=0)
        with self._lock:
            counts = self._minutes.get(minute)
            if counts is None:
                counts = self._minutes[minute] = _Minute()
            latency = counts.latency
            for delta in waited:
                latency[bisect.bisect_left(_BOUNDS, delta)] += 1
            counts.delivered += len(waited)
            counts.failed += failed
            counts.dead += dead
            self._totals.delivered += len(waited)
            self._totals.failed += failed
            self._totals.dead += dead
            if waited or failed or dead:
                self._progress_at = now

    def on_stop(self, relay: Relay) -> None:
        # The last beat (stopped_at) is the heartbeat thread's: a stop waits for it at most
        # STOP_WAIT seconds, so that a database that stopped answering (frozen, partitioned) never
        # holds a relay's stop; the row then goes silent instead of stopped.
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=STOP_WAIT)

    # -- the heartbeat's thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()
        self._beat(stopped=True)

    def _beat(self, *, first: bool = False, stopped: bool = False) -> None:
        now = utcnow()
        with self._lock:
            minutes = {
                m: _Minute(c.delivered, c.failed, c.dead, list(c.latency)) for m, c in self._minutes.items()
            }
            totals = _Minute(self._totals.delivered, self._totals.failed, self._totals.dead)
            progress_at = self._progress_at
        try:
            with self.engine.begin() as conn:
                self._write_relay(conn, now, totals, progress_at, first=first, stopped=stopped)
                for minute, counts in sorted(minutes.items()):
                    self._write_minute(conn, minute, counts)
                if self._cleaned is None or time.monotonic() - self._cleaned > CLEANUP_INTERVAL:
                    self._delete_old(conn, now)
                    self._cleaned = time.monotonic()
        except Exception as exc:  # never disturbs delivery: logged, and the next beat tries again
            if not self._failing:
                log.warning("relay heartbeat not written (tried again every %gs): %s", self.interval, exc)
            self._failing = True
            return
        if self._failing:
            log.info("relay heartbeat written again")
            self._failing = False
        current = now.replace(second=0, microsecond=0)
        with self._lock:  # a past minute written as it is now is complete: forget it
            for minute in [m for m in minutes if m < current]:
                if self._minutes.get(minute) == minutes[minute]:
                    del self._minutes[minute]

    def _write_relay(
        self,
        conn: sa.Connection,
        now: dt.datetime,
        totals: _Minute,
        progress_at: dt.datetime | None,
        *,
        first: bool,
        stopped: bool,
    ) -> None:
        """The relay's row: all of it at the first beat (a restart under the same name describes this
        start), its heartbeat, progress and totals afterwards."""
        t = self.tables.relays
        values: dict[str, object] = {
            "seen_at": now,
            "progress_at": progress_at,
            "stopped_at": now if stopped else None,
            "delivered": totals.delivered,
            "failed": totals.failed,
            "dead": totals.dead,
        }
        if first:
            values |= {
                "host": socket.gethostname()[:255],
                "pid": os.getpid(),
                "version": __version__[:32],
                "routes": self._routes,
                "started_at": self._started_at,
            }
        changed = conn.execute(sa.update(t).where(t.c.relay_id == self._relay_id).values(**values)).rowcount
        if changed == 0 and first:
            conn.execute(sa.insert(t).values(relay_id=self._relay_id, **values))

    def _write_minute(self, conn: sa.Connection, minute: dt.datetime, counts: _Minute) -> None:
        t = self.tables.stats
        values = {
            "delivered": counts.delivered,
            "failed": counts.failed,
            "dead": counts.dead,
            "latency": json.dumps(counts.latency, separators=(",", ":")),
        }
        mine = (t.c.minute == minute, t.c.relay_id == self._relay_id)
        if conn.execute(sa.update(t).where(*mine).values(**values)).rowcount == 0:
            conn.execute(sa.insert(t).values(minute=minute, relay_id=self._relay_id, **values))

    def _delete_old(self, conn: sa.Connection, now: dt.datetime) -> None:
        cutoff = now - dt.timedelta(days=ACTIVITY_RETENTION_DAYS)
        t = self.tables
        conn.execute(sa.delete(t.relays).where(t.relays.c.seen_at < cutoff))
        conn.execute(sa.delete(t.stats).where(t.stats.c.minute < cutoff))
        conn.execute(sa.delete(t.audit).where(t.audit.c.at < cutoff))
