"""What the operator commands select and see: the filter that picks messages, a message as shown, and
the reports of ``status``, ``replay`` and ``purge``.

Plain frozen values with a ``to_dict()`` giving the ``--json`` form (times as ISO 8601 strings with
their ``+00:00`` offset, ids as text). The queries that produce them are in :mod:`outbox.admin._operations`.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from outbox._clock import utc_iso
from outbox._schema import Status
from outbox._serialization import decode_payload

#: the most digits a SEQ has (a BIGINT); 32 digits are a UUID written without dashes
SEQ_DIGITS = 19


def message_ref(text: str) -> uuid.UUID | int | None:
    """A message as an operator names it (``outbox show``, the dashboard's URL): its SEQ (an ``int``,
    the first column of ``outbox list``) or its id (a ``uuid.UUID``); ``None`` when it is neither."""
    text = text.strip()
    if text.isascii() and text.isdigit() and len(text) <= SEQ_DIGITS:
        return int(text)
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def span(delta: dt.timedelta) -> str:
    """``3d 4h``, ``2h 5m``, ``4m 12s``, ``9s``: a duration's two largest units, as operators read it."""
    seconds = int(delta.total_seconds())
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return " ".join(parts[:2])


def expand_statuses(statuses: Iterable[Status | str]) -> tuple[Status, ...]:
    """The statuses a filter on ``statuses`` matches: ``dead`` also means ``parked``."""
    found: list[Status] = []
    for value in statuses:
        status = Status(value)
        for s in (status, Status.PARKED) if status is Status.DEAD else (status,):
            if s not in found:
                found.append(s)
    return tuple(found)


@dataclass(frozen=True)
class MessageFilter:
    """Which messages a command is about. Empty fields match everything.

    ``topic`` is an exact name, or a pattern where ``*`` matches any characters (``orders.*``).
    ``since`` / ``until`` bound ``created_at`` (naive UTC; ``since`` inclusive, ``until`` exclusive).
    ``up_to_seq`` leaves out messages written after the one with that ``seq``: an action confirmed
    after its dry run then changes no message the dry run did not count.
    """

    statuses: tuple[Status, ...] = ()
    topic: str | None = None
    key: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    up_to_seq: int | None = None

    def conditions(self, t: sa.Table) -> list[sa.ColumnElement[bool]]:
        where: list[sa.ColumnElement[bool]] = []
        if self.statuses:
            where.append(t.c.status.in_([s.value for s in expand_statuses(self.statuses)]))
        if self.topic is not None:
            if "*" in self.topic:
                # "/" never occurs in a topic, so it can escape LIKE's "_" (which topics may contain)
                pattern = (
                    self.topic.replace("/", "//").replace("%", "/%").replace("_", "/_").replace("*", "%")
                )
                where.append(t.c.topic.like(pattern, escape="/"))
            else:
                where.append(t.c.topic == self.topic)
        if self.key is not None:
            where.append(t.c.msg_key == self.key)
        if self.since is not None:
            where.append(t.c.created_at >= self.since)
        if self.until is not None:
            where.append(t.c.created_at < self.until)
        if self.up_to_seq is not None:
            where.append(t.c.seq <= self.up_to_seq)
        return where


@dataclass(frozen=True)
class MessageRecord:
    """One row of the outbox as an operator sees it (``payload`` only when asked for: ``show``)."""

    seq: int
    id: uuid.UUID
    topic: str
    key: str | None
    status: str
    attempts: int
    due_at: dt.datetime | None
    lease_token: str | None
    created_at: dt.datetime
    last_attempt_at: dt.datetime | None
    delivered_at: dt.datetime | None
    last_error: str | None
    content_type: str
    headers: dict[str, str]
    payload_size: int
    payload: bytes | None = None

    def decoded_payload(self) -> Any:
        """The payload as the handler sees it: a JSON value, or ``bytes`` (also for undecodable JSON)."""
        if self.payload is None:
            return None
        try:
            return decode_payload(self.payload, self.content_type)
        except ValueError:
            return bytes(self.payload)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: times as ISO strings with their offset (UTC), id as text; a binary payload as hex."""
        data: dict[str, Any] = {
            "seq": self.seq,
            "id": str(self.id),
            "topic": self.topic,
            "key": self.key,
            "status": self.status,
            "attempts": self.attempts,
            "due_at": _iso(self.due_at),
            "lease_token": self.lease_token,
            "created_at": _iso(self.created_at),
            "last_attempt_at": _iso(self.last_attempt_at),
            "delivered_at": _iso(self.delivered_at),
            "last_error": self.last_error,
            "content_type": self.content_type,
            "headers": self.headers,
            "payload_size": self.payload_size,
        }
        if self.payload is not None:
            value = self.decoded_payload()
            if isinstance(value, bytes):
                data["payload_hex"] = value.hex()
            else:
                data["payload"] = value
        return data


@dataclass(frozen=True)
class StatusReport:
    """``outbox status``: how many messages are where, and how far behind delivery is."""

    now: dt.datetime
    counts: dict[str, int]
    topics: dict[str, dict[str, int]]
    #: created_at of the oldest message still waiting (pending, inflight or failed)
    oldest_waiting_at: dt.datetime | None
    #: keys held back by a parked message
    parked_keys: int
    #: pending or failed messages whose time has come (the backlog a relay should be working on)
    due_now: int
    #: inflight messages whose lease has expired (a relay died; they come back on the next claim)
    expired_leases: int
    #: the relays that sent a heartbeat within the last day, alive first
    relays: tuple[RelayRecord, ...] = ()
    #: the delivered count is the database's estimate (``status(exact=False)`` on a big table), and the
    #: topics' counts leave delivered messages out
    estimated: bool = False
    #: due_now and expired_leases were counted up to this many: ``cap + 1`` means more than ``cap``
    count_cap: int | None = None

    @property
    def relays_alive(self) -> tuple[RelayRecord, ...]:
        return tuple(r for r in self.relays if r.alive)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def oldest_waiting_age(self) -> dt.timedelta | None:
        return (
            None
            if self.oldest_waiting_at is None
            else max(dt.timedelta(0), self.now - self.oldest_waiting_at)
        )

    def to_dict(self) -> dict[str, Any]:
        age = self.oldest_waiting_age
        return {
            "now": _iso(self.now),
            "total": self.total,
            "counts": self.counts,
            "topics": self.topics,
            "oldest_waiting_at": _iso(self.oldest_waiting_at),
            "oldest_waiting_age_seconds": None if age is None else age.total_seconds(),
            "parked_keys": self.parked_keys,
            "due_now": self.due_now,
            "expired_leases": self.expired_leases,
            "relays": [r.to_dict() for r in self.relays],
            "estimated": self.estimated,
            "count_cap": self.count_cap,
        }


@dataclass(frozen=True)
class RelayRecord:
    """A relay as its heartbeat row describes it (``<table>_relays``, written by ``relay._heartbeat``)."""

    relay_id: str
    host: str
    pid: int
    version: str
    routes: str
    started_at: dt.datetime
    seen_at: dt.datetime
    progress_at: dt.datetime | None
    stopped_at: dt.datetime | None
    delivered: int
    failed: int
    dead: int
    #: its last heartbeat is recent and it has not stopped
    alive: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "relay_id": self.relay_id,
            "host": self.host,
            "pid": self.pid,
            "version": self.version,
            "routes": self.routes,
            "started_at": _iso(self.started_at),
            "seen_at": _iso(self.seen_at),
            "progress_at": _iso(self.progress_at),
            "stopped_at": _iso(self.stopped_at),
            "delivered": self.delivered,
            "failed": self.failed,
            "dead": self.dead,
            "alive": self.alive,
        }


@dataclass(frozen=True)
class Activity:
    """What the relays did over a time window, from their per-minute rows (``<table>_stats``).

    ``buckets``: one ``(start, delivered, failed, dead)`` per ``step`` from ``since`` (every one, also
    those with nothing); ``latency``: counts per bucket of ``bounds_ms`` (milliseconds; one more bucket
    for slower), over the whole window."""

    since: dt.datetime
    step: dt.timedelta
    buckets: tuple[tuple[dt.datetime, int, int, int], ...]
    bounds_ms: tuple[int, ...]
    latency: tuple[int, ...]

    @property
    def delivered(self) -> int:
        return sum(b[1] for b in self.buckets)

    @property
    def failed(self) -> int:
        return sum(b[2] for b in self.buckets)

    @property
    def dead(self) -> int:
        return sum(b[3] for b in self.buckets)

    def percentile(self, fraction: float) -> float | None:
        """The delivery latency (ms) under which ``fraction`` of the deliveries fell: the upper bound of
        the bucket it is in (an upper estimate, as Prometheus' histogram_quantile would interpolate
        within it); ``None`` with no delivery, ``inf`` past the last bound."""
        total = sum(self.latency)
        if total == 0:
            return None
        rank = fraction * total
        seen = 0
        for index, count in enumerate(self.latency):
            seen += count
            if seen >= rank and count:
                return float(self.bounds_ms[index]) if index < len(self.bounds_ms) else float("inf")
        return float("inf")


@dataclass(frozen=True)
class AuditRecord:
    """One action run from the web dashboard (``<table>_audit``)."""

    seq: int
    at: dt.datetime
    who: str
    client: str
    action: str
    target: str
    count: int


@dataclass(frozen=True)
class DeadLetterReplay:
    """What a replay of dead letters sent (or, for a dry run, would send) and what Kafka refused."""

    replayed: tuple[Any, ...]  # consumers._dead_letters.DeadLetter
    failed: tuple[tuple[Any, str], ...] = ()
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "replayed": [letter.seq for letter in self.replayed],
            "failed": [{"seq": letter.seq, "error": why} for letter, why in self.failed],
        }


@dataclass(frozen=True)
class HeldKey:
    """A key whose first unfinished message holds back the rest: failed (a retry in backoff) or parked."""

    key: str
    #: the message holding the key (its payload not loaded)
    head: MessageRecord
    #: pending messages of the key behind the head, counted up to a cap (``waiting_capped`` past it)
    waiting: int
    waiting_capped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "head": self.head.to_dict(),
            "waiting": self.waiting,
            "waiting_capped": self.waiting_capped,
        }


@dataclass(frozen=True)
class ReplayResult:
    """What a replay changed (or, for a dry run, would change)."""

    replayed: tuple[uuid.UUID, ...]
    #: messages named by id that were left alone, with their status (pending, inflight, delivered)
    skipped: tuple[tuple[uuid.UUID, str], ...] = ()
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "count": len(self.replayed),
            "ids": [str(i) for i in self.replayed],
            "skipped": [{"id": str(i), "status": s} for i, s in self.skipped],
        }


@dataclass(frozen=True)
class PurgeResult:
    """What a purge deleted (or, for a dry run, would delete): messages, or inbox rows (``inbox``)."""

    count: int
    statuses: tuple[Status, ...]
    cutoff: dt.datetime
    batches: int = 0
    dry_run: bool = False
    inbox: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "count": self.count,
            "statuses": [s.value for s in self.statuses],
            "older_than": _iso(self.cutoff),
            "batches": self.batches,
            "inbox": self.inbox,
        }


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else utc_iso(value)
