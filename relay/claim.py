"""Claim, lease and fence: the queries that decide who handles which message.

A relay takes work in batches. One claim statement picks up to N claimable rows, marks them ``inflight``
under a fresh lease (a random token and an expiry kept in ``due_at``) and returns them. Everything the
relay later writes about those rows (delivered, failed, dead, released, renewed) carries the token.

Invariants (each names the test that would catch its violation):

1. **A row is handled by at most one live lease.** Claiming locks the candidate rows
   (``FOR UPDATE SKIP LOCKED`` on PostgreSQL and MariaDB; SQLite allows one relay, see
   ``relay.single_relay``) and re-checks ``due_at <= now`` on the locked version, so two relays never both
   claim a row whose lease is live. -- ``tests/test_concurrency.py::test_three_relays_deliver_each_once``
2. **A mark without the current token changes nothing.** Every UPDATE after the claim has
   ``WHERE lease_token = :token``; a reclaim replaces the token, so a relay that stalled past its lease
   (fenced) cannot mark, fail or release rows it no longer holds; a handler's session work is rolled
   back when its delivered mark finds no row. -- ``tests/test_claim.py::test_expired_lease_is_fenced``
3. **For one key, a row is claimable only when every earlier row of that key is delivered or dead**
   (or, for a strict-order topic, delivered: a dead one is ``parked`` and holds the key). So messages of
   one key are handled one at a time, in ``seq`` order, and a failing message holds back only its own
   key. -- ``tests/test_handlers.py::test_order_per_key_with_failures``,
   ``tests/test_concurrency.py::test_three_relays_deliver_each_once``
4. **A lease that is not renewed expires, and the row comes back by itself.** ``due_at`` of an
   inflight row is its lease expiry; the claim takes any row whose ``due_at`` has passed, whatever its
   status, so a crashed relay's rows are reclaimed with no sweeper; the claim marks those rows
   ``ClaimedRow.reclaimed`` (their status was still inflight), which the metrics count.
   -- ``tests/test_crash.py``, ``tests/test_metrics.py::test_reclaimed_leases_are_counted``
5. **No committed message is skipped.** Claiming only reads ``due_at`` (set at insert) and the key's
   earlier rows; a row becomes invisible to the claim only by being delivered, dead or parked, each
   written under a live token. -- ``tests/test_crash.py::test_killed_relay_loses_nothing``
6. **Releasing gives back the attempt.** A release (graceful stop, database outage around a handler)
   decrements ``attempts``, so infrastructure trouble never pushes a message towards ``dead``.
   -- ``tests/test_stop.py``, ``tests/test_db_restart.py``

7. **A relay frozen at any instant keeps no other relay from its expired rows.** A process can stop
   between two statements for any length of time (a GC pause, a VM freeze, ``SIGSTOP``); a row lock it
   holds lasts as long, and every other claim skips the row (``SKIP LOCKED``). So, on PostgreSQL and
   MariaDB, each write of the lease path (renewal, delivered, failed, released marks) is one statement
   run in autocommit: committed by the server when it has run, whatever the client does next. Two
   transactions remain, both as short as a claim: the claim on MariaDB (lock the candidates, then update
   them; a relay frozen in between holds those rows, and the first row past them in ``due_at`` order,
   until it runs again or its connection dies), and a session handler's transaction, which must hold the
   delivered mark with the handler's own writes. On MariaDB a plain read looks first unless the last
   claim came back full, so an idle relay's claims (one every poll interval: where a freeze lands) take
   no lock; only the claim that ends a backlog can find nothing under a lock.
   The maintenance lease (:mod:`relay.maintenance`, a row of ``<table>_locks``) is written the same
   way, so a relay frozen right after taking it does not keep the others from taking it over.
   -- ``tests/test_crash.py::test_relay_frozen_mid_write_holds_no_row``,
   ``tests/test_crash.py::test_relay_frozen_taking_the_maintenance_lease_holds_no_lock``

``attempts`` is incremented by the claim itself, so a message that crashes relays (kill -9, OOM) is
counted; it only goes ``dead`` when a handler attempt fails with no attempts left.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from outbox.dialects import Dialect
from outbox.schema import KEY_HOLDING, OutboxTables, Status, status_in

#: longest stored error text (type and message); the rest is cut with a marker
MAX_ERROR_LENGTH = 2000


def new_token() -> str:
    return secrets.token_hex(16)


@dataclass(slots=True)  # not frozen: built for every claimed row, and frozen dataclasses build slowly
class ClaimedRow:
    """A row as the claim returned it, with the token of the lease that holds it."""

    seq: int
    id: Any
    topic: str
    key: str | None
    payload: bytes
    content_type: str
    headers: str | None
    attempts: int
    created_at: dt.datetime
    token: str
    #: the row was in flight under an expired lease (its relay died or stalled): taken back, not new
    reclaimed: bool = False


class ClaimQueries:
    """The claim path's statements for one outbox table on one database family."""

    def __init__(self, tables: OutboxTables, dialect: Dialect) -> None:
        self.tables = tables
        self.dialect = dialect
        t = self.t = tables.messages
        c = t.alias("c")
        e = t.alias("e")
        earlier_unfinished = (
            sa.select(sa.literal(1))
            .where(
                e.c.msg_key == c.c.msg_key,
                status_in(e.c.status, KEY_HOLDING),
                e.c.seq < c.c.seq,
            )
            .exists()
        )
        candidates = (
            sa.select(c.c.seq)
            .where(c.c.due_at <= sa.bindparam("now"), sa.or_(c.c.msg_key.is_(None), ~earlier_unfinished))
            .order_by(c.c.due_at)
            .limit(sa.bindparam("limit", type_=sa.Integer))
        )
        self._columns = [
            t.c.seq,
            t.c.id,
            t.c.topic,
            t.c.msg_key,
            t.c.payload,
            t.c.content_type,
            t.c.headers,
            t.c.attempts,
            t.c.created_at,
        ]
        claim_values = {
            "status": Status.INFLIGHT.value,
            "lease_token": sa.bindparam("token"),
            "due_at": sa.bindparam("lease_until"),
            "attempts": t.c.attempts + 1,
            "last_attempt_at": sa.bindparam("now"),
        }
        if dialect.claim_returning and dialect.skip_locked:  # PostgreSQL
            # the locked rows' status before the claim comes back too: "inflight" = a reclaimed lease
            picked = (
                candidates.add_columns(c.c.status.label("previous_status"))
                .with_for_update(skip_locked=True, of=c)
                .cte("picked")
            )
            self._claim: Any = (
                sa.update(t)
                .where(t.c.seq == picked.c.seq)
                .values(claim_values)
                .returning(*self._columns, picked.c.previous_status)
            )
        elif dialect.claim_returning:  # SQLite: one relay, the statement is atomic on its own
            self._claim = (
                sa.update(t)
                .where(t.c.seq.in_(candidates.scalar_subquery()))
                .values(claim_values)
                .returning(*self._columns)
            )
            # RETURNING shows only new values: find expired leases first (same transaction, one relay)
            self._expired_leases = sa.select(t.c.seq).where(
                t.c.status == Status.INFLIGHT.value, t.c.due_at <= sa.bindparam("now")
            )
        else:  # MariaDB/MySQL: lock the rows, then update them by primary key
            # InnoDB keeps a lock on the first row past the scanned range of due_at (READ COMMITTED too),
            # typically a live lease: a relay frozen inside a claim transaction that found nothing would
            # hold that row until it ran again. So a plain read (no locks) looks first, and the locking
            # transaction runs only when there is something to take (see claim_batch).
            self._probe = candidates.limit(1)
            self._lock_candidates = candidates.add_columns(c.c.status).with_for_update(skip_locked=True, of=c)
            self._claim = (
                sa.update(t).where(t.c.seq.in_(sa.bindparam("seqs", expanding=True))).values(claim_values)
            )
            self._select_claimed = sa.select(*self._columns).where(
                t.c.seq.in_(sa.bindparam("seqs", expanding=True))
            )

        if dialect.array_params:  # one statement text whatever the batch size: prepared once, no re-parsing
            # The array goes as one text literal ("{1,2,3}", see _seqs): psycopg's list dumper spends about
            # 3 us of Python per element (a regex each), a sixth of the relay's own cost of a delivered mark.
            seq_array = sa.cast(sa.bindparam("seqs", type_=sa.Text()), postgresql.ARRAY(sa.BigInteger()))
            in_seqs = t.c.seq == sa.any_(seq_array)
        else:
            in_seqs = t.c.seq.in_(sa.bindparam("seqs", expanding=True))
        fenced = sa.and_(t.c.lease_token == sa.bindparam("token"), in_seqs)
        self._delivered = (
            sa.update(t)
            .where(fenced)
            .values(
                status=Status.DELIVERED.value, due_at=None, lease_token=None, delivered_at=sa.bindparam("now")
            )
        )
        self._failed = (
            sa.update(t)
            .where(t.c.lease_token == sa.bindparam("token"), t.c.seq == sa.bindparam("b_seq"))
            .values(
                status=sa.bindparam("b_status"),
                due_at=sa.bindparam("b_due"),
                lease_token=None,
                last_error=sa.bindparam("b_error"),
            )
        )
        self._release = (
            sa.update(t)
            .where(fenced)
            .values(
                status=sa.case((t.c.last_error.is_(None), Status.PENDING.value), else_=Status.FAILED.value),
                due_at=sa.bindparam("now"),
                lease_token=None,
                attempts=sa.case((t.c.attempts > 0, t.c.attempts - 1), else_=0),
            )
        )
        self._renew = (
            sa.update(t)
            .where(t.c.lease_token == sa.bindparam("token"), t.c.status == Status.INFLIGHT.value)
            .values(due_at=sa.bindparam("lease_until"))
        )

    @property
    def one_statement(self) -> bool:
        """The claim is a single statement (PostgreSQL): it needs no transaction around it."""
        return bool(self.dialect.claim_returning and self.dialect.skip_locked)

    # -- claim ----------------------------------------------------------------------------------------

    def claim_batch(
        self,
        conn: sa.Connection,
        *,
        limit: int,
        lease_seconds: float,
        now: dt.datetime,
        look_first: bool = True,
    ) -> list[ClaimedRow]:
        """Claim up to ``limit`` claimable rows under one new lease, in the caller's transaction.

        The caller commits right after (or, where :attr:`one_statement`, may run it in autocommit); the
        lease is live from then until ``now + lease_seconds``. ``look_first=False`` skips MariaDB's plain
        read before the locking one (one round trip) when rows are expected: the last claim was full.
        """
        token = new_token()
        params = {
            "now": now,
            "limit": limit,
            "token": token,
            "lease_until": now + dt.timedelta(seconds=lease_seconds),
        }
        held = Status.INFLIGHT.value  # a row claimed while still held: its lease had expired
        if self.dialect.claim_returning and self.dialect.skip_locked:
            # rows unpacked by position: Row attribute access by name costs more than the rest together
            result = conn.execute(self._claim, params).all()
            return [
                ClaimedRow(seq, id_, topic, key, payload, ctype, headers, tries, created, token, prev == held)
                for seq, id_, topic, key, payload, ctype, headers, tries, created, prev in result
            ]
        if self.dialect.claim_returning:
            reclaimed = set(conn.execute(self._expired_leases, params).scalars())
            rows = conn.execute(self._claim, params).all()
        else:
            if look_first and conn.execute(self._probe, params).first() is None:
                return []
            locked = conn.execute(self._lock_candidates, params).all()
            if not locked:
                return []
            seqs = [r.seq for r in locked]
            reclaimed = {r.seq for r in locked if r.status == held}
            conn.execute(self._claim, {**params, "seqs": seqs})
            rows = conn.execute(self._select_claimed, {"seqs": seqs}).all()
        return [
            ClaimedRow(seq, id_, topic, key, payload, ctype, headers, tries, created, token, seq in reclaimed)
            for seq, id_, topic, key, payload, ctype, headers, tries, created in rows
        ]

    # -- marks (all fenced by the lease token) -----------------------------------------------------------

    def _seqs(self, seqs: Sequence[int]) -> str | list[int]:
        """The ``seqs`` parameter: a PostgreSQL array literal, or a list for an expanding IN."""
        if self.dialect.array_params:
            return "{" + ",".join(map(str, seqs)) + "}"
        return list(seqs)

    def mark_delivered(
        self, conn: sa.Connection, token: str, seqs: Sequence[int], *, now: dt.datetime
    ) -> int:
        """Mark rows delivered; returns how many still held ``token`` (the others were fenced off)."""
        if not seqs:
            return 0
        return conn.execute(self._delivered, {"token": token, "seqs": self._seqs(seqs), "now": now}).rowcount

    def mark_failed(self, conn: sa.Connection, token: str, failures: Sequence[Failure]) -> None:
        """Record failed attempts: each gets its status (failed/dead/parked), next due time and error."""
        if not failures:
            return
        conn.execute(
            self._failed,
            [
                {
                    "token": token,
                    "b_seq": f.seq,
                    "b_status": f.status.value,
                    "b_due": f.retry_at,
                    "b_error": truncate_error(f.error),
                }
                for f in failures
            ],
        )

    def release(self, conn: sa.Connection, token: str, seqs: Sequence[int], *, due_at: dt.datetime) -> int:
        """Give rows back unhandled: claimable again from ``due_at``, attempt not counted."""
        if not seqs:
            return 0
        return conn.execute(self._release, {"token": token, "seqs": self._seqs(seqs), "now": due_at}).rowcount

    def renew(self, conn: sa.Connection, token: str, *, lease_until: dt.datetime) -> int:
        """Extend the lease of every row still in flight under ``token``."""
        return conn.execute(self._renew, {"token": token, "lease_until": lease_until}).rowcount


@dataclass(frozen=True, slots=True)
class Failure:
    """The outcome of a failed attempt, ready to be written: ``retry_at`` is None for dead/parked."""

    seq: int
    status: Status
    retry_at: dt.datetime | None
    error: str


def truncate_error(text: str) -> str:
    if len(text) <= MAX_ERROR_LENGTH:
        return text
    return text[: MAX_ERROR_LENGTH - 15] + " ...[truncated]"
