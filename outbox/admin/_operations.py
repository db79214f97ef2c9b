"""The operator's queries: what is in the outbox, and the changes ``outbox replay`` / ``purge`` make.

Every statement behind ``outbox status``, ``list``, ``show``, ``replay`` and ``purge`` lives in
:class:`Operations` (SQLAlchemy Core, the same on PostgreSQL, MariaDB and SQLite). What they promise:

- **Reads change nothing** and never lock rows.
- **Replay touches only replayable rows.** Every UPDATE re-checks the status it selected on
  (``failed``/``dead``/``parked``, plus ``delivered`` only when asked), so a row a relay claimed in the
  meantime (``inflight``) or one already pending is never changed. -- ``tests/test_operations.py::
  test_replay_never_touches_pending_or_inflight``
- **Purge deletes only finished rows**: ``delivered`` (by ``delivered_at``) or ``dead``/``parked`` (by
  ``created_at``); the DELETE re-checks status and age, so pending, inflight and failed rows are never
  deleted; inbox rows (``--inbox``) by ``processed_at``. -- ``tests/test_operations.py::
  test_purge_deletes_only_old_delivered``, ``test_purge_inbox_deletes_only_old_rows_of_every_group``
- **Big changes go in bounded batches** (by ``seq``, one transaction each), so neither command holds
  long locks on a busy table. A dry run selects exactly what the real run would and writes nothing.

Status words: filtering on ``dead`` matches ``dead`` and ``parked`` (parked is "dead on a strict-order
topic, holding its key"); filtering on ``parked`` matches only parked messages.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa

from outbox import _defaults as defaults
from outbox._clock import utcnow
from outbox._dialects import dialect_for
from outbox._errors import MessageNotFound
from outbox._key_queue import KeyQueue
from outbox._schema import (
    DEFAULT_TABLE,
    KEY_FINISHED,
    KEY_HOLDING,
    LATENCY_BUCKETS_MS,
    REPLAYABLE,
    Status,
    status_in,
    tables_for,
)
from outbox._serialization import decode_headers
from outbox._wakeup import notify_channel
from outbox.admin._reports import (
    Activity,
    AuditRecord,
    DeadLetterReplay,
    HeldKey,
    MessageFilter,
    MessageRecord,
    PurgeResult,
    RelayRecord,
    ReplayResult,
    StatusReport,
    expand_statuses,
)

#: statuses of messages that still wait for delivery (their age is the backlog's age)
WAITING = (Status.PENDING, Status.INFLIGHT, Status.FAILED)
#: every status but delivered: the rows PostgreSQL's status index holds
NOT_DELIVERED = tuple(s for s in Status if s is not Status.DELIVERED)
#: ``status(exact=False)``: delivered messages counted exactly up to this many, estimated beyond
EXACT_DELIVERED = 100_000
#: ``status(exact=False)`` and the dashboard's dry runs: other counts stop past this many
COUNT_CAP = 10_000
#: statuses ``purge`` may delete, and the column whose age decides
PURGEABLE = {Status.DELIVERED: "delivered_at", Status.DEAD: "created_at", Status.PARKED: "created_at"}

if TYPE_CHECKING:
    from consumers._dead_letters import DeadLetter
    from outbox._runtime.kafka_settings import KafkaConnection

Order = Literal["asc", "desc"]
#: a message as an operator names it: its id, or its ``seq`` (the first column of ``outbox list``)
MessageRef = uuid.UUID | int


class Operations:
    """Every query the operator commands run, for one outbox table."""

    def __init__(self, engine: sa.Engine, table: str = DEFAULT_TABLE) -> None:
        self.engine = engine
        self.tables = tables_for(table)
        self.t = self.tables.messages
        self._key_queue = KeyQueue(self.tables)  # purging a parked message promotes its key
        self._wakes_relays = dialect_for(engine).listen_notify

    # -- reading ------------------------------------------------------------------------------------------

    def status(self, *, now: dt.datetime | None = None, exact: bool = True) -> StatusReport:
        """Counts per status and per topic, the backlog's age, parked keys, due and expired work.

        ``exact=False`` (the dashboard's overview) bounds every query, whatever the table's size: the
        messages not delivered are counted exactly (the status index holds them: on PostgreSQL it holds
        nothing else), the delivered ones up to :data:`EXACT_DELIVERED` and beyond that estimated from
        the database's statistics (``StatusReport.estimated``: PostgreSQL's ``reltuples``, MariaDB's
        ``TABLE_ROWS``; per topic they are then not given); due and expired messages are counted up to
        :data:`COUNT_CAP` (``count_cap``).
        """
        t = self.t
        now = now or utcnow()
        counts = {s.value: 0 for s in Status}
        topics: dict[str, dict[str, int]] = {}
        waiting = (Status.PENDING, Status.FAILED)
        estimated = False
        cap = None if exact else COUNT_CAP
        with self.engine.connect() as conn:
            grouped = sa.select(t.c.status, t.c.topic, sa.func.count()).group_by(t.c.status, t.c.topic)
            if not exact:
                grouped = grouped.where(status_in(t.c.status, NOT_DELIVERED))
            for status, topic, n in conn.execute(grouped):
                counts[status] = counts.get(status, 0) + n
                topics.setdefault(topic, {})[status] = n
            if not exact:
                delivered = _count(
                    conn, sa.select(t.c.seq).where(t.c.status == Status.DELIVERED.value), EXACT_DELIVERED
                )
                if delivered > EXACT_DELIVERED:
                    rows = self._estimated_rows(conn)
                    if rows is not None:
                        estimated = True
                        delivered = max(rows - sum(counts.values()), delivered)
                    else:  # SQLite: no statistics, and a count of its rows is quick enough
                        delivered = _count(
                            conn, sa.select(t.c.seq).where(t.c.status == Status.DELIVERED.value)
                        )
                counts[Status.DELIVERED.value] = delivered
            oldest = conn.execute(self._oldest_waiting(exact)).scalar()
            parked_keys = conn.execute(
                sa.select(sa.func.count(sa.distinct(t.c.msg_key))).where(t.c.status == Status.PARKED.value)
            ).scalar_one()
            due = _count(conn, sa.select(t.c.seq).where(_in(t.c.status, waiting), t.c.due_at <= now), cap)
            expired = _count(
                conn, sa.select(t.c.seq).where(t.c.status == Status.INFLIGHT.value, t.c.due_at < now), cap
            )
        return StatusReport(
            now=now,
            counts=counts,
            topics=dict(sorted(topics.items())),
            oldest_waiting_at=oldest,
            parked_keys=int(parked_keys),
            due_now=due,
            expired_leases=expired,
            relays=tuple(self.relays(now=now)),
            estimated=estimated,
            count_cap=cap,
        )

    def _oldest_waiting(self, exact: bool) -> sa.Select[Any]:
        t = self.t
        if exact or self.engine.dialect.name == "postgresql":
            # PostgreSQL: the status index finds the waiting rows, their created_at is read from each
            return sa.select(sa.func.min(t.c.created_at)).where(_in(t.c.status, WAITING))
        # InnoDB's (and SQLite's) status index ends with the seq: its smallest among the waiting rows
        # is read from the index alone, then one row (seq follows created_at, to the writers' clocks)
        first = sa.select(sa.func.min(t.c.seq)).where(_in(t.c.status, WAITING)).scalar_subquery()
        return sa.select(t.c.created_at).where(t.c.seq == first)

    def _estimated_rows(self, conn: sa.Connection) -> int | None:
        """The database's estimate of the outbox table's rows; None where it has none (SQLite)."""
        name = self.tables.name
        if conn.dialect.name == "postgresql":
            found = conn.execute(
                sa.text("SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(:name)"),
                {"name": name},
            ).scalar()
            return int(found) if found is not None and found >= 0 else None
        if conn.dialect.name in ("mysql", "mariadb"):
            found = conn.execute(
                sa.text(
                    "SELECT table_rows FROM information_schema.tables"
                    " WHERE table_schema = DATABASE() AND table_name = :name"
                ),
                {"name": name},
            ).scalar()
            return None if found is None else int(found)
        return None

    def max_seq(self) -> int:
        """The newest message's seq (0 for an empty table): read from the primary key's end."""
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.max(self.t.c.seq))).scalar() or 0)

    # -- relays, activity, audit ----------------------------------------------------------------------------

    def relays(
        self, *, now: dt.datetime | None = None, within: dt.timedelta = dt.timedelta(days=1)
    ) -> list[RelayRecord]:
        """The relays whose last heartbeat is within ``within``: alive ones first (latest start first),
        then the others (latest seen first). Alive: seen within ``ALIVE_WITHIN`` seconds, not stopped."""
        now = now or utcnow()
        r = self.tables.relays
        alive_after = now - dt.timedelta(seconds=defaults.ALIVE_WITHIN)
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(r).where(r.c.seen_at >= now - within).order_by(r.c.seen_at.desc()).limit(100)
            ).all()
        found = [
            RelayRecord(
                relay_id=row.relay_id,
                host=row.host,
                pid=row.pid,
                version=row.version,
                routes=row.routes,
                started_at=row.started_at,
                seen_at=row.seen_at,
                progress_at=row.progress_at,
                stopped_at=row.stopped_at,
                delivered=int(row.delivered),
                failed=int(row.failed),
                dead=int(row.dead),
                alive=row.stopped_at is None and row.seen_at >= alive_after,
            )
            for row in rows
        ]
        alive = sorted((f for f in found if f.alive), key=lambda f: f.started_at, reverse=True)
        return alive + [f for f in found if not f.alive]

    def activity(
        self, *, window: dt.timedelta, step: dt.timedelta, now: dt.datetime | None = None
    ) -> Activity:
        """What every relay did over the last ``window``, summed per ``step`` (whole minutes, aligned: the
        last step is the one now is in), from their per-minute rows: at most one row a minute per relay."""
        step = max(dt.timedelta(minutes=1), step)
        count = max(1, int(window // step))
        epoch = dt.datetime(2000, 1, 1)
        last = epoch + ((now or utcnow()) - epoch) // step * step  # the step now is in, from its start
        first = last - (count - 1) * step
        st = self.tables.stats
        sums = [[0, 0, 0] for _ in range(count)]
        latency = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(st.c.minute, st.c.delivered, st.c.failed, st.c.dead, st.c.latency).where(
                    st.c.minute >= first
                )
            )
            for minute, delivered, failed, dead, buckets in rows:
                index = (minute - first) // step
                if not 0 <= index < count:
                    continue
                sums[index][0] += delivered
                sums[index][1] += failed
                sums[index][2] += dead
                for i, n in enumerate(json.loads(buckets)[: len(latency)]):
                    latency[i] += int(n)
        return Activity(
            since=first,
            step=step,
            buckets=tuple((first + i * step, sums[i][0], sums[i][1], sums[i][2]) for i in range(count)),
            bounds_ms=LATENCY_BUCKETS_MS,
            latency=tuple(latency),
        )

    def audit_log(self, *, limit: int = 20) -> list[AuditRecord]:
        """The last ``limit`` actions run from the web dashboard, newest first."""
        a = self.tables.audit
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(a).order_by(a.c.seq.desc()).limit(limit)).all()
        return [
            AuditRecord(r.seq, r.at, r.who, r.client, r.action, r.target, int(r._mapping["count"]))
            for r in rows
        ]

    # -- dead letters of `outbox consume` -------------------------------------------------------------------

    def dead_letter_groups(self) -> dict[str, tuple[int, int]]:
        """``{consumer group: (dead letters, of which never replayed)}``."""
        t = self.tables.dead_letters
        never = sa.func.sum(sa.case((t.c.replayed_at.is_(None), 1), else_=0))
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t.c.consumer_group, sa.func.count(), never).group_by(t.c.consumer_group)
            ).all()
        return {group: (int(n), int(pending or 0)) for group, n, pending in sorted(rows)}

    def dead_letters(
        self,
        *,
        group: str | None = None,
        pending: bool = False,
        limit: int = 100,
        after: int | None = None,
        seqs: Sequence[int] = (),
    ) -> list[DeadLetter]:
        """Dead letters oldest first (``after``: the last seq of the previous page), of one ``group``,
        only those never replayed (``pending``), or named by seq."""
        from consumers._dead_letters import DeadLetters

        with self.engine.connect() as conn:
            return DeadLetters(self.tables).find(
                conn, group=group, include_replayed=not pending, limit=limit, seqs=seqs, after=after
            )

    def dead_letter(self, seq: int) -> DeadLetter:
        """One dead letter; :class:`MessageNotFound` if there is none with ``seq``."""
        found = self.dead_letters(seqs=[seq], limit=1)
        if not found:
            raise MessageNotFound(f"no dead letter with seq {seq}")
        return found[0]

    def replay_dead_letters(
        self,
        connection: KafkaConnection | None,
        *,
        seqs: Sequence[int] = (),
        group: str | None = None,
        everything: bool = False,
        up_to: int | None = None,
        dry_run: bool = False,
    ) -> DeadLetterReplay:
        """Send dead letters back to their Kafka topic (``outbox dlq replay``), then mark them replayed.

        ``seqs`` (replayed again even if they were before: :class:`MessageNotFound` for one that does not
        exist), or those never replayed of ``group`` or of every group (``everything``), up to seq
        ``up_to``. A dry run selects the same letters and sends nothing (``connection`` may be None).
        """
        from consumers._dead_letters import DeadLetters, republish

        if bool(seqs) == bool(group or everything):
            raise ValueError("give seqs, or a group or everything, not both or neither")
        letters = DeadLetters(self.tables)
        with self.engine.connect() as conn:
            if seqs:
                chosen = letters.find(conn, seqs=seqs)
                missing = sorted(set(seqs) - {letter.seq for letter in chosen})
                if missing:
                    raise MessageNotFound(f"no dead letter with seq {', '.join(map(str, missing))}")
            else:
                chosen = letters.find(conn, group=group, include_replayed=False, up_to=up_to)
        if dry_run or not chosen:
            return DeadLetterReplay(tuple(chosen), (), dry_run=dry_run)
        if connection is None:
            raise ValueError("replaying dead letters needs a Kafka connection")
        sent, failed = republish(chosen, connection)
        if sent:
            with self.engine.begin() as conn:
                letters.mark_replayed(conn, [letter.seq for letter in sent], at=utcnow())
        return DeadLetterReplay(tuple(sent), tuple(failed))

    def record_audit(self, *, who: str, client: str, action: str, target: str, count: int) -> None:
        """Keep one action of the web dashboard in the audit table."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(self.tables.audit).values(
                    at=utcnow(),
                    who=who[:255],
                    client=client[:255],
                    action=action[:32],
                    target=target,
                    count=count,
                )
            )

    def list_messages(
        self,
        where: MessageFilter | None = None,
        *,
        limit: int = 50,
        after: int | None = None,
        order: Order = "desc",
    ) -> list[MessageRecord]:
        """Messages matching ``where``, ``limit`` at a time, newest (``desc``) or oldest first.

        Page with ``after``: the ``seq`` of the last message of the previous page (keyset paging, so
        pages stay cheap and stable while messages are added).
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        t = self.t
        where = where or MessageFilter()
        newest_first = order != "asc"
        bound = [] if after is None else [t.c.seq < after if newest_first else t.c.seq > after]
        by_seq = t.c.seq.desc() if newest_first else t.c.seq.asc()
        if where.key is not None and self.engine.dialect.name == "postgresql":
            query = self._of_key(where, bound, newest_first, limit)
        else:
            query = (
                sa.select(*self._columns(payload=False))
                .where(*where.conditions(t), *bound)
                .order_by(by_seq)
                .limit(limit)
            )
        with self.engine.connect() as conn:
            return [self._record(row) for row in conn.execute(query)]

    def _of_key(
        self, where: MessageFilter, bound: list[sa.ColumnElement[bool]], newest_first: bool, limit: int
    ) -> sa.Select[Any]:
        """PostgreSQL: one key's messages from its two partial indexes, each read in seq order up to
        ``limit`` (ix_<name>_key: the rows holding the key; ix_<name>_key_done: delivered and dead ones),
        merged: a page of a key costs two short index ranges, however many messages the table has."""
        t = self.t
        wanted = expand_statuses(where.statuses) if where.statuses else tuple(Status)
        rest = dataclasses.replace(where, statuses=()).conditions(t)
        by_seq = t.c.seq.desc() if newest_first else t.c.seq.asc()
        branches = [
            sa.select(*self._columns(payload=False))
            .where(*rest, *bound, status_in(t.c.status, part))
            .order_by(by_seq)
            .limit(limit)
            for part in (
                [s for s in wanted if s in KEY_HOLDING],
                [s for s in wanted if s in KEY_FINISHED],
            )
            if part
        ]
        merged = sa.union_all(*branches).subquery()
        return (
            sa.select(merged)
            .order_by(merged.c.seq.desc() if newest_first else merged.c.seq.asc())
            .limit(limit)
        )

    def get(self, message: MessageRef) -> MessageRecord:
        """Everything about one message (by id or seq), payload included; :class:`MessageNotFound` if
        there is none."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(*self._columns(payload=True)).where(self._named([message]))).first()
        if row is None:
            name = self.tables.name
            raise MessageNotFound(f"no message with {_ref_text(message)} in outbox table {name!r}")
        return self._record(row)

    def count(self, where: MessageFilter | None = None, *, cap: int | None = None) -> int:
        """How many messages match ``where``; with ``cap``, counting stops past ``cap`` (``cap + 1``
        means "more than ``cap``"), so that the answer's cost is bounded."""
        t = self.t
        with self.engine.connect() as conn:
            return _count(conn, sa.select(t.c.seq).where(*(where or MessageFilter()).conditions(t)), cap)

    def held_keys(self, *, limit: int = 100, waiting_cap: int = 10_000) -> list[HeldKey]:
        """The keys held by a failed or parked message, oldest head first, at most ``limit`` of them.

        A failed or parked keyed message is always its key's first unfinished one (nothing later of its
        key is claimed before it is done), so each such row is the head of a held key. For each, the
        pending messages of its key behind it are counted, up to ``waiting_cap``.
        """
        t = self.t
        holding = (Status.FAILED, Status.PARKED)
        heads = (
            sa.select(*self._columns(payload=False))
            .where(status_in(t.c.status, holding), t.c.msg_key.is_not(None))
            .order_by(t.c.seq)
            .limit(limit)
        )
        behind = sa.select(sa.func.count()).select_from(
            sa.select(t.c.seq)
            .where(
                t.c.msg_key == sa.bindparam("key"),
                status_in(t.c.status, (Status.PENDING,)),
                t.c.seq > sa.bindparam("seq"),
            )
            .limit(waiting_cap + 1)
            .subquery()
        )
        found: list[HeldKey] = []
        with self.engine.connect() as conn:
            for row in conn.execute(heads).all():
                head = self._record(row)
                assert head.key is not None
                waiting = int(conn.execute(behind, {"key": head.key, "seq": head.seq}).scalar_one())
                found.append(
                    HeldKey(head.key, head, min(waiting, waiting_cap), waiting_capped=waiting > waiting_cap)
                )
        return found

    def _named(self, refs: Sequence[MessageRef]) -> sa.ColumnElement[bool]:
        """The rows ``refs`` name: ids (``uuid.UUID``) and seqs (``int``) may be mixed."""
        ids = [r for r in refs if isinstance(r, uuid.UUID)]
        seqs = [r for r in refs if not isinstance(r, uuid.UUID)]
        t = self.t
        if not seqs:
            return t.c.id.in_(ids) if len(ids) != 1 else t.c.id == ids[0]
        if not ids:
            return t.c.seq.in_(seqs) if len(seqs) != 1 else t.c.seq == seqs[0]
        return sa.or_(t.c.id.in_(ids), t.c.seq.in_(seqs))

    # -- replay -------------------------------------------------------------------------------------------

    def replay_ids(
        self,
        ids: Sequence[MessageRef],
        *,
        include_delivered: bool = False,
        dry_run: bool = False,
        now: dt.datetime | None = None,
    ) -> ReplayResult:
        """Send the named messages (by id or seq) back to pending (see :meth:`replay_matching` for what
        that means).

        All or nothing about existence: an unknown id or seq raises :class:`MessageNotFound` and changes
        nothing. Named messages that are not replayable (pending, inflight, or delivered without
        ``include_delivered``) are left alone and reported in ``skipped``.
        """
        allowed = self._replayable(include_delivered)
        t = self.t
        wanted = list(dict.fromkeys(ids))
        with self.engine.begin() as conn:
            named = sa.select(t.c.seq, t.c.id, t.c.status).where(self._named(wanted)).order_by(t.c.seq)
            rows = conn.execute(named if dry_run else named.with_for_update()).all()  # a dry run locks none
            found = {row.id for row in rows} | {row.seq for row in rows}
            missing = [ref for ref in wanted if ref not in found]
            if missing:
                shown = ", ".join(_ref_text(r) for r in missing[:3]) + (" ..." if len(missing) > 3 else "")
                raise MessageNotFound(f"no message with {shown} in outbox table {self.tables.name!r}")
            eligible = [row for row in rows if row.status in allowed]
            skipped = tuple((row.id, str(row.status)) for row in rows if row.status not in allowed)
            replayed = [row.id for row in eligible]
            if not dry_run and eligible:
                replayed = self._send_back(conn, [row.seq for row in eligible], allowed, now or utcnow())
        return ReplayResult(replayed=tuple(replayed), skipped=skipped, dry_run=dry_run)

    def replay_matching(
        self,
        where: MessageFilter,
        *,
        include_delivered: bool = False,
        dry_run: bool = False,
        batch_size: int = 1000,
        now: dt.datetime | None = None,
    ) -> ReplayResult:
        """Send every message matching ``where`` back to pending, ``batch_size`` per transaction.

        ``where.statuses`` defaults to dead (dead and parked); each must be replayable (failed, dead,
        parked; delivered only with ``include_delivered``), else ``ValueError``.

        A replayed message is pending, due now, with ``attempts`` 0 and no lease: the relay handles it
        as if it were new, with its full retry budget. Its ``last_error`` is cleared too: the row then
        describes its current life only (an error next to ``attempts = 0``, or on a message delivered
        after the replay, would mislead whoever reads ``outbox show``); the error is in the relay's
        logs, and ``outbox show`` before a replay shows it.
        """
        allowed = self._replayable(include_delivered)
        statuses = expand_statuses(where.statuses or (Status.DEAD,))
        refused = [s.value for s in statuses if s.value not in allowed]
        if refused:
            raise ValueError(
                f"cannot replay {', '.join(refused)} messages: replayable are {', '.join(allowed)}"
                + ("" if include_delivered else " (delivered only with include_delivered)")
            )
        where = dataclasses.replace(where, statuses=statuses)
        t = self.t
        replayed: list[uuid.UUID] = []
        last_seq: int | None = None
        while True:
            conditions = where.conditions(t)
            if last_seq is not None:
                conditions.append(t.c.seq > last_seq)
            query = sa.select(t.c.seq, t.c.id).where(*conditions).order_by(t.c.seq).limit(batch_size)
            with self.engine.begin() as conn:
                rows = conn.execute(query if dry_run else query.with_for_update()).all()
                if not rows:
                    break
                last_seq = rows[-1].seq
                if dry_run:
                    replayed.extend(row.id for row in rows)
                else:
                    chosen = [s.value for s in statuses]
                    replayed.extend(self._send_back(conn, [row.seq for row in rows], chosen, now or utcnow()))
            if len(rows) < batch_size:
                break
        return ReplayResult(replayed=tuple(replayed), dry_run=dry_run)

    def _replayable(self, include_delivered: bool) -> list[str]:
        return [s.value for s in REPLAYABLE] + ([Status.DELIVERED.value] if include_delivered else [])

    def _send_back(
        self, conn: sa.Connection, seqs: list[int], allowed: Sequence[str], now: dt.datetime
    ) -> list[uuid.UUID]:
        """Make rows ``seqs`` pending again if their status is still in ``allowed``; return their ids."""
        t = self.t
        conn.execute(
            sa.update(t)
            .where(t.c.seq.in_(seqs), t.c.status.in_(allowed))
            .values(
                status=Status.PENDING.value,
                due_at=now,
                attempts=0,
                lease_token=None,
                last_error=None,
                delivered_at=None,
            )
        )
        # Read back what this transaction changed (the UPDATE holds those rows' locks), rather than trust
        # the earlier SELECT: on SQLite another writer may have committed in between.
        done = conn.execute(
            sa.select(t.c.id)
            .where(
                t.c.seq.in_(seqs), t.c.status == Status.PENDING.value, t.c.due_at == now, t.c.attempts == 0
            )
            .order_by(t.c.seq)
        )
        ids = list(done.scalars())
        if ids and self._wakes_relays:
            conn.execute(
                sa.text("SELECT pg_notify(:channel, '')"), {"channel": notify_channel(self.tables.name)}
            )
        return ids

    # -- purge --------------------------------------------------------------------------------------------

    def purge(
        self,
        *,
        older_than: dt.timedelta,
        status: Status = Status.DELIVERED,
        dry_run: bool = False,
        batch_size: int = 5000,
        now: dt.datetime | None = None,
    ) -> PurgeResult:
        """Delete finished messages older than ``older_than``, ``batch_size`` rows per transaction.

        ``status`` is ``delivered`` (aged by ``delivered_at``), ``dead`` (dead and parked, aged by
        ``created_at``) or ``parked``. Anything else raises ``ValueError``: pending, inflight and
        failed messages are never deleted. Purging a parked message releases the messages of its key.
        """
        statuses = expand_statuses([status])
        if any(s not in PURGEABLE for s in statuses):
            raise ValueError(
                f"cannot purge {Status(status).value} messages: only delivered, dead or parked ones"
            )
        if older_than < dt.timedelta(0):
            raise ValueError("older_than must not be negative")
        cutoff = (now or utcnow()) - older_than
        t = self.t
        age = t.c[PURGEABLE[statuses[0]]]
        conditions = [t.c.status.in_([s.value for s in statuses]), age < cutoff]
        return self._purge(conditions, statuses, cutoff, dry_run=dry_run, batch_size=batch_size)

    def purge_matching(
        self,
        where: MessageFilter,
        *,
        refs: Sequence[MessageRef] | None = None,
        dry_run: bool = False,
        batch_size: int = 5000,
        now: dt.datetime | None = None,
    ) -> PurgeResult:
        """Delete the finished messages matching ``where`` (and, with ``refs``, named by id or seq),
        whatever their age, ``batch_size`` rows per transaction.

        ``where.statuses`` defaults to dead (dead and parked); each must be delivered, dead or parked,
        else ``ValueError``: the DELETE re-checks the status, so a message that a replay sent back in
        the meantime is never deleted. Purging a parked message releases the messages of its key.
        """
        statuses = expand_statuses(where.statuses or (Status.DEAD,))
        refused = [s.value for s in statuses if s not in PURGEABLE]
        if refused:
            raise ValueError(
                f"cannot purge {', '.join(refused)} messages: only delivered, dead or parked ones"
            )
        conditions = dataclasses.replace(where, statuses=statuses).conditions(self.t)
        if refs is not None:
            conditions.append(self._named(list(dict.fromkeys(refs))) if refs else sa.false())
        cutoff = now or utcnow()
        return self._purge(conditions, statuses, cutoff, dry_run=dry_run, batch_size=batch_size)

    def _purge(
        self,
        conditions: list[sa.ColumnElement[bool]],
        statuses: tuple[Status, ...],
        cutoff: dt.datetime,
        *,
        dry_run: bool,
        batch_size: int,
    ) -> PurgeResult:
        """Purge's last step, by age or by filter: count the rows meeting ``conditions`` (a dry run),
        or delete them in batches."""
        if dry_run:
            with self.engine.connect() as conn:
                count = conn.execute(sa.select(sa.func.count()).where(*conditions)).scalar_one()
            return PurgeResult(count=int(count), statuses=statuses, cutoff=cutoff, dry_run=True)
        deleted, batches = self._delete(conditions, batch_size)
        return PurgeResult(count=deleted, statuses=statuses, cutoff=cutoff, batches=batches)

    def _delete(self, conditions: list[sa.ColumnElement[bool]], batch_size: int) -> tuple[int, int]:
        """Delete the rows meeting ``conditions`` in batches of ``batch_size`` by seq, one transaction
        each (the DELETE re-checks them); release the keys of parked rows deleted. (deleted, batches)."""
        t = self.t
        deleted = batches = 0
        while True:
            with self.engine.begin() as conn:
                seqs = list(
                    conn.execute(
                        sa.select(t.c.seq)
                        .where(*conditions)
                        .order_by(t.c.seq)
                        .limit(batch_size)
                        .with_for_update()
                    ).scalars()
                )
                if seqs:
                    # a parked row held its key: the key's queued rows come back (outbox._key_queue)
                    keys = set(
                        conn.execute(
                            sa.select(t.c.msg_key).where(
                                t.c.seq.in_(seqs), t.c.status == Status.PARKED.value, t.c.msg_key.is_not(None)
                            )
                        ).scalars()
                    )
                    deleted += conn.execute(sa.delete(t).where(t.c.seq.in_(seqs), *conditions)).rowcount
                    if keys:
                        self._key_queue.promote_keys(conn, sorted(keys), now=utcnow())
                    batches += 1
            if len(seqs) < batch_size:
                break
        return deleted, batches

    def purge_inbox(
        self,
        *,
        older_than: dt.timedelta,
        dry_run: bool = False,
        batch_size: int = 5000,
        now: dt.datetime | None = None,
    ) -> PurgeResult:
        """Delete the consumer groups' inbox rows processed more than ``older_than`` ago, in batches.

        What the relays' retention does by itself, for consumers that run without relays. A message
        Kafka delivers again after its row is gone is handled again: see ``docs/guarantees.md``.
        """
        if older_than < dt.timedelta(0):
            raise ValueError("older_than must not be negative")
        cutoff = (now or utcnow()) - older_than
        if dry_run:
            old = self.tables.inbox.c.processed_at < cutoff
            with self.engine.connect() as conn:
                count = conn.execute(sa.select(sa.func.count()).where(old)).scalar_one()
            return PurgeResult(count=int(count), statuses=(), cutoff=cutoff, dry_run=True, inbox=True)
        # here, not at module level: the commands other than relay, consume and dlq never load `consumers`
        from consumers._inbox import delete_old_inbox_rows

        deleted = batches = 0
        while True:
            with self.engine.begin() as conn:
                found, gone = delete_old_inbox_rows(conn, self.tables, cutoff, batch_size)
            deleted += gone
            batches += 1 if found else 0
            if found < batch_size:
                break
        return PurgeResult(count=deleted, statuses=(), cutoff=cutoff, batches=batches, inbox=True)

    # -- rows -----------------------------------------------------------------------------------------------

    def _columns(self, *, payload: bool) -> list[sa.ColumnElement[Any]]:
        t = self.t
        columns: list[sa.ColumnElement[Any]] = [c for c in t.c if c.name != "payload"]
        columns.append(sa.func.length(t.c.payload).label("payload_size"))
        if payload:
            columns.append(t.c.payload)
        return columns

    def _record(self, row: sa.Row[Any]) -> MessageRecord:
        m = row._mapping
        payload = m.get("payload")
        return MessageRecord(
            seq=m["seq"],
            id=m["id"],
            topic=m["topic"],
            key=m["msg_key"],
            status=m["status"],
            attempts=m["attempts"],
            due_at=m["due_at"],
            lease_token=m["lease_token"],
            created_at=m["created_at"],
            last_attempt_at=m["last_attempt_at"],
            delivered_at=m["delivered_at"],
            last_error=m["last_error"],
            content_type=m["content_type"],
            headers=decode_headers(m["headers"]),
            payload_size=int(m["payload_size"] or 0),
            payload=bytes(payload) if payload is not None else None,
        )


def _count(conn: sa.Connection, matching: sa.Select[Any], cap: int | None = None) -> int:
    """How many rows ``matching`` selects; with ``cap``, counting stops at ``cap + 1`` (more than it)."""
    if cap is not None:
        matching = matching.limit(cap + 1)
    return int(conn.execute(sa.select(sa.func.count()).select_from(matching.subquery())).scalar_one())


def _ref_text(ref: MessageRef) -> str:
    return f"id {ref}" if isinstance(ref, uuid.UUID) else f"seq {ref}"


def _in(column: sa.Column[Any], statuses: Iterable[Status]) -> sa.ColumnElement[bool]:
    return column.in_([s.value for s in statuses])


__all__ = [
    "MessageFilter",
    "MessageRecord",
    "Operations",
    "PurgeResult",
    "ReplayResult",
    "StatusReport",
]
