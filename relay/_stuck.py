"""The stuck-message monitor: what every relay's maintenance thread looks for, and how it warns.

On each maintenance tick (:mod:`relay.maintenance`) :meth:`StuckMonitor.check` counts

- the messages in flight under a lease that expired more than ``lease_grace`` seconds ago (a relay died
  or stalled), and those leases;
- the messages waiting more than ``stuck_after`` past the time they became due;
- the keys whose later messages have waited that long behind an unfinished earlier one,

with a few ids of each as examples, into one :class:`StuckFindings`; :func:`report` logs them (at
WARNING on the maintenance lease holder, so N relays do not repeat every warning N times).

Invariant: **the monitor changes no message.** Taking back expired leases is the claim path's job
(:mod:`relay._claim`, invariant 4: no sweeper); the maintenance thread only wakes its relay's fetcher so
they are claimed again now rather than at the next poll.
-- ``tests/test_maintenance.py::test_killed_relay_lease_is_reported_and_reclaimed``
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from outbox._schema import KEY_HOLDING, OutboxTables, Status, status_in

log = logging.getLogger("outbox.maintenance")

_WAITING = (Status.PENDING.value, Status.FAILED.value)


@dataclass(frozen=True)
class StuckFindings:
    """What the monitor saw at ``checked_at``: the input of the stuck-message warnings and metrics.

    The ``*_ids`` / ``held_keys`` tuples hold at most ``report_ids`` examples; the counts are complete.
    """

    checked_at: dt.datetime
    #: leases (claims, one per batch) expired more than ``lease_grace`` ago and not yet taken back
    expired_leases: int = 0
    #: messages in flight under those leases
    expired_messages: int = 0
    expired_ids: tuple[uuid.UUID, ...] = ()
    #: pending or failed messages waiting more than ``stuck_after`` past their due time
    stuck_messages: int = 0
    stuck_ids: tuple[uuid.UUID, ...] = ()
    #: the topics with the most of those messages, ``(topic, count)``, most first
    stuck_topics: tuple[tuple[str, int], ...] = ()
    #: of ``stuck_topics``, those the checking relay has no handler or publisher for (a message of such
    #: a topic waits for a relay that routes it: ``relay._claim``, invariant 15)
    unrouted_topics: tuple[str, ...] = ()
    #: keys whose later messages waited more than ``stuck_after`` behind an unfinished earlier one
    held_key_count: int = 0
    #: ``(key, id of the message holding it, its status)``
    held_keys: tuple[tuple[str, uuid.UUID, str], ...] = ()
    #: distinct expired leases this relay has seen since it started (a counter: it only grows)
    expired_leases_total: int = 0
    #: this relay held the maintenance lease, so it logged the findings
    reported: bool = False

    @property
    def healthy(self) -> bool:
        return not (self.expired_messages or self.stuck_messages or self.held_key_count)


class StuckMonitor:
    """Counts what is stuck in one outbox (see the module docstring), and the expired leases seen."""

    def __init__(
        self, engine: sa.Engine, tables: OutboxTables, routes: Callable[[str], bool] | None = None
    ) -> None:
        self.engine = engine
        self.tables = tables
        #: whether the relay running the monitor routes a topic (None: not known)
        self.routes = routes
        self._seen_leases: set[str] = set()
        self._expired_leases_total = 0

    def check(
        self,
        *,
        now: dt.datetime,
        stuck_after: dt.timedelta,
        lease_grace: float,
        limit: int,
        reporting: bool,
    ) -> StuckFindings:
        """Look now; ``limit`` example ids of each kind; ``reporting``: this relay logs the findings."""
        t = self.tables.messages
        expired_cut = now - dt.timedelta(seconds=lease_grace)
        stuck_cut = now - stuck_after
        expired = (t.c.status == Status.INFLIGHT.value, t.c.due_at < expired_cut)
        overdue = (t.c.status.in_(_WAITING), t.c.due_at < stuck_cut)
        w = t.alias("w")
        e = t.alias("e")
        held_back = (
            w.c.status == Status.PENDING.value,
            w.c.msg_key.is_not(None),
            w.c.due_at < stuck_cut,
            sa.select(sa.literal(1))
            .where(
                e.c.msg_key == w.c.msg_key,
                status_in(e.c.status, KEY_HOLDING),
                e.c.seq < w.c.seq,
            )
            .exists(),
        )
        with self.engine.connect() as conn:
            leases = conn.execute(
                sa.select(t.c.lease_token, sa.func.count()).where(*expired).group_by(t.c.lease_token)
            ).all()
            expired_ids = _ids(conn, sa.select(t.c.id).where(*expired).order_by(t.c.due_at).limit(limit))
            stuck = conn.execute(sa.select(sa.func.count()).where(*overdue)).scalar_one()
            stuck_ids = (
                _ids(conn, sa.select(t.c.id).where(*overdue).order_by(t.c.due_at).limit(limit))
                if stuck
                else ()
            )
            count = sa.func.count().label("n")
            stuck_topics = (
                tuple(
                    (str(topic), int(n))
                    for topic, n in conn.execute(
                        sa.select(t.c.topic, count)
                        .where(*overdue)
                        .group_by(t.c.topic)
                        .order_by(count.desc(), t.c.topic)
                        .limit(limit)
                    )
                )
                if stuck
                else ()
            )
            held_count = conn.execute(
                sa.select(sa.func.count(sa.distinct(w.c.msg_key))).where(*held_back)
            ).scalar_one()
            held: list[tuple[str, uuid.UUID, str]] = []
            if held_count:
                keys = conn.execute(
                    sa.select(w.c.msg_key).where(*held_back).group_by(w.c.msg_key).limit(limit)
                ).scalars()
                for key in list(keys):
                    first = conn.execute(
                        sa.select(t.c.id, t.c.status)
                        .where(t.c.msg_key == key, status_in(t.c.status, KEY_HOLDING))
                        .order_by(t.c.seq)
                        .limit(1)
                    ).first()
                    if first is not None:
                        held.append((str(key), first.id, str(first.status)))
        tokens = {str(token) for token, _ in leases if token is not None}
        self._expired_leases_total += len(tokens - self._seen_leases)
        self._seen_leases = tokens  # only the current ones: a taken-back lease never comes back
        return StuckFindings(
            checked_at=now,
            expired_leases=len(leases),
            expired_messages=sum(int(n) for _, n in leases),
            expired_ids=expired_ids,
            stuck_messages=int(stuck),
            stuck_ids=stuck_ids,
            stuck_topics=stuck_topics,
            unrouted_topics=tuple(
                topic for topic, _ in stuck_topics if self.routes is not None and not self.routes(topic)
            ),
            held_key_count=int(held_count),
            held_keys=tuple(held),
            expired_leases_total=self._expired_leases_total,
            reported=reporting,
        )


def report(f: StuckFindings, *, lease_grace: float, stuck_after: dt.timedelta) -> None:
    """Log the findings: at WARNING when this relay reports them (``f.reported``), else at DEBUG."""
    level = logging.WARNING if f.reported else logging.DEBUG
    if f.expired_messages:
        log.log(
            level,
            "%d message(s) in flight under %d lease(s) that expired more than %gs ago (a relay died "
            "or stalled); relays take them back by themselves: %s",
            f.expired_messages,
            f.expired_leases,
            lease_grace,
            _shown(f.expired_ids, f.expired_messages),
        )
    if f.stuck_messages:
        log.log(
            level,
            "%d message(s) waiting more than %s past their due time (are relays running and keeping up?): "
            "%s; by topic: %s%s",
            f.stuck_messages,
            _span(stuck_after),
            _shown(f.stuck_ids, f.stuck_messages),
            ", ".join(f"{topic} {n}" for topic, n in f.stuck_topics),
            (
                f"; this relay has no handler or publisher for {', '.join(f.unrouted_topics)}: they wait, "
                "attempts untouched, for a relay that routes them (one whose --app registers them, or "
                "one publishing to Kafka)"
                if f.unrouted_topics
                else ""
            ),
        )
    if f.held_key_count:
        log.log(
            level,
            "%d key(s) held back for more than %s by an unfinished earlier message: %s",
            f.held_key_count,
            _span(stuck_after),
            _shown([f"{key} (by {mid}, {status})" for key, mid, status in f.held_keys], f.held_key_count),
        )


def _ids(conn: sa.Connection, query: sa.Select[Any]) -> tuple[uuid.UUID, ...]:
    return tuple(conn.execute(query).scalars())


def _shown(items: Sequence[object], total: int) -> str:
    text = ", ".join(str(item) for item in items)
    return text + (f" and {total - len(items)} more" if total > len(items) else "")


def _span(delta: dt.timedelta) -> str:
    seconds = delta.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
