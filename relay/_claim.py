"""Claim, lease and fence: the queries that decide who handles which message.

A relay takes work in batches. A claim is one short transaction: it **scans** up to N due rows
(``due_at <= now``, in ``due_at, seq`` order, locked with ``FOR UPDATE SKIP LOCKED``), each with the
nearest earlier row of its key that still holds the key; it **takes** the rows it may deliver, marking
them ``inflight`` under a fresh lease (a random token and an expiry kept in ``due_at``); and it
**queues** the keyed rows it finds blocked behind an earlier row it does not hold (their ``due_at``
becomes NULL: they leave the scan's index). Everything the relay later writes about its rows
(delivered, failed, dead, released, renewed) carries the token.

**Runs.** For a key whose head is due, the claim takes the head and the key's rows that follow it in the
scan, consecutive in ``seq`` order, up to ``run_length`` (1,024): a run, delivered in order under one
lease (``relay._dispatch``). A key's queued rows come back to the scan by **promotion**: once a run's
last row is delivered (or a row of the key is dead), the completer sets ``due_at`` on the key's next
``run_length`` pending rows, if nothing earlier holds the key. A deep key thus costs each claim what it
returns: its rows are read by the scan about twice (found blocked once, taken once), never once per
claim. A relay that drains a hot key **chains** its runs (invariant 12): a claim takes (pulls) the key's
next run behind the relay's own run still in flight, so the key goes on with no pause between runs.

Invariants (each names the test that would catch its violation):

1. **A row is handled by at most one live lease.** The scan locks its rows (``FOR UPDATE SKIP LOCKED``
   on PostgreSQL and MariaDB; SQLite allows one relay, see ``relay._single_relay``) and re-checks
   ``due_at <= now`` on the locked version, so two relays never both claim a row whose lease is live.
   -- ``tests/test_concurrency.py::test_three_relays_deliver_each_once``,
   ``tests/test_claim.py::test_concurrent_claims_never_overlap``
2. **A mark without the current token changes nothing.** Every UPDATE after the claim has
   ``WHERE lease_token = :token``; a reclaim replaces the token, so a relay that stalled past its lease
   (fenced) cannot mark, fail or release rows it no longer holds; a handler's session work is rolled
   back when its delivered mark finds no row. -- ``tests/test_claim.py::test_expired_lease_is_fenced``
3. **For one key, a row is taken only when every earlier row of that key is delivered or dead, or taken
   by the same claim before it** (a dead row of a strict-order topic is ``parked`` and holds the key).
   The scan reads, for each keyed row, the nearest earlier row holding the key; the row is taken when
   there is none, or when that row is taken by this claim (a run); a claim that could not lock a key's
   earlier rows (another claim holds them) takes none of the later ones. So messages of one key are
   handled one run at a time, in ``seq`` order, and a failing message holds back only its own key.
   -- ``tests/test_handlers.py::test_order_per_key_with_failures``,
   ``tests/test_claim.py::test_two_claims_at_once_never_split_a_key``,
   ``tests/test_runs.py``
4. **A lease that is not renewed expires, and the row comes back by itself.** ``due_at`` of an
   inflight row is its lease expiry; the scan takes any row whose ``due_at`` has passed, whatever its
   status, so a crashed relay's rows (a whole run) are reclaimed with no sweeper, in order; the claim
   marks those rows ``ClaimedRow.reclaimed`` (their status was still inflight), which the metrics count.
   -- ``tests/test_crash.py``, ``tests/test_metrics.py::test_reclaimed_leases_are_counted``
5. **No committed message is skipped.** A row leaves the scan only by being delivered, dead or parked
   (each written under a live token) or queued behind an earlier row of its key that holds the key
   (invariant 9 brings it back). -- ``tests/test_crash.py::test_killed_relay_loses_nothing``
6. **A release counts no attempt.** A release (graceful stop, database outage around a handler, the
   rest of a run after a failure) leaves ``attempts`` as it was, so infrastructure trouble never pushes
   a message towards ``dead``. -- ``tests/test_stop.py``, ``tests/test_db_restart.py``,
   ``tests/test_runs.py::test_failure_inside_a_run_releases_the_rest_without_an_attempt``
7. **A relay frozen at any instant keeps no other relay from its expired rows.** A process can stop
   between two statements for any length of time (a GC pause, a VM freeze, ``SIGSTOP``); a row lock it
   holds lasts as long, and every other claim skips the row (``SKIP LOCKED``). So, on PostgreSQL and
   MariaDB, each write of the lease path (renewal, delivered, failed, released marks, promotion) is
   one statement run in autocommit: committed by the server when it has run, whatever the client does
   next. Two transactions remain, both short: the claim (scan, queue, take: a relay frozen inside it
   holds the rows it scanned, until it runs again or its connection dies), and a session handler's
   transaction, which must hold the delivered mark with the handler's own writes. On MariaDB a plain
   read looks first unless the last claim came back full, so an idle relay's claims (one every poll
   interval: where a freeze lands) take no lock; only the claim that ends a backlog can find nothing
   under a lock. The maintenance lease (:mod:`relay.maintenance`, a row of ``<table>_locks``) is
   written in autocommit too, so a relay frozen right after taking it does not keep the others from it.
   -- ``tests/test_crash.py::test_relay_frozen_mid_write_holds_no_row``,
   ``tests/test_crash.py::test_relay_frozen_taking_the_maintenance_lease_holds_no_lock``
8. **A claim's cost follows what it returns, not the depth of a key.** The scan reads due rows only;
   each keyed row costs one index probe to find its nearest earlier holding row on PostgreSQL (the
   partial index of holding rows, ``(msg_key, seq)``), one per holding status elsewhere (a probe reads
   one index entry, whatever the planner's statistics say of each status); a blocked row is queued
   by the claim that finds it, so the rows behind a held or busy key are read once, not by every
   claim. A key with many rows blocked in one scan (``DEEP_BLOCKED``) by a failed or parked row has
   its next due rows queued with them (``QUEUE_AHEAD``, locked first, skipping any locked right now):
   a deep key held back leaves the scan in a few claims instead of taking a share of each. MariaDB
   runs a correlated probe as a read of every row of the key (a ``ref`` on
   ``(msg_key, status)``), so there the probes follow the scan: with constants for a key with several
   rows scanned (one index entry a status, and a count of the key's holding rows between its first
   and last scanned rows: the rows themselves are read only when others hold the key among them),
   correlated for the others, each told to read the key's index (``FORCE INDEX``: as its statistics
   stand, MariaDB may read a probe through the status index or the primary key, the whole table), as
   the promotion's probes of a key's first rows are (``KeyQueue._heads``).
   -- ``tests/test_claim.py::test_rows_behind_a_run_leave_the_scan_and_come_back_a_run_at_a_time``,
   ``tests/test_claim.py::test_a_deep_key_held_by_a_parked_row_leaves_the_scan_ahead_of_it``,
   ``tests/test_claim.py::test_a_deep_scan_of_one_key_finds_every_row_holding_it_between_and_before``,
   ``bench/keys.py`` (claim time with 1,000,000 rows behind one key)
9. **A queued row is promoted once nothing earlier holds its key.** The claim that queues rows locks
   their blockers (the earlier rows holding the key that it does not hold) for share, skipping any
   locked right now, and queues only the rows whose blockers it locked and found still holding. A
   blocker therefore stops holding the key only after that claim committed, and every way a keyed row
   stops holding its key is followed by a promotion of the key (a run's last row delivered, a row
   dead: the completer; a parked row purged: ``outbox purge``; and the maintenance thread's
   sweep as a safety net).
   -- ``tests/test_claim.py::test_promotion_waits_while_anything_earlier_holds_the_key``,
   ``tests/test_claim.py::test_a_row_queued_while_its_blocker_finishes_is_promoted``,
   ``tests/test_runs.py::test_purging_a_parked_message_lets_its_queued_key_go_on``

10. **An attempt is counted only for a message that started.** The claim counts nothing; the outcome's
    mark counts the attempt (delivered: ``attempts + 1``; failed, dead, parked: the attempt's number),
    so the messages of a relay killed mid-batch lose nothing for having been claimed with the one that
    killed it. A message taken back from an expired lease (``reclaimed``) may be the one that killed
    its relay: those are run one at a time, relay-wide, each after a durable start mark
    (:meth:`ClaimQueries.mark_started`, committed before it starts), so only the one running when a
    relay dies is counted, and past ``max_attempts + CRASH_ALLOWANCE`` it is dead, "abandoned", with an
    error saying it kept killing relays (``relay._dispatch``). The normal path pays nothing.
    -- ``tests/test_poison_crash.py``,
    ``tests/test_handlers.py::test_message_that_keeps_killing_relays_goes_dead``
11. **A claim is bounded by bytes as well as by count.** The scan reads each row's payload size (not the
    payload); with ``max_bytes`` the claim takes rows in scan order until their payloads reach it (one
    row at least, so a message larger than the bound still goes), and a keyed row left out leaves out
    every later row of its key: a run is cut, never holed. The relay passes the room left in its
    ``max_in_flight_bytes``, so its memory follows that bound, not claim size x payload size.
    -- ``tests/test_claim.py::test_a_claim_stops_at_its_byte_bound_without_skipping_a_row_of_a_key``,
    ``tests/test_memory.py``
12. **A run is chained only behind the claiming relay's own live run, and handed out only after it.**
    A claim given ``own`` may take, instead of queueing them, the rows of a key whose one blocker is a
    row the calling relay holds in flight as the last row of its run (``own`` gives that lease's token;
    the claim locks the blocker for share and takes the rows only if it still carries that token):
    consecutive rows, at most ``run_length``, within the byte room, as a **chained run** under a lease
    of its own, its first row marked with the seq it follows (``ClaimedRow.after``); a message the relay
    handed out alone is the last row of a run of one. This bends
    invariant 3 for the relay that holds the key, and only for it: the dispatcher (``relay._dispatch``)
    appends a chained run to the run it follows and hands it out after that run's last row was
    delivered, on the same lane, in order; if that run broke (a row failed, the relay stops), the
    chained rows are released unattempted (invariant 6), and a chained run whose run is unknown is
    released too. The dispatcher lets a key have at most two runs in a relay, one going on and one
    chained. A chained run is taken two ways: from the scan, when the key's next rows are due (written
    after the run was claimed), or **pulled**: given ``pulls`` (the relay's runs whose key has rows
    waiting behind them, queued by this relay or by others), the claim reads the key's pending rows
    right after the run's last row (one index range: on PostgreSQL of the partial index of holding
    rows, elsewhere of ``(msg_key, status, seq)``), locks them skipping
    any locked right now, and takes the leading ones that are due or queued, locked, and before any
    row holding the key otherwise (in flight, failed, parked): a run with no hole, at most
    ``run_length``, three quarters of the claim in all (the scan keeps its share: fairness), or all but a
    sixteenth when the caller's last claim scanned nothing but the pulled keys' rows (``scan_idle``:
    nothing else was due, so the share would go unused; the scan still looks, and the next claim
    after one that finds other rows is back to three quarters); rows of the
    key that the same claim's scan finds right behind the pulled run (no hole) extend it, the others
    are queued behind it. So a hot
    key goes on behind its holder with no promotion and no pause between runs, whoever queued its rows.
    A relay learns that a key has rows waiting from its own claim (a full run, or rows it queued), or
    guesses it (the key is *contended*: a promotion lately brought back rows of it that another relay
    queued, out of this relay's sight); a guessed pull (``queued_only``) takes queued rows only, as
    due ones come to the scan and chain there.
    -- ``tests/test_claim.py::test_a_claim_pulls_a_keys_next_run_behind_its_own_in_flight_run``,
    ``tests/test_claim.py::test_a_pulled_run_has_no_hole_and_leaves_the_scan_its_share``,
    ``tests/test_claim.py::test_a_pulled_run_stops_at_a_row_another_claim_has_locked``,
    ``tests/test_runs.py::test_chained_runs_keep_order_through_failures_in_a_relay``
13. **A run's end takes its key's queued run for its relay instead of promoting it (a kept run).** In
    the one transaction that marks a run's last row delivered (or a keyed row dead), after those marks,
    the completer (``relay._completer``) reads the key's queued run as a promotion does
    (:meth:`KeyQueue.queued_runs`: the key's first holding row is queued, nothing earlier holds it; the
    run ends at the key's next row holding it otherwise, as after a crash, where a claim queued a dead
    relay's expired rows while later ones were still in flight under a longer lease) and, within the
    room left in the relay's window (messages and bytes), takes that run's leading queued rows itself
    (:meth:`ClaimQueries.take_queued`) under a new lease, instead of making them due. The take
    re-checks each row (pending, still queued) and keeps a key's rows only up to the first one it did
    not get (the rows after it are given back, due: no hole); the rest of a run taken in part stays
    queued behind it, and a key with no room is promoted (invariant 9). A row is taken exactly when a
    promotion would have made it claimable with nothing earlier holding its key, so order holds as for
    any claim (invariant 3); the kept rows go out as runs of their own (``after`` 0). So a key whose
    rows another relay queued goes on behind the relay that held it, with neither a promotion write nor
    a wait for the next claim. A stopping relay has no room (it takes nothing); rows taken as it stops
    are released (attempt not counted); a relay killed after the commit leaves them to their lease
    (invariant 4).
    -- ``tests/test_claim.py::test_a_runs_end_keeps_the_keys_next_queued_rows_for_its_relay``,
    ``tests/test_claim.py::test_a_kept_run_needs_the_key_free_and_queued_rows_right_behind``,
    ``tests/test_claim.py::test_a_kept_run_stops_at_a_row_of_its_key_held_under_another_lease``,
    ``tests/test_crash.py::test_killed_relay_loses_nothing``,
    ``tests/test_claim.py::test_a_kept_run_stops_at_its_room_and_at_a_row_promoted_meanwhile``
14. **Rows behind another relay's live run are left to it.** A claim told which leases are its caller's
    (``ours``) neither queues nor takes the rows it finds blocked behind a row another relay holds in
    flight under a live lease (read with the blockers it locks): they stay due, and that relay chains
    or pulls them behind its run (invariant 12), or its own scan queues them behind it. So the rows
    of a hot key cost one write to take and one to mark, however many relays look at them (queued by
    an idle relay they cost a queue write and a promotion or take more; BENCHMARKS.md, "Figures behind
    the code"). Leaving a row due is always safe (invariant 5: nothing leaves the
    scan); a row behind an expired lease is queued or reclaimed as before (invariant 4), and the claim
    counts the rows it left (``ClaimResult.elsewhere``), which are no work for its relay: an idle relay
    then looks again only at its poll pace. Rows blocked behind a row the caller holds itself, under a
    live lease, and does not chain behind are left due too (``ClaimResult.busy``: claimable once that row
    is marked, whose outcome wakes the relay). Such a row is most often inside a run: concurrent writers
    of one key commit out of ``seq`` order now and then, and a row committed late becomes visible after
    later rows of its key were taken. Queued there, nothing would promote it (a run's end promotes what
    follows its last row), and every row of the key written after it would queue behind it until the
    maintenance sweep. A claim also never takes a chained run of a key beside a head run of the same key
    (a row committed late that nothing earlier holds back): the relay would hand the two out as one run,
    the chained rows before the run they follow was delivered; they stay due for the next claim.
    -- ``tests/test_claim.py::test_rows_behind_another_relays_live_run_are_left_to_it``,
    ``tests/test_claim.py::test_a_row_committed_late_behind_a_row_inside_the_callers_run_is_left_due``,
    ``tests/test_claim.py::test_a_claim_takes_no_chained_run_beside_a_head_run_of_the_same_key``,
    ``tests/test_runs.py::test_one_key_written_by_concurrent_writers_never_stalls``,
    ``tests/test_concurrency.py::test_three_relays_deliver_each_once``
15. **A relay claims only what it can route, and a message nobody routes loses no attempt.** A claim
    given ``topics`` (the names and shell-style patterns its publishers take: its handlers' topics,
    unless a publisher may take any topic, as Kafka does) scans the rows of those topics only
    (``relay._topics``: exact on each database, but for a pattern's character class, which the SQL
    widens); a pull (invariant 12) and a kept run (invariant 13) stop at the key's first row of another
    topic; a blocker of another topic is never taken for a row another claim had locked (the scan
    never reads it), so the rows behind it are queued behind it. A row of another topic is thus left
    exactly as it was (due, or queued: a run's end promotes it, invariant 9) for a relay that routes
    it, and the key's later rows wait for it: per-key order holds across topics and relays. A row that
    reaches the dispatcher with no publisher for it anyway (a pattern's class, a publisher of one's own
    that refuses a topic) is released, its attempt not counted, due again after
    ``relay._dispatch.UNROUTABLE_PAUSE``. So a message waits ``pending`` until some relay can route it
    (``outbox status``, the stuck monitor), and a relay that does not know a new topic during a rolling
    deploy neither delays it nor spends its attempts. The cost: the scan reads past the due rows of
    other topics that come before its own in ``due_at`` order (the ``due_at`` index holds every topic),
    so a backlog of messages no relay here routes is read by each of its claims (BENCHMARKS.md, "A
    relay's topics in its claim").
    -- ``tests/test_claim.py::test_a_claim_takes_only_the_topics_its_relay_routes``,
    ``tests/test_claim.py::test_pulled_and_kept_runs_stop_at_a_topic_their_relay_does_not_route``,
    ``tests/test_routing.py``
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
import secrets
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from outbox._dialects import Dialect
from outbox._key_queue import (
    DUE,
    QUEUED,
    RUN_LENGTH,
    KeyQueue,
    RunRow,
    key_is,
    key_rows_after,
    on_key_index,
    seqs_param,
)
from outbox._schema import KEY_HOLDING, OutboxTables, Status, status_in
from relay._topics import Topics

#: MariaDB: keys with at least this many rows in one scan have their probes made with constants
#: (ClaimQueries._probe_keys); the correlated probe reads every pending row of its key, so a deep key's
#: scan of N rows read N x depth rows
PROBE_BY_KEY = 4

#: a key with at least this many rows blocked in one scan, held back by a failed or parked row (it may
#: hold the key for long: a retry's backoff, a strict-order topic's poison message), has its next due rows
#: queued with them, up to QUEUE_AHEAD, so that they leave the scan in one statement instead of taking a
#: share of every claim (invariant 8). Behind another relay's run they are not: that relay chains or
#: pulls them (invariant 14)
DEEP_BLOCKED = 64
QUEUE_AHEAD = 8192

#: longest stored error text (type and message); the rest is cut with a marker
MAX_ERROR_LENGTH = 2000


def new_token() -> str:
    return secrets.token_hex(16)


def _by_seq(row: Any) -> int:
    return int(row.seq)


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
    #: the first row of a chained run: the seq of this relay's in-flight row of its key that it follows
    #: (invariant 12; the dispatcher hands it out only after that row was delivered). 0: not chained
    after: int = 0


class ClaimResult(list[ClaimedRow]):
    """The rows a claim took (a list), how many blocked rows it set aside (``queued``), and the keys
    whose next rows wait behind the run it took for them (``deep``: the relay pulls their next run,
    invariant 12).

    A claim that queued rows found work even when it took none: the fetcher looks again at once.
    ``busy`` counts the blocked rows it left as they were, their blockers being written right now (a
    run's end being marked, most often this relay's own): work found too, claimable once that write
    commits, so the fetcher keeps its claim size for them. ``elsewhere`` counts the blocked rows it
    left to the relay whose live run holds their key (invariant 14): not work for this relay.
    """

    queued: int = 0
    busy: int = 0
    elsewhere: int = 0
    #: rows the scan found that are not of a pulled key (0: nothing else was due, as far as it read;
    #: -1: the pulls left no room to scan)
    others: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.deep: set[str] = set()
        #: keys pulled that had nothing more to take (their rows come back by promotion)
        self.shallow: set[str] = set()


@dataclass(slots=True)
class _Scanned:
    seq: int
    key: str | None
    status: str
    #: the nearest earlier row of the key that holds it (0: none, the row is its key's head)
    prev: int
    #: the payload's size in bytes (read from the row's header: the payload itself stays on the server)
    size: int
    due_at: dt.datetime


class ClaimQueries:
    """The claim path's statements for one outbox table on one database family."""

    def __init__(self, tables: OutboxTables, dialect: Dialect, *, run_length: int = RUN_LENGTH) -> None:
        self.tables = tables
        self.dialect = dialect
        self.run_length = run_length
        t = self.t = tables.messages
        c = t.alias("c")
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
        if dialect.array_params:  # one statement text whatever the batch size: prepared once, no re-parsing
            # The array goes as one text literal ("{1,2,3}", see _seqs): psycopg's list dumper spends Python
            # time per element (a regex each; BENCHMARKS.md, "Figures behind the code").
            seq_array = sa.cast(sa.bindparam("seqs", type_=sa.Text()), postgresql.ARRAY(sa.BigInteger()))
            in_seqs = t.c.seq == sa.any_(seq_array)
        else:
            in_seqs = t.c.seq.in_(sa.bindparam("seqs", expanding=True))

        # -- the scan: due rows in due_at order, each with the nearest earlier row holding its key --------
        # One index probe per holding status (the greatest of them): a probe per status reads one index
        # entry; "max(seq) over any holding status" would read every holding row of the key (invariant 8).
        def nearest_holding(status: Status) -> Any:
            e = t.alias(f"e_{status.value}")
            found = sa.select(sa.func.max(e.c.seq)).where(
                e.c.msg_key == c.c.msg_key, status_in(e.c.status, [status]), e.c.seq < c.c.seq
            )
            # MariaDB may read the probe through the status index, every row of the status for each
            # probed row, when its statistics make a status look rare (in flight, after a backlog was
            # analysed): 2,000 x 2,000 rows a claim, 4.9 s (slow log, 10,000 keys); the key's index,
            # forced, reads the key's rows of that status
            return sa.func.coalesce(on_key_index(found, e, t).scalar_subquery(), 0)

        if dialect.holding_index:
            # PostgreSQL: one probe of the partial index of holding rows, (msg_key, seq), backwards from
            # (key, seq). Four probes of (msg_key, status, seq) let the planner pick (status, topic) for a
            # status it believes rare (in flight, after a backlog's ANALYZE), scanning every in-flight row
            # once per keyed row. And written "max(seq) where msg_key = key and seq < row", the planner
            # may read the primary key backwards from the row, filtering by key (it believes a hot key
            # common): a key's head, whose earlier rows are all delivered, then read every delivered row
            # of the table before it (BENCHMARKS.md, "Figures behind the code"). So the probe is a row
            # comparison, (msg_key, seq) < (key, row), bounded by msg_key >= key, ordered by
            # (msg_key, seq): only that index gives the order.
            e = t.alias("e")
            nearest = (
                sa.select(e.c.seq)
                .where(
                    e.c.msg_key >= c.c.msg_key,
                    sa.tuple_(e.c.msg_key, e.c.seq) < sa.tuple_(c.c.msg_key, c.c.seq),
                    status_in(e.c.status, KEY_HOLDING),
                )
                .order_by(e.c.msg_key.desc(), e.c.seq.desc())
                .limit(1)
                .scalar_subquery()
            )
            earlier: Any = sa.func.coalesce(nearest, 0)
        else:
            earlier = getattr(sa.func, dialect.greatest_function)(*(nearest_holding(s) for s in KEY_HOLDING))
        if not dialect.correlated_range:
            # MariaDB: the probes run after the scan (_probe_keys): correlated for keys with few rows
            # scanned (this statement), with constants for the others
            self._probe_rows = sa.select(c.c.seq, earlier).where(
                c.c.seq.in_(sa.bindparam("seqs", expanding=True))
            )
            earlier = sa.literal(0)
        prev = sa.case((c.c.msg_key.is_(None), sa.literal(0)), else_=earlier)
        scan = (
            sa.select(
                c.c.seq, c.c.msg_key, c.c.status, prev.label("prev"), sa.func.length(c.c.payload), c.c.due_at
            )
            .where(c.c.due_at <= sa.bindparam("now"))
            .order_by(c.c.due_at, c.c.seq)
            .limit(sa.bindparam("limit", type_=sa.Integer))
        )
        self._c = c
        self._scan_all = scan
        self._scan = self._locking(scan)
        #: the scan and MariaDB's plain look of the rows of some topics (invariant 15), by topics
        self._by_topics: dict[Topics, tuple[Any, Any]] = {}
        # a write that changes nothing: it takes SQLite's write lock (pysqlite begins a transaction only
        # before a write, and SQLite takes the lock only on a write)
        self._write_lock = sa.update(t).where(sa.false()).values(seq=t.c.seq)
        #: MariaDB's plain look before a locking claim (see claim_batch's look_first)
        self._probe = sa.select(c.c.seq).where(c.c.due_at <= sa.bindparam("now")).limit(1)
        # The rows that block queued rows: locked for share (so their own finishing waits for our commit,
        # and its promotion sees what we queued), skipped when someone writes them right now.
        blockers = sa.select(t.c.seq, t.c.lease_token, t.c.status, t.c.due_at, t.c.topic).where(
            in_seqs, status_in(t.c.status, KEY_HOLDING)
        )
        self._lock_blockers = (
            blockers.with_for_update(read=True, skip_locked=True) if dialect.skip_locked else blockers
        )
        self._queue = (
            sa.update(t).where(in_seqs).values(status=Status.PENDING.value, due_at=None, lease_token=None)
        )
        claim = (
            sa.update(t)
            .where(in_seqs)
            .values(
                status=Status.INFLIGHT.value,
                lease_token=sa.bindparam("token"),
                due_at=sa.bindparam("lease_until"),
                last_attempt_at=sa.bindparam("now"),
            )
        )
        # kept runs (invariant 13): queued rows only, whatever changed since they were read
        claim_queued = claim.where(status_in(t.c.status, [Status.PENDING]), t.c.due_at.is_(None))
        if dialect.claim_returning:
            self._claim: Any = claim.returning(*self._columns)
            self._claim_queued: Any = claim_queued.returning(*self._columns)
        else:  # MariaDB: update, then read the claimed rows back (same transaction, rows locked)
            self._claim = claim
            self._claim_queued = claim_queued
        self._select_taken = sa.select(*self._columns).where(
            in_seqs, t.c.lease_token == sa.bindparam("token")
        )

        #: promotion of queued rows (outbox._key_queue): the completer's, after a run or a dead row
        self.key_queue = KeyQueue(tables, run_length=run_length)

        # -- pulled runs (invariant 12): a key's pending rows right after the caller's own run -------------
        # The key's rows after a row, in seq order, each ready (queued, due) or not (a retry's backoff, or
        # a row holding the key otherwise, which the run must stop at): see key_rows_after.
        self._pending_after = key_rows_after(
            t, holding_index=dialect.holding_index, inclusive=False, now=sa.bindparam("now")
        )
        # a deep blocked key's next due rows, after the scan's last one of it (queued with them)
        ahead = (
            sa.select(t.c.seq)
            .where(
                key_is(t.c.msg_key, sa.bindparam("key", type_=t.c.msg_key.type)),
                status_in(t.c.status, [Status.PENDING]),
                t.c.due_at <= sa.bindparam("now"),
                t.c.seq > sa.bindparam("after", type_=sa.BigInteger),
            )
            .order_by(t.c.msg_key, t.c.seq)
            .limit(sa.bindparam("count", type_=sa.Integer))
        )
        self._lock_ahead = ahead.with_for_update(skip_locked=True) if dialect.skip_locked else ahead
        h = t.alias("h")
        self._held_back = (
            sa.select(h.c.seq)
            .where(
                h.c.msg_key == sa.bindparam("key", type_=t.c.msg_key.type),
                status_in(h.c.status, [Status.FAILED, Status.PARKED]),
                h.c.seq < sa.bindparam("first", type_=sa.BigInteger),
            )
            .limit(1)
        )
        pending = sa.select(t.c.seq).where(in_seqs, status_in(t.c.status, [Status.PENDING]))
        self._lock_pending = pending.with_for_update(skip_locked=True) if dialect.skip_locked else pending

        # -- marks (fenced by the lease token) -----------------------------------------------------------
        fenced = sa.and_(t.c.lease_token == sa.bindparam("token"), in_seqs)
        self._delivered = (
            sa.update(t)
            .where(fenced)
            .values(
                status=Status.DELIVERED.value,
                due_at=None,
                lease_token=None,
                delivered_at=sa.bindparam("now"),
                # the attempt is counted with its outcome, unless its start was (invariant 10)
                attempts=t.c.attempts + sa.bindparam("count", type_=sa.Integer),
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
                attempts=sa.bindparam("b_attempts", type_=sa.Integer),
            )
        )
        self._release = (
            sa.update(t)
            .where(fenced)
            .values(
                status=sa.case((t.c.last_error.is_(None), Status.PENDING.value), else_=Status.FAILED.value),
                due_at=sa.bindparam("now"),
                lease_token=None,
            )
        )
        self._started = (
            sa.update(t)
            .where(t.c.lease_token == sa.bindparam("token"), in_seqs, t.c.status == Status.INFLIGHT.value)
            .values(attempts=t.c.attempts + 1)
        )
        self._renew = (
            sa.update(t)
            .where(t.c.lease_token == sa.bindparam("token"), t.c.status == Status.INFLIGHT.value)
            .values(due_at=sa.bindparam("lease_until"))
        )

    # -- claim ----------------------------------------------------------------------------------------

    def claim_batch(
        self,
        conn: sa.Connection,
        *,
        limit: int,
        lease_seconds: float,
        now: dt.datetime,
        look_first: bool = True,
        max_bytes: int | None = None,
        own: Callable[[str, int], str | None] | None = None,
        pulls: Sequence[tuple[str, int, str]] = (),
        queued_only: Collection[str] = (),
        ours: Callable[[str], bool] | None = None,
        topics: Topics | None = None,
        scan_idle: bool = False,
    ) -> ClaimResult:
        """Claim up to ``limit`` claimable rows under one new lease, in the caller's transaction.

        The caller commits right after; the lease is live from then until ``now + lease_seconds``.
        Rows come back in ``seq`` order; the rows of one key form a run (consecutive messages of the
        key, to be delivered in that order). ``look_first=False`` skips MariaDB's plain read before the
        locking one (one round trip) when rows are expected: the last claim was full. ``max_bytes``
        bounds the payload bytes taken (the first row is taken whatever its size, so work goes on): the
        rows past it stay as they are, for a later claim (invariant 11).

        Chained runs (invariant 12): ``own``, given a key and a row, gives the live lease token under
        which the calling relay holds that row in flight at the end of a run it can chain behind (None:
        it cannot); ``pulls`` lists such runs whose key has more rows waiting, as ``(key, last row,
        token)``: the claim takes each key's next pending rows right after that row (a **pulled** run,
        queued or due), up to ``run_length`` a key and three quarters of ``limit`` in all (all but a
        sixteenth with ``scan_idle``: the caller's last claim found nothing else), before it
        scans. ``ClaimResult.deep`` then names the keys with rows left behind what the claim took.
        For the keys in ``queued_only`` (runs that may have rows waiting, the caller guesses), a pull
        takes queued rows only: due ones the scan finds, and chains (``own``).

        ``ours`` tells whether a lease token is one of the caller's: rows blocked behind another
        relay's live lease are then left as they are, to that relay (invariant 14), and counted in
        ``ClaimResult.elsewhere``. Without it every blocked row is queued.

        ``topics``: the topics the caller can route (None: every topic). The claim takes rows of those
        only, and a pulled run stops at the first row of its key that is not one of them (invariant 15).
        """
        result = ClaimResult()
        if self.dialect.write_lock_first:  # SQLite: what the scan reads holds until the commit (inv. 9)
            conn.execute(self._write_lock)
        mariadb = not self.dialect.claim_returning
        pulled: list[int] = []
        after: dict[int, int] = {}  # a chained run's first row -> the row of ours it follows
        pulled_last: dict[str, int] = {}  # a pulled key -> its last row pulled
        if pulls:
            share = limit - max(1, limit // 16) if scan_idle else limit * 3 // 4
            budget = min(len(pulls) * self.run_length, max(1, share))
            pulled, pulled_bytes = self._pull(
                conn,
                pulls,
                frozenset(queued_only),
                budget,
                max_bytes,
                now,
                after,
                pulled_last,
                result,
                topics,
            )
            limit -= len(pulled)
            if max_bytes is not None and pulled:
                max_bytes -= pulled_bytes
                if max_bytes <= 0:
                    limit = 0
        scanned: list[_Scanned] = []
        frontier: tuple[dt.datetime, int] | None = None  # None: every due row was scanned or locked
        if limit > 0 and not (mariadb and look_first and not pulled and self._nothing_due(conn, now, topics)):
            params: dict[str, Any] = {"now": now, "limit": limit}
            scanned = [_Scanned(*row) for row in conn.execute(self._scan_of(topics), params)]
            # how far the scan read, in its order: a due row before that and not scanned was locked
            if len(scanned) == limit:
                frontier = (scanned[-1].due_at, scanned[-1].seq)
            if not self.dialect.correlated_range:
                self._probe_keys(conn, scanned)
        queue_behind_pulled: list[int] = []
        if pulled_last and scanned:
            # rows of a pulled key: the pulled rows (also due), and rows behind them, which extend the
            # pulled run while they follow it with no hole (within the byte room), and else wait behind
            # it (queued, as queue_own); a pulled key's rows play no other part in the scan
            taking = set(pulled)
            rest = []
            behind: dict[str, list[_Scanned]] = {}
            for row in scanned:
                last = pulled_last.get(row.key) if row.key is not None else None
                if last is None:
                    rest.append(row)
                elif row.seq > last and row.seq not in taking:
                    behind.setdefault(row.key or "", []).append(row)
            scanned = rest
            for key, rows in behind.items():
                rows.sort(key=_by_seq)
                tail = pulled_last[key]
                for i, row in enumerate(rows):
                    if row.prev != tail or (max_bytes is not None and row.size > max_bytes):
                        queue_behind_pulled.extend(r.seq for r in rows[i:])
                        break
                    if max_bytes is not None:
                        max_bytes -= row.size
                    pulled.append(row.seq)
                    tail = row.seq
                pulled_last[key] = tail
                result.deep.add(key)  # more of the key may wait behind the scan's last row
        # (the pulled keys' rows are out of ``scanned`` by now; -1: no room was left to scan)
        result.others = len(scanned) if limit > 0 else -1
        take: list[int] = []
        queued: list[int] = list(queue_behind_pulled)
        if scanned:
            take, queue_own, blocked, deep = self._plan(scanned)
            result.deep.update(deep)
            if max_bytes is not None:
                take, queue_own = _within(scanned, take, queue_own, max_bytes)
            room = None
            if max_bytes is not None:
                sizes = {r.seq: r.size for r in scanned}
                room = max_bytes - sum(sizes[seq] for seq in take)
            queue_blocked, chained, chained_after = self._queue_blocked(
                conn, blocked, scanned, own, ours, room, now, frontier, result, topics
            )
            take += chained
            after.update(chained_after)
            queued += queue_blocked + queue_own
        if queued:
            conn.execute(self._queue, {"seqs": self._seqs(queued)})
            result.queued = len(queued)
        take += pulled
        if take:
            reclaimed = {s.seq for s in scanned if s.status == Status.INFLIGHT.value}
            self._take(conn, take, now, lease_seconds, reclaimed, after, result)
        return result

    def take_queued(
        self,
        conn: sa.Connection,
        runs: dict[str, list[RunRow]],
        *,
        limit: int,
        max_bytes: int,
        lease_seconds: float,
        now: dt.datetime,
        topics: Topics | None = None,
    ) -> tuple[ClaimResult, dict[str, list[RunRow]]]:
        """Kept runs (invariant 13): of the queued runs ``runs`` (:meth:`KeyQueue.queued_runs`, read in
        this transaction after the marks that ended their keys' runs), take each key's leading queued
        rows for the caller under one new lease, within ``limit`` rows and ``max_bytes`` in all. Returns
        the rows taken (runs of their own: ``after`` 0) and the runs left to promote (keys that did not
        fit at all). A key taken in part keeps the rest queued behind what was taken: its run's end
        comes back here. A run is taken up to its first row of a topic not in ``topics`` (invariant
        15): a run that starts with one is left to promote, for a relay that routes it."""
        result = ClaimResult()
        rest: dict[str, list[RunRow]] = {}
        wanted: dict[str, list[int]] = {}
        for key, run in runs.items():
            lead: list[int] = []
            for seq, size, topic in run:
                if (
                    size < 0
                    or limit <= 0
                    or size > max_bytes
                    or (topics is not None and not topics.matches(topic))
                ):
                    break
                lead.append(seq)
                limit -= 1
                max_bytes -= size
            if lead:
                wanted[key] = lead
            else:
                rest[key] = run
        if not wanted:
            return result, rest
        take = sorted(seq for lead in wanted.values() for seq in lead)
        token, rows = self._put_in_flight(conn, self._claim_queued, take, now, lease_seconds)
        got = {row.seq: row for row in self._claimed(rows, token)}
        give_back: list[int] = []
        for lead in wanted.values():
            # a key's rows are taken up to the first one that was not (promoted meanwhile): no hole
            cut = next((i for i, seq in enumerate(lead) if seq not in got), len(lead))
            give_back += [seq for seq in lead[cut:] if seq in got]
            result.extend(got[seq] for seq in lead[:cut])
        if give_back:  # due now, behind what was taken: the scan queues them again (invariant 3)
            self.release(conn, token, give_back, due_at=now)
        result.sort(key=_by_seq)
        return result, rest

    def _take(
        self,
        conn: sa.Connection,
        take: list[int],
        now: dt.datetime,
        lease_seconds: float,
        reclaimed: set[int],
        after: dict[int, int],
        result: ClaimResult,
    ) -> None:
        """Put rows ``take`` in flight under a new lease; ``result`` gets them as claimed rows, in seq
        order (``reclaimed``: those taken back from an expired lease; ``after``: chained runs' firsts)."""
        token, rows = self._put_in_flight(conn, self._claim, take, now, lease_seconds)
        claimed = self._claimed(rows, token, reclaimed)
        for claimed_row in claimed:
            if claimed_row.seq in after:
                claimed_row.after = after[claimed_row.seq]
        claimed.sort(key=_by_seq)
        result.extend(claimed)

    def _put_in_flight(
        self, conn: sa.Connection, statement: Any, seqs: list[int], now: dt.datetime, lease_seconds: float
    ) -> tuple[str, Sequence[Any]]:
        """Run ``statement`` (a claim's UPDATE of rows ``seqs``) under a new lease: its token, and the rows
        it took (the claim's columns)."""
        token = new_token()
        params = {
            "seqs": self._seqs(seqs),
            "now": now,
            "token": token,
            "lease_until": now + dt.timedelta(seconds=lease_seconds),
        }
        if self.dialect.claim_returning:
            return token, conn.execute(statement, params).all()
        conn.execute(statement, params)  # MariaDB: then read them back (same transaction, rows locked)
        return token, conn.execute(self._select_taken, {"seqs": params["seqs"], "token": token}).all()

    @staticmethod
    def _claimed(rows: Sequence[Any], token: str, reclaimed: Collection[int] = ()) -> list[ClaimedRow]:
        """Rows of the claim's columns as claimed rows under ``token`` (``reclaimed``: those taken back
        from an expired lease)."""
        # unpacked by position: Row attribute access by name costs more than the rest together
        return [
            ClaimedRow(seq, id_, topic, key, payload, ctype, headers, tries, created, token, seq in reclaimed)
            for seq, id_, topic, key, payload, ctype, headers, tries, created in rows
        ]

    def _probe_keys(self, conn: sa.Connection, scanned: list[_Scanned]) -> None:
        """MariaDB: fill in each scanned keyed row's nearest earlier holding row (``prev``), which the
        scan left 0: for keys with few rows scanned, with the correlated probes (as elsewhere, in the
        scan: cheap while a key has few pending rows); for the others, in one statement of constant
        probes: per key, its greatest pending row and its greatest row holding it otherwise before its
        first scanned row (one index probe each), and how many rows hold it between its first and last
        scanned rows (one range of ``(msg_key, status, seq)``, counted in the server): one row a key.
        When that count is the scanned rows between them, nothing else holds the key there (the
        scanned rows are locked: they hold it still) and each row's nearest is the scanned row before
        it; else the key's holding rows in that range are read (a second statement, for those keys
        only). Same answer as the correlated probes, which MariaDB runs by reading every row of the key
        for each scanned row (invariant 8). (Reading every range, the claim parsed each scanned row of a
        deep key twice in Python: pymysql is pure Python.)"""
        by_key: dict[str, list[_Scanned]] = {}
        for row in scanned:
            if row.key is not None:
                by_key.setdefault(row.key, []).append(row)
        few = [row for rows in by_key.values() if len(rows) < PROBE_BY_KEY for row in rows]
        if few:
            prevs: dict[int, int | None] = dict(
                conn.execute(self._probe_rows, {"seqs": [row.seq for row in few]}).all()
            )
            for row in few:
                row.prev = int(prevs.get(row.seq) or 0)
        by_key = {key: rows for key, rows in by_key.items() if len(rows) >= PROBE_BY_KEY}
        if not by_key:
            return
        # SQL text: a statement of this shape differs with every claim, and building it as SQLAlchemy
        # expressions cost more than running it (BENCHMARKS.md, "Figures behind the code")
        table = conn.dialect.identifier_preparer.format_table(self.t)
        holding_statuses = ", ".join(f"'{status.value}'" for status in KEY_HOLDING)
        pending = f"'{Status.PENDING.value}'"
        others = ", ".join(f"'{status.value}'" for status in KEY_HOLDING if status is not Status.PENDING)
        parts: list[str] = []
        params: dict[str, Any] = {}

        def between(index: int) -> str:  # the key's holding rows between its first and last scanned
            return (
                f"FROM {table} WHERE msg_key = :k{index} "
                f"AND status IN ({holding_statuses}) AND seq > :f{index} AND seq < :l{index}"
            )

        groups = list(by_key.values())
        for index, (key, rows) in enumerate(by_key.items()):
            rows.sort(key=_by_seq)
            params[f"k{index}"], params[f"f{index}"], params[f"l{index}"] = key, rows[0].seq, rows[-1].seq
            # pending rows may be many (one probe of the index's end); the rows holding the key
            # otherwise are few (a run in flight, a failure), read together
            before = ", ".join(
                f"coalesce((SELECT max(seq) FROM {table} WHERE msg_key = :k{index} "
                f"AND status IN ({statuses}) AND seq < :f{index}), 0)"
                for statuses in (pending, others)
            )
            parts.append(
                f"SELECT {index}, {self.dialect.greatest_function}({before}), "
                f"(SELECT count(*) {between(index)})"
            )
        before_first: dict[int, int] = {}
        crowded: list[int] = []  # keys with rows holding them between their scanned rows
        for index, nearest, holding in conn.execute(sa.text(" UNION ALL ".join(parts)), params):
            before_first[index] = int(nearest or 0)
            if int(holding) != len(groups[index]) - 2:
                crowded.append(index)
        between_rows: dict[int, list[int]] = {index: [] for index in crowded}
        if crowded:
            ranges = [f"SELECT {index}, seq {between(index)}" for index in crowded]
            for index, seq in conn.execute(sa.text(" UNION ALL ".join(ranges)), params):
                between_rows[index].append(int(seq))
        for index, rows in enumerate(groups):
            if index not in between_rows:  # nothing else between: each row follows the scanned one before it
                rows[0].prev = before_first.get(index, 0)
                for earlier, row in itertools.pairwise(rows):
                    row.prev = earlier.seq
                continue
            seqs = sorted({before_first.get(index, 0), rows[0].seq, *between_rows[index]} - {0})
            for row in rows:
                at = bisect.bisect_left(seqs, row.seq)
                row.prev = seqs[at - 1] if at else 0

    def _nothing_due(self, conn: sa.Connection, now: dt.datetime, topics: Topics | None) -> bool:
        """MariaDB's plain look before a locking scan (see ``look_first``): no row is due."""
        probe = self._probe if topics is None else self._of_topics(topics)[1]
        return conn.execute(probe, {"now": now, "limit": 1}).first() is None

    def _locking(self, scan: Any) -> Any:
        return scan.with_for_update(skip_locked=True, of=self._c) if self.dialect.skip_locked else scan

    def _scan_of(self, topics: Topics | None) -> Any:
        """The scan of the rows of ``topics`` (None: of every row)."""
        return self._scan if topics is None else self._of_topics(topics)[0]

    def _of_topics(self, topics: Topics) -> tuple[Any, Any]:
        """The scan and the plain look of the rows of ``topics``, built once for each set of topics."""
        if (statements := self._by_topics.get(topics)) is None:
            if len(self._by_topics) > 64:  # a registry that keeps changing: no unbounded cache
                self._by_topics.clear()
            routed = topics.condition(self._c.c.topic, self.dialect)
            statements = (self._locking(self._scan_all.where(routed)), self._probe.where(routed))
            self._by_topics[topics] = statements
        return statements

    def _pull(
        self,
        conn: sa.Connection,
        pulls: Sequence[tuple[str, int, str]],
        queued_only: frozenset[str],
        budget: int,
        max_bytes: int | None,
        now: dt.datetime,
        after: dict[int, int],
        pulled_last: dict[str, int],
        result: ClaimResult,
        topics: Topics | None,
    ) -> tuple[list[int], int]:
        """Pulled runs (invariant 12): for each ``(key, last, token)``, the key's pending rows right after
        row ``last``, if that row is still ours (locked for share, under ``token``). Reads each key's
        next rows (one index range), locks them (skipping any locked right now), and takes the leading
        ones that are due or queued, locked and before any other row holding the key: a run with no
        hole. Returns the rows taken and their payload bytes; fills ``after``, ``pulled_last`` and the
        result's ``deep`` (keys with rows left behind what was taken)."""
        blockers = sorted({last for _, last, _ in pulls})
        found = conn.execute(self._lock_blockers, {"seqs": self._seqs(blockers)})
        held = {seq: token for seq, token, _, _, _ in found}
        room = max_bytes
        candidates: list[tuple[str, int, list[tuple[int, int]], bool]] = []
        for key, last, token in pulls:
            if budget <= 0:
                break
            if held.get(last) != token:
                continue  # not ours any more (fenced), or being written right now: chained next time
            want = min(self.run_length, budget)
            params = {"key": key, "after": last, "now": now, "count": want}
            rows: list[tuple[int, int]] = []
            read = 0
            least = QUEUED if key in queued_only else DUE
            for seq, ready, size, topic in conn.execute(self._pending_after, params):
                read += 1
                if ready < least or (topics is not None and not topics.matches(topic)):
                    break  # (a row this relay cannot route: a relay that can takes it, invariant 15)
                rows.append((seq, int(size or 0)))
            if rows:
                candidates.append((key, last, rows, read == want and len(rows) == read))
                budget -= len(rows)
            else:  # nothing (or nothing due) right behind our run: the key waits for its promotion
                result.shallow.add(key)
        if not candidates:
            return [], 0
        wanted = [seq for _, _, rows, _ in candidates for seq, _ in rows]
        locked = set(conn.execute(self._lock_pending, {"seqs": self._seqs(wanted)}).scalars())
        taken: list[int] = []
        total = 0
        for key, last, rows, more in candidates:
            run: list[int] = []
            for seq, size in rows:
                if seq not in locked or (room is not None and (taken or run) and size > room):
                    more = True
                    break
                if room is not None:
                    room -= size
                total += size
                run.append(seq)
            if run:
                taken += run
                after[run[0]] = last
                pulled_last[key] = run[-1]
                if more or len(run) == self.run_length:
                    result.deep.add(key)
        return taken, total

    def _plan(
        self, scanned: list[_Scanned]
    ) -> tuple[list[int], list[int], dict[str, list[_Scanned]], set[str]]:
        """Split scanned rows into: taken, set aside behind our own run (over ``run_length``), and blocked
        by a row this claim does not hold (by key). Invariant 3: a row is taken only when its nearest
        earlier holding row is taken too (or it has none). The last part names the keys whose run is
        full (``run_length``): their next rows may wait behind it, queued."""
        take: list[int] = []
        queue_own: list[int] = []
        blocked: dict[str, list[_Scanned]] = {}
        deep: set[str] = set()
        by_key: dict[str, list[_Scanned]] = {}
        for row in scanned:
            if row.key is None:
                take.append(row.seq)
            else:
                by_key.setdefault(row.key, []).append(row)
        for key, rows in by_key.items():
            rows.sort(key=_by_seq)
            taken: set[int] = set()
            for i, row in enumerate(rows):
                if row.prev == 0 or row.prev in taken:
                    if len(taken) < self.run_length:
                        taken.add(row.seq)
                        take.append(row.seq)
                        continue
                    # past the run's bound: behind our own last taken row, which this claim locks
                    queue_own.extend(r.seq for r in rows[i:])
                    deep.add(key)
                    break
                blocked[key] = rows[i:]
                break
            if len(taken) == self.run_length:  # a full run: more of the key may wait (queued)
                deep.add(key)
        return take, queue_own, blocked, deep

    def _queue_blocked(
        self,
        conn: sa.Connection,
        blocked: dict[str, list[_Scanned]],
        scanned: list[_Scanned],
        own: Callable[[str, int], str | None] | None,
        ours: Callable[[str], bool] | None,
        room: int | None,
        now: dt.datetime,
        frontier: tuple[dt.datetime, int] | None,
        result: ClaimResult,
        topics: Topics | None,
    ) -> tuple[list[int], list[int], dict[int, int]]:
        """The blocked rows that may leave the scan: those whose blockers (the earlier rows of their key
        this claim does not hold) are still holding the key and could be locked for share. And the
        chained runs (invariant 12): blocked rows whose one blocker is the caller's own in-flight row,
        still under its lease once locked, are taken instead (up to ``run_length`` a key, within
        ``room`` bytes), each run's first row mapped to the row it follows. Rows whose blockers include
        a row another relay holds in flight under a live lease (``ours`` says whose a token is) are
        left to that relay (invariant 14)."""
        if not blocked:
            return [], [], {}
        in_scan = {s.seq for s in scanned}
        needed = {key: {r.prev for r in rows if r.prev not in in_scan} for key, rows in blocked.items()}
        mine: dict[str, str] = {}  # key -> the token of the caller's lease on its one blocker
        if own is not None:
            for key, rows in blocked.items():
                if needed[key] == {rows[0].prev} and (token := own(key, rows[0].prev)) is not None:
                    mine[key] = token
        wanted = sorted(set().union(*needed.values()))
        held: dict[int, str | None] = {}
        elsewhere: set[int] = set()  # blockers in flight under another relay's live lease
        own_live: set[int] = set()  # blockers in flight under one of the caller's own live leases
        if wanted:
            for seq, token, status, due_at, topic in conn.execute(
                self._lock_blockers, {"seqs": self._seqs(wanted)}
            ):
                due = status == Status.PENDING.value and due_at is not None and due_at <= now
                routable = topics is None or topics.matches(topic)  # else the scan never reads it
                if due and routable and (frontier is None or (due_at, seq) <= frontier):
                    # due, within the scan's reach, yet not scanned: another claim had it locked (and
                    # left it due): claimable as a head, not a reason to queue behind it
                    continue
                held[seq] = token
                live = status == Status.INFLIGHT.value and due_at is not None and due_at > now
                if live and ours is not None and token is not None:
                    (own_live if ours(token) else elsewhere).add(seq)
        queue: list[int] = []
        chained: list[int] = []
        after: dict[int, int] = {}
        # the keys we could chain that have a head run in this claim too (a scanned row before the
        # blocked ones, taken): never both in one claim, the relay would hand the two out as one run,
        # the chained rows before the run they follow was delivered
        headed = {s.key for s in scanned if s.key in mine and s.seq < blocked[s.key][0].seq}
        for key, rows in blocked.items():
            if key in mine and key not in headed and held.get(rows[0].prev, "") == mine[key]:
                run = _consecutive(rows[: self.run_length], rows[0].prev)
                if room is not None:
                    kept = 0
                    for r in run:
                        if r.size > room:
                            break
                        room -= r.size
                        kept += 1
                    run = run[:kept]
                if run:
                    chained.extend(r.seq for r in run)
                    after[run[0].seq] = rows[0].prev
                    if len(run) < len(rows):  # the rest waits behind our own run (locked by us)
                        queue.extend(r.seq for r in rows[len(run) :])
                        result.deep.add(key)
                continue
            if needed[key] & elsewhere:  # that relay chains, pulls or queues them: left as they are
                result.elsewhere += len(rows)
            elif needed[key] & own_live:
                # behind a row the caller holds in flight and cannot chain behind (a row committed after
                # later rows of its key were taken waits behind a row inside their run; a key whose head
                # this claim takes; a lease about to be renewed): left due, claimable once that row is
                # marked (its outcome wakes the relay). Queued, nothing would promote it: a run's end
                # promotes what comes after its last row.
                result.busy += len(rows)
            elif needed[key] <= held.keys():
                queue.extend(r.seq for r in rows)
                if len(rows) >= DEEP_BLOCKED and self._held_back_long(conn, key, rows[0].seq):
                    # and the key's next due rows with them (locked first, skipping any locked now)
                    params = {"key": key, "after": rows[-1].seq, "now": now, "count": QUEUE_AHEAD}
                    queue.extend(conn.execute(self._lock_ahead, params).scalars())
                # the key's rows now wait for promotion: if the caller's own run holds the key, its
                # next claim pulls them instead (those queued by another relay's claim, it learns of
                # from the promotion that brings them back: relay._dispatch, contended keys)
                result.deep.add(key)
            else:  # a blocker being written right now (or finished meanwhile): left for the next claim
                result.busy += len(rows)
        return queue, chained, after

    def _held_back_long(self, conn: sa.Connection, key: str, first: int) -> bool:
        """Whether a failed or parked row of ``key`` comes before row ``first`` (one index probe)."""
        return conn.execute(self._held_back, {"key": key, "first": first}).first() is not None

    def promote(self, conn: sa.Connection, seqs: Sequence[int], *, now: dt.datetime) -> int:
        """Bring back to the scan the queued rows of the keys of ``seqs`` (rows that just stopped holding
        their key): see :mod:`outbox._key_queue`. Returns how many rows were promoted."""
        return self.key_queue.promote(conn, seqs, now=now)

    def promote_by_key(self, conn: sa.Connection, seqs: Sequence[int], *, now: dt.datetime) -> dict[str, int]:
        """:meth:`promote`, returning how many rows came back for each key that had queued rows."""
        return self.key_queue.promote_by_key(conn, seqs, now=now)

    # -- marks (all fenced by the lease token) -----------------------------------------------------------

    def _seqs(self, seqs: Sequence[int]) -> str | list[int]:
        """The ``seqs`` parameter (:func:`outbox._key_queue.seqs_param`)."""
        return seqs_param(self.dialect.array_params, seqs)

    def mark_delivered(
        self, conn: sa.Connection, token: str, seqs: Sequence[int], *, now: dt.datetime, counted: bool = False
    ) -> int:
        """Mark rows delivered, counting their attempt (unless ``counted``: :meth:`mark_started` did);
        returns how many still held ``token`` (the others were fenced off)."""
        if not seqs:
            return 0
        params = {"token": token, "seqs": self._seqs(seqs), "now": now, "count": 0 if counted else 1}
        return conn.execute(self._delivered, params).rowcount

    def mark_started(self, conn: sa.Connection, token: str, seq: int) -> bool:
        """Count an attempt before it starts (durably: the caller commits before starting it), for a
        message taken back from a relay that died or stalled (invariant 10); False when fenced off."""
        return bool(conn.execute(self._started, {"token": token, "seqs": self._seqs([seq])}).rowcount)

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
                    "b_attempts": f.attempt,
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
    #: the attempts the row has counted once this one is (its ``Message.attempt``)
    attempt: int = 1


def truncate_error(text: str) -> str:
    if len(text) <= MAX_ERROR_LENGTH:
        return text
    return text[: MAX_ERROR_LENGTH - 15] + " ...[truncated]"


def _within(
    scanned: list[_Scanned], take: list[int], queue_own: list[int], max_bytes: int
) -> tuple[list[int], list[int]]:
    """``take`` cut to ``max_bytes`` of payload, in scan order (at least one row): a keyed row left out
    leaves out every later row of its key, and the rows that were to be queued behind those keys' runs
    stay as they are too (order: a run never skips a row of its key)."""
    taking = set(take)
    kept: set[int] = set()
    cut_from: dict[str | None, int] = {}  # key -> the first seq left out
    total = 0
    for row in scanned:
        if row.seq not in taking:
            continue
        if row.key in cut_from or (kept and total + row.size > max_bytes):
            if row.key is not None:
                cut_from[row.key] = min(row.seq, cut_from.get(row.key, row.seq))
            continue
        kept.add(row.seq)
        total += row.size
    if len(kept) == len(taking):
        return take, queue_own
    keys = {r.seq: r.key for r in scanned}
    kept_list = [
        seq for seq in take if seq in kept and not (keys[seq] in cut_from and seq > cut_from[keys[seq]])
    ]
    return kept_list, [seq for seq in queue_own if keys[seq] not in cut_from]


def _consecutive(rows: list[_Scanned], after: int) -> list[_Scanned]:
    """The leading rows of ``rows`` (one key's, in seq order) that each follow the one before, the first
    following row ``after``: a run with no hole."""
    run: list[_Scanned] = []
    for row in rows:
        if row.prev != (run[-1].seq if run else after):
            break
        run.append(row)
    return run
