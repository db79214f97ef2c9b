"""The claim path's invariants, checked statement by statement on each database (see relay/_claim.py)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

import outbox
from outbox._clock import utcnow
from outbox._dialects import dialect_for
from outbox._schema import Status, tables_for
from relay._claim import ClaimQueries, Failure
from relay._topics import Topics
from tests.conftest import SERVER_BACKENDS, wait_until


@pytest.fixture
def claims(engine: sa.Engine) -> ClaimQueries:
    return ClaimQueries(tables_for(), dialect_for(engine))


def claim(
    engine: sa.Engine,
    claims: ClaimQueries,
    limit: int = 100,
    lease: float = 30.0,
    now: dt.datetime | None = None,
):  # type: ignore[no-untyped-def]
    with engine.begin() as conn:
        return claims.claim_batch(conn, limit=limit, lease_seconds=lease, now=now or utcnow())


def add_many(engine: sa.Engine, specs: list[tuple[str, str | None]]) -> None:
    with engine.begin() as conn:
        for topic, key in specs:
            outbox.add(conn, topic, {"topic": topic}, key=key)


def row_state(engine: sa.Engine, seq: int) -> sa.Row:  # type: ignore[type-arg]
    t = tables_for().messages
    with engine.connect() as conn:
        return conn.execute(sa.select(t).where(t.c.seq == seq)).one()


def test_claim_takes_each_key_as_one_run_in_seq_order(engine: sa.Engine, claims: ClaimQueries) -> None:
    add_many(engine, [("a", "k1"), ("b", "k1"), ("c", "k2"), ("d", None), ("e", None), ("f", "k2")])
    rows = claim(engine, claims)
    assert [r.topic for r in rows] == ["a", "b", "c", "d", "e", "f"]  # seq order
    assert len({r.token for r in rows}) == 1
    assert all(r.attempts == 0 for r in rows)  # the claim counts no attempt (invariant 10)
    # nothing more is claimable until the runs finish
    assert claim(engine, claims) == []


def test_a_key_is_claimed_again_only_after_its_run(engine: sa.Engine, claims: ClaimQueries) -> None:
    """Invariant 3: rows added behind a run in flight wait for it, whatever else is claimable."""
    add_many(engine, [("a", "k1"), ("b", "k1")])
    run = claim(engine, claims)
    add_many(engine, [("c", "k1"), ("d", None)])
    assert [r.topic for r in claim(engine, claims)] == ["d"]
    with engine.begin() as conn:
        claims.mark_delivered(conn, run[0].token, [run[0].seq], now=utcnow())
    assert claim(engine, claims) == []  # b still in flight
    with engine.begin() as conn:
        claims.mark_delivered(conn, run[0].token, [run[1].seq], now=utcnow())
        claims.promote(conn, [run[1].seq], now=utcnow())
    assert [r.topic for r in claim(engine, claims)] == ["c"]


def test_delayed_message_is_claimed_only_when_due(engine: sa.Engine, claims: ClaimQueries) -> None:
    with engine.begin() as conn:
        outbox.add(conn, "later", {}, delay=60)
    assert claim(engine, claims) == []
    assert [r.topic for r in claim(engine, claims, now=utcnow() + dt.timedelta(seconds=61))] == ["later"]


def test_expired_lease_is_fenced(engine: sa.Engine, claims: ClaimQueries) -> None:
    """Invariant 2: once a lease is reclaimed, the old token can neither mark, fail, release nor renew."""
    add_many(engine, [("t", "k")])
    (first,) = claim(engine, claims, lease=5)
    assert claim(engine, claims) == []  # live lease: nobody else gets it
    later = utcnow() + dt.timedelta(seconds=6)  # the claim decides by the time it is given
    (second,) = claim(engine, claims, now=later)  # lease expired: reclaimed with a new token
    assert second.seq == first.seq and second.token != first.token and second.attempts == 0
    assert second.reclaimed
    with engine.begin() as conn:
        now = utcnow()
        assert claims.mark_delivered(conn, first.token, [first.seq], now=now) == 0
        claims.mark_failed(conn, first.token, [Failure(first.seq, Status.DEAD, None, "stale")])
        assert claims.release(conn, first.token, [first.seq], due_at=now) == 0
        assert claims.renew(conn, first.token, lease_until=now + dt.timedelta(hours=1)) == 0
    state = row_state(engine, first.seq)
    assert state.status == "inflight" and state.lease_token == second.token and state.last_error is None
    with engine.begin() as conn:
        assert claims.mark_delivered(conn, second.token, [second.seq], now=utcnow()) == 1
    state = row_state(engine, first.seq)
    assert state.status == "delivered" and state.due_at is None and state.lease_token is None
    assert state.attempts == 1  # counted with its outcome


def test_release_counts_no_attempt(engine: sa.Engine, claims: ClaimQueries) -> None:
    add_many(engine, [("t", "k")])
    (row,) = claim(engine, claims)
    with engine.begin() as conn:
        assert claims.release(conn, row.token, [row.seq], due_at=utcnow()) == 1
    state = row_state(engine, row.seq)
    assert (state.status, state.attempts, state.lease_token) == ("pending", 0, None)
    (again,) = claim(engine, claims)
    assert again.seq == row.seq and again.attempts == 0


def test_renew_keeps_the_lease_alive(engine: sa.Engine, claims: ClaimQueries) -> None:
    add_many(engine, [("t", None)])
    (row,) = claim(engine, claims, lease=0.5)
    with engine.begin() as conn:
        assert claims.renew(conn, row.token, lease_until=utcnow() + dt.timedelta(seconds=30)) == 1
    time.sleep(0.6)
    assert claim(engine, claims) == []


def test_failed_message_holds_only_its_key_until_retry_time(engine: sa.Engine, claims: ClaimQueries) -> None:
    add_many(engine, [("a", "k1"), ("b", "k1"), ("c", "k2")])
    rows = {r.topic: r for r in claim(engine, claims)}
    retry_at = utcnow() + dt.timedelta(seconds=60)
    with engine.begin() as conn:
        claims.mark_failed(conn, rows["a"].token, [Failure(rows["a"].seq, Status.FAILED, retry_at, "boom")])
        claims.release(conn, rows["b"].token, [rows["b"].seq], due_at=utcnow())  # the rest of a's run
        claims.mark_delivered(conn, rows["c"].token, [rows["c"].seq], now=utcnow())
    assert claim(engine, claims) == []  # b waits behind failed a
    assert row_state(engine, rows["b"].seq).due_at is None  # queued: out of the scan until a finishes
    later = claim(engine, claims, now=retry_at + dt.timedelta(seconds=1))
    assert [r.topic for r in later] == ["a"] and later[0].attempts == 1  # the failed one, counted
    assert row_state(engine, rows["a"].seq).last_error == "boom"
    with engine.begin() as conn:
        claims.mark_delivered(conn, later[0].token, [later[0].seq], now=utcnow())
        assert claims.promote(conn, [later[0].seq], now=utcnow()) == 1
    assert [r.topic for r in claim(engine, claims)] == ["b"]


def test_dead_lets_the_key_go_on_but_parked_holds_it(engine: sa.Engine, claims: ClaimQueries) -> None:
    add_many(engine, [("a", "k1"), ("b", "k1"), ("c", "k2"), ("d", "k2")])
    rows = {r.topic: r for r in claim(engine, claims)}
    with engine.begin() as conn:
        claims.mark_failed(conn, rows["a"].token, [Failure(rows["a"].seq, Status.DEAD, None, "poison")])
        claims.mark_failed(conn, rows["c"].token, [Failure(rows["c"].seq, Status.PARKED, None, "poison")])
        # what the relay does: the rest of each run is released
        claims.release(conn, rows["a"].token, [rows["b"].seq, rows["d"].seq], due_at=utcnow())
    assert [r.topic for r in claim(engine, claims)] == ["b"]  # d stays behind parked c
    assert row_state(engine, rows["a"].seq).due_at is None


@pytest.mark.parametrize("backend", SERVER_BACKENDS)  # SQLite: one relay at a time
def test_concurrent_claims_never_overlap(engine: sa.Engine, claims: ClaimQueries) -> None:
    """Invariant 1: two claim transactions open at once get disjoint rows (SKIP LOCKED)."""
    add_many(engine, [("t", None)] * 50 + [("k", f"key{i}") for i in range(50)])
    with engine.connect() as one, engine.connect() as two:
        one.begin()
        two.begin()
        first = claims.claim_batch(one, limit=60, lease_seconds=30, now=utcnow())
        second = claims.claim_batch(two, limit=60, lease_seconds=30, now=utcnow())
        one.commit()
        two.commit()
    assert len(first) == 60 and len(second) == 40
    assert not {r.seq for r in first} & {r.seq for r in second}


def keyed_seqs(engine: sa.Engine, key: str) -> list[tuple[int, dt.datetime | None, str]]:
    t = tables_for().messages
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.c.seq, t.c.due_at, t.c.status).where(t.c.msg_key == key).order_by(t.c.seq)
        )
        return [(r.seq, r.due_at, r.status) for r in rows]


def test_rows_behind_a_run_leave_the_scan_and_come_back_a_run_at_a_time(engine: sa.Engine) -> None:
    """Invariant 8: a row the scan finds blocked is queued (out of the due_at index) once, and promotion
    brings back exactly one run of its key: claims never re-read the depth of a key."""
    claims = ClaimQueries(tables_for(), dialect_for(engine), run_length=10)
    add_many(engine, [("hot", "k")] * 45 + [("cold", None)] * 3)
    first = claim(engine, claims, limit=100)
    assert [r.topic for r in first].count("hot") == 10 and [r.topic for r in first].count("cold") == 3
    assert first.queued == 35
    again = claim(engine, claims, limit=100)
    assert again == [] and again.queued == 0  # nothing of the key is scanned any more
    state = keyed_seqs(engine, "k")
    assert all(due is None and status == "pending" for _, due, status in state[10:])
    for n in range(1, 5):  # the rest, one run at a time, in seq order
        with engine.begin() as conn:
            claims.mark_delivered(conn, first[0].token, [r.seq for r in first], now=utcnow())
            run_end = [r.seq for r in first if r.key == "k"][-1]
            assert claims.promote(conn, [run_end], now=utcnow()) == min(10, 45 - 10 * n)
        first = claim(engine, claims, limit=100)
        assert [r.seq for r in first] == [seq for seq, _, _ in state[10 * n : 10 * n + 10]]


def test_promotion_waits_while_anything_earlier_holds_the_key(
    engine: sa.Engine, claims: ClaimQueries
) -> None:
    add_many(engine, [("a", "k")])
    (head,) = claim(engine, claims)
    add_many(engine, [("b", "k"), ("c", "k")])
    assert claim(engine, claims).queued == 2
    with engine.begin() as conn:
        assert claims.promote(conn, [head.seq], now=utcnow()) == 0  # a is still in flight
        claims.mark_delivered(conn, head.token, [head.seq], now=utcnow())
        assert claims.promote(conn, [head.seq], now=utcnow()) == 2
    assert [r.topic for r in claim(engine, claims)] == ["b", "c"]


def test_a_key_given_several_finished_rows_is_promoted_from_the_first(
    engine: sa.Engine, claims: ClaimQueries
) -> None:
    """Invariant 9: a promotion after several rows of one key finished in one write (a run's end, a later
    row dead) looks from the first of them: a row between them that still holds the key (a retry
    waiting) keeps the rows behind it queued."""
    add_many(engine, [(topic, "k") for topic in "abcde"] + [(topic, "other") for topic in "xy"])
    t = tables_for().messages
    with engine.begin() as conn:
        seqs = list(conn.execute(sa.select(t.c.seq).where(t.c.msg_key == "k").order_by(t.c.seq)).scalars())
        later = utcnow() + dt.timedelta(hours=1)
        states = [
            (Status.DELIVERED, None),  # a: its run's end
            (Status.FAILED, later),  # b: a retry waiting: it holds the key
            (Status.DEAD, None),  # c: finished with a
            (Status.PENDING, None),  # d, e: queued
            (Status.PENDING, None),
        ]
        for seq, (status, due_at) in zip(seqs, states, strict=True):
            conn.execute(sa.update(t).where(t.c.seq == seq).values(status=status.value, due_at=due_at))
        assert claims.promote(conn, [seqs[2], seqs[0]], now=utcnow()) == 0
        delivered = {"status": Status.DELIVERED.value, "due_at": None}
        conn.execute(sa.update(t).where(t.c.seq == seqs[1]).values(**delivered))
        assert claims.promote(conn, [seqs[2], seqs[0]], now=utcnow()) == 2
    assert [r.topic for r in claim(engine, claims, limit=10)] == ["d", "e", "x", "y"]


@pytest.mark.parametrize("backend", SERVER_BACKENDS)  # SQLite: one relay at a time
def test_two_claims_at_once_never_split_a_key(engine: sa.Engine) -> None:
    """Invariants 1 and 3: a claim that cannot lock a key's earlier rows takes none of the later ones."""
    claims = ClaimQueries(tables_for(), dialect_for(engine), run_length=3)
    add_many(engine, [("hot", "k")] * 10 + [("cold", None)] * 2)
    with engine.connect() as one, engine.connect() as two:
        one.begin()
        two.begin()
        first = claims.claim_batch(one, limit=3, lease_seconds=30, now=utcnow())
        second = claims.claim_batch(two, limit=20, lease_seconds=30, now=utcnow())
        one.commit()
        two.commit()
    assert [r.topic for r in first] == ["hot"] * 3
    assert [r.topic for r in second] == ["cold", "cold"] and second.queued == 0
    later = claim(engine, claims, limit=20)
    assert later == [] and later.queued == 7


def _mark_waits(engine: sa.Engine) -> bool:
    """The delivered mark is running (and so waiting: it cannot finish while the claim holds its lock)."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            sql = (
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
        else:
            sql = "SELECT count(*) FROM information_schema.PROCESSLIST WHERE info LIKE 'UPDATE %delivered%'"
        return bool(conn.execute(sa.text(sql)).scalar())


def _activity(engine: sa.Engine) -> str:
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            sql = "SELECT wait_event_type, query FROM pg_stat_activity WHERE datname = current_database()"
        else:
            sql = "SELECT command, state, info FROM information_schema.PROCESSLIST WHERE db = database()"
        return "\n".join(map(str, conn.execute(sa.text(sql)).all()))


@pytest.mark.parametrize("backend", SERVER_BACKENDS)
def test_a_row_queued_while_its_blocker_finishes_is_promoted(engine: sa.Engine, claims: ClaimQueries) -> None:
    """Invariant 9: the claim that queues rows holds their blocker for share until it commits, so the
    blocker's delivered mark waits and the promotion after it sees the queued rows (no lost wake-up)."""
    add_many(engine, [("a", "k")])
    (head,) = claim(engine, claims)
    add_many(engine, [("b", "k"), ("c", "k")])
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")

    errors: list[BaseException] = []
    events: list[str] = []

    def finish_head() -> None:
        try:
            with autocommit.connect() as conn:
                claims.mark_delivered(conn, head.token, [head.seq], now=utcnow())
                events.append("marked")
                claims.promote(conn, [head.seq], now=utcnow())
        except BaseException as exc:  # shown by the assertion below
            errors.append(exc)

    with engine.connect() as one:
        one.begin()
        assert claims.claim_batch(one, limit=10, lease_seconds=30, now=utcnow()).queued == 2
        finisher = threading.Thread(target=finish_head)
        finisher.start()
        # the mark waits for our commit (or failed: shown below)
        wait_until(lambda: errors or _mark_waits(engine), timeout=10, explain=lambda: _activity(engine))
        events.append("committed")
        one.commit()
    finisher.join(10)
    assert errors == []
    assert events == ["committed", "marked"]  # the mark waited for the claim that queued b and c
    assert [r.topic for r in claim(engine, claims)] == ["b", "c"]


def test_a_claim_stops_at_its_byte_bound_without_skipping_a_row_of_a_key(
    engine: sa.Engine, claims: ClaimQueries
) -> None:
    """Invariant 11: rows past ``max_bytes`` stay for a later claim; a key's run is cut, never holed."""
    pad = "x" * 1000
    with engine.begin() as conn:
        for topic, key in [("k1", "k"), ("u1", None), ("k2", "k"), ("u2", None), ("k3", "k")]:
            outbox.add(conn, topic, {"pad": pad}, key=key)
    with engine.begin() as conn:
        first = claims.claim_batch(conn, limit=10, lease_seconds=30, now=utcnow(), max_bytes=2100)
    assert [r.topic for r in first] == ["k1", "u1"]
    with engine.begin() as conn:  # one row at least, whatever its size
        second = claims.claim_batch(conn, limit=10, lease_seconds=30, now=utcnow(), max_bytes=1)
    assert [r.topic for r in second] == ["u2"] and second.queued == 2  # k2, k3 wait behind k1


def test_an_attempt_is_counted_by_its_outcome_or_its_start_mark(
    engine: sa.Engine, claims: ClaimQueries
) -> None:
    """Invariant 10: claiming counts nothing; a delivered or failed mark counts the attempt, and a start
    mark (for a message taken back from an expired lease) counts it before it runs, once."""
    add_many(engine, [("a", None), ("b", None), ("c", None)])
    rows = {r.topic: r for r in claim(engine, claims)}
    with engine.begin() as conn:
        claims.mark_delivered(conn, rows["a"].token, [rows["a"].seq], now=utcnow())
        claims.mark_failed(conn, rows["b"].token, [Failure(rows["b"].seq, Status.FAILED, utcnow(), "x", 1)])
        assert claims.mark_started(conn, rows["c"].token, rows["c"].seq)
        assert not claims.mark_started(conn, "not-the-token", rows["c"].seq)  # fenced
    assert row_state(engine, rows["c"].seq).attempts == 1  # durable before the handler starts
    with engine.begin() as conn:
        claims.mark_delivered(conn, rows["c"].token, [rows["c"].seq], now=utcnow(), counted=True)
    assert [row_state(engine, rows[t].seq).attempts for t in "abc"] == [1, 1, 1]


def own_runs(token_of: dict[int, str]) -> Callable[[str, int], str | None]:
    """A relay's answer to "which of these rows ends a run of mine?": the rows of ``token_of``."""
    return lambda key, seq: token_of.get(seq)


def pull(engine: sa.Engine, claims: ClaimQueries, *pulls: tuple[str, int, str], limit: int = 100):  # type: ignore[no-untyped-def]
    with engine.begin() as conn:
        return claims.claim_batch(conn, limit=limit, lease_seconds=30, now=utcnow(), pulls=pulls)


def test_a_claim_pulls_a_keys_next_run_behind_its_own_in_flight_run(engine: sa.Engine) -> None:
    """Invariant 12: a claim given the relay's own in-flight run of a key takes the key's next rows
    (queued or due), consecutive, at most ``run_length``, chained behind it (``after``) under a lease
    of its own; a stale token takes nothing, and any other claim leaves the key's rows where they are.
    ``deep`` names the keys with rows left behind what was taken."""
    claims = ClaimQueries(tables_for(), dialect_for(engine), run_length=3)
    add_many(engine, [("hot", "k")] * 8)
    seqs = [seq for seq, _, _ in keyed_seqs(engine, "k")]
    head = claim(engine, claims)
    assert [r.seq for r in head] == seqs[:3] and head.queued == 5 and head.deep == {"k"}
    assert claim(engine, claims) == [], "another relay: nothing of the key is claimable"
    stale = pull(engine, claims, ("k", seqs[2], "not-the-token"))
    assert stale == [] and stale.queued == 0
    chained = pull(engine, claims, ("k", seqs[2], head[0].token))
    assert [r.seq for r in chained] == seqs[3:6] and [r.after for r in chained] == [seqs[2], 0, 0]
    assert chained[0].token != head[0].token and chained.deep == {"k"}
    last = pull(engine, claims, ("k", seqs[5], chained[0].token))
    assert [r.seq for r in last] == seqs[6:8] and last[0].after == seqs[5] and last.deep == set()
    # rows written later are due: the scan finds them behind our run, and chains them the same way
    add_many(engine, [("hot", "k")] * 2)
    with engine.begin() as conn:
        scanned = claims.claim_batch(
            conn, limit=100, lease_seconds=30, now=utcnow(), own=own_runs({seqs[7]: last[0].token})
        )
    assert [r.after for r in scanned] == [seqs[7], 0]


def test_a_pulled_run_has_no_hole_and_leaves_the_scan_its_share(engine: sa.Engine) -> None:
    """Invariants 3 and 12: a pulled run stops before a row of its key that holds the key otherwise
    (here: failed, in retry) and before a row not yet due (a delay); and it takes at most three quarters
    of the claim, so that other messages keep flowing beside a hot key."""
    claims = ClaimQueries(tables_for(), dialect_for(engine), run_length=100)
    add_many(engine, [("hot", "k")] * 4)
    seqs = [seq for seq, _, _ in keyed_seqs(engine, "k")]
    head = claim(engine, claims, limit=1)
    assert [r.seq for r in head] == seqs[:1]
    t = tables_for().messages
    later = utcnow() + dt.timedelta(hours=1)
    with engine.begin() as conn:  # the third row failed once (as if a relay had handled it): it holds
        conn.execute(sa.update(t).where(t.c.seq == seqs[2]).values(status="failed", due_at=later))
    run = pull(engine, claims, ("k", seqs[0], head[0].token))
    assert [r.seq for r in run] == seqs[1:2], "stops before the failed row"
    with engine.begin() as conn:
        conn.execute(sa.update(t).where(t.c.seq == seqs[2]).values(status="pending", due_at=None))
        outbox.add(conn, "hot", {}, key="k", delay=3600)
        for _ in range(6):
            outbox.add(conn, "other", {})
    run2 = pull(engine, claims, ("k", seqs[1], run[0].token), limit=4)
    keyed = [r.seq for r in run2 if r.key == "k"]
    assert keyed == seqs[2:4], "three quarters of the claim at most, and not the delayed row"
    assert len(run2) == 4 and sum(r.key is None for r in run2) == 2, "the scan takes the rest"


def test_a_pull_takes_nearly_the_whole_claim_when_the_last_scan_found_nothing_else(engine: sa.Engine) -> None:
    """Invariant 12: a claim whose caller's last claim scanned nothing but the pulled keys' rows
    (``scan_idle``) pulls up to all but a sixteenth of it; the scan still looks, and says what it found
    (``ClaimResult.others``), so that the next claim gives it back its share if there is other work."""
    claims = ClaimQueries(tables_for(), dialect_for(engine), run_length=100)
    add_many(engine, [("hot", "k")] * 40)
    seqs = [seq for seq, _, _ in keyed_seqs(engine, "k")]
    head = claim(engine, claims, limit=1)
    with engine.begin() as conn:
        busy = claims.claim_batch(
            conn, limit=32, lease_seconds=30, now=utcnow(), pulls=[("k", seqs[0], head[0].token)]
        )
    assert [r.seq for r in busy] == seqs[1:25], "three quarters of 32"
    assert busy.others == 0, "nothing else was due"
    with engine.begin() as conn:
        idle = claims.claim_batch(
            conn,
            limit=32,
            lease_seconds=30,
            now=utcnow(),
            pulls=[("k", seqs[24], busy[0].token)],
            scan_idle=True,
        )
    assert [r.seq for r in idle] == seqs[25:40], "the rest of the key, up to 30 of 32"
    add_many(engine, [("other", None)] * 3 + [("hot", "k")] * 40)
    seqs = [seq for seq, _, _ in keyed_seqs(engine, "k")]
    with engine.begin() as conn:
        found = claims.claim_batch(
            conn,
            limit=32,
            lease_seconds=30,
            now=utcnow(),
            pulls=[("k", seqs[39], idle[0].token)],
            scan_idle=True,
        )
    assert [r.seq for r in found if r.key == "k"] == seqs[40:70], "all but a sixteenth of 32"
    assert [r.key for r in found if r.key != "k"] == [None, None], "the scan's two rows: other work"
    assert found.others == 2


@pytest.mark.parametrize("backend", SERVER_BACKENDS)
def test_a_pulled_run_stops_at_a_row_another_claim_has_locked(engine: sa.Engine) -> None:
    """Invariant 12 with invariant 1: a row of the key locked by another claim right now (it scanned
    it) is skipped, and the pulled run ends before it: never a hole in a key's run."""
    claims = ClaimQueries(tables_for(), dialect_for(engine), run_length=10)
    add_many(engine, [("hot", "k")] * 5)
    seqs = [seq for seq, _, _ in keyed_seqs(engine, "k")]
    head = claim(engine, claims, limit=1)
    t = tables_for().messages
    with engine.connect() as other:
        other.begin()
        other.execute(sa.select(t.c.seq).where(t.c.seq == seqs[3]).with_for_update())
        run = pull(engine, claims, ("k", seqs[0], head[0].token))
        other.rollback()
    assert [r.seq for r in run] == seqs[1:3] and run.deep == {"k"}


@pytest.mark.parametrize("backend", SERVER_BACKENDS)
def test_rows_behind_a_blocker_being_written_are_left_due_and_counted_busy(engine: sa.Engine) -> None:
    """Invariant 9: a blocked row whose blocker is being written right now (a run's end being marked
    delivered) is neither queued nor taken: it stays due, for the next claim, which takes it once
    the write committed. The claim counts it ``busy`` (work found: the relay keeps its claim size)."""
    claims = ClaimQueries(tables_for(), dialect_for(engine), run_length=10)
    add_many(engine, [("hot", "k")] * 3)
    seqs = [seq for seq, _, _ in keyed_seqs(engine, "k")]
    head = claim(engine, claims, limit=1)
    with engine.connect() as completer:
        completer.begin()
        assert claims.mark_delivered(completer, head[0].token, seqs[:1], now=utcnow()) == 1
        found = claim(engine, claims)
        assert (list(found), found.queued, found.busy) == ([], 0, 2)
        completer.commit()
    assert [r.seq for r in claim(engine, claims)] == seqs[1:], "taken as a run once the mark committed"


def test_rows_behind_another_relays_live_run_are_left_to_it(engine: sa.Engine) -> None:
    """Invariant 14: rows blocked behind a row another relay holds in flight under a live lease are
    neither queued nor taken nor counted busy by a claim that knows its own leases (``ours``): that
    relay chains, pulls or queues them itself. Behind the caller's own run, when it does not chain them,
    they are left due as well (counted busy: claimable once its run is marked). Behind an expired lease,
    or for a caller that cannot tell (``ours`` None), they are queued as before."""
    claims = ClaimQueries(tables_for(), dialect_for(engine), run_length=10)
    add_many(engine, [("hot", "k")] * 4)
    seqs = [seq for seq, _, _ in keyed_seqs(engine, "k")]
    head = claim(engine, claims, limit=1)  # another relay's run: the key's head, in flight

    def claim_knowing(mine: set[str], now: dt.datetime | None = None) -> Any:
        with engine.begin() as conn:
            return claims.claim_batch(
                conn, limit=100, lease_seconds=30, now=now or utcnow(), ours=mine.__contains__
            )

    found = claim_knowing(set())
    assert (list(found), found.queued, found.busy, found.elsewhere) == ([], 0, 0, 3)
    assert [due is not None for _, due, _ in keyed_seqs(engine, "k")[1:]] == [True] * 3, "left due"
    found = claim_knowing({head[0].token})  # the caller's own run, not chained behind (no ``own``)
    assert (list(found), found.queued, found.busy, found.elsewhere) == ([], 0, 3, 0)
    assert [due is not None for _, due, _ in keyed_seqs(engine, "k")[1:]] == [True] * 3, "left due"
    with engine.begin() as conn:  # a caller that cannot tell: queued behind the head
        found = claims.claim_batch(conn, limit=100, lease_seconds=30, now=utcnow())
    assert (list(found), found.queued) == ([], 3)
    with engine.begin() as conn:  # back to due, and the head's lease expired: the head is reclaimed
        t = tables_for().messages
        conn.execute(sa.update(t).where(t.c.seq.in_(seqs[1:])).values(due_at=utcnow()))
    later = utcnow() + dt.timedelta(seconds=60)
    assert [r.seq for r in claim_knowing(set(), now=later)] == seqs, "an expired lease is no one's: taken"


def test_a_deep_key_held_by_a_parked_row_leaves_the_scan_ahead_of_it(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant 8: a key with many rows blocked in one scan by a failed or parked row has its next due
    rows queued with them (``QUEUE_AHEAD``), so they stop taking a share of every claim; behind a row
    in flight (a run that its relay chains or pulls) only the scanned rows are queued. Nothing is taken
    either way (invariant 3), and the rows come back by promotion in order."""
    import relay._claim

    monkeypatch.setattr(relay._claim, "DEEP_BLOCKED", 2)
    monkeypatch.setattr(relay._claim, "QUEUE_AHEAD", 3)
    claims = ClaimQueries(tables_for(), dialect_for(engine), run_length=100)
    t = tables_for().messages
    add_many(engine, [("hot", "f")] * 5 + [("hot", "p")] * 9)
    f = [seq for seq, _, _ in keyed_seqs(engine, "f")]
    p = [seq for seq, _, _ in keyed_seqs(engine, "p")]
    assert [r.seq for r in claim(engine, claims, limit=1)] == f[:1]
    with engine.begin() as conn:
        conn.execute(sa.update(t).where(t.c.seq == p[0]).values(status="parked", due_at=None))
    behind_run = claim(engine, claims, limit=4)  # f's rows, behind f's head in flight: no queue ahead
    assert list(behind_run) == [] and behind_run.queued == 4
    found = claim(engine, claims, limit=2)  # p's next two rows: blocked, deep, held back by a parked row
    assert list(found) == [] and found.queued == 2 + 3
    assert [due is None for _, due, _ in keyed_seqs(engine, "p")[1:]] == [True] * 5 + [False] * 3
    with engine.begin() as conn:  # the parked row purged: p's rows come back, in order, as one run
        conn.execute(sa.delete(t).where(t.c.seq == p[0]))
        claims.key_queue.promote_keys(conn, ["p"], now=utcnow())  # as outbox purge does
    assert [r.seq for r in claim(engine, claims, limit=100)] == p[1:]


def test_promotion_brings_back_a_queued_head_and_leaves_a_due_head_to_the_claim(
    engine: sa.Engine, claims: ClaimQueries
) -> None:
    """Invariant 9 (outbox._key_queue): a key whose first pending row is queued is promoted, and the
    promotion says which keys came back; a key whose first pending row is due needs no promotion (a
    claim takes that row, and its run's end promotes the rows behind it)."""
    add_many(engine, [("a", "k")])
    (head,) = claim(engine, claims)
    add_many(engine, [("b", "k"), ("c", "k")])
    assert claim(engine, claims).queued == 2
    t = tables_for().messages
    with engine.begin() as conn:
        claims.mark_delivered(conn, head.token, [head.seq], now=utcnow())
        b = conn.execute(sa.select(sa.func.min(t.c.seq)).where(t.c.status == "pending")).scalar_one()
        conn.execute(sa.update(t).where(t.c.seq == b).values(due_at=utcnow()))  # b due, c queued
        assert claims.promote_by_key(conn, [head.seq], now=utcnow()) == {}
    (taken,) = claim(engine, claims)
    assert taken.topic == "b"
    with engine.begin() as conn:
        claims.mark_delivered(conn, taken.token, [taken.seq], now=utcnow())
        assert claims.promote_by_key(conn, [taken.seq], now=utcnow()) == {"k": 1}
    assert [r.topic for r in claim(engine, claims)] == ["c"]


def test_a_guessed_pull_takes_queued_rows_only(engine: sa.Engine) -> None:
    """Invariant 12: a pull for a contended key (``queued_only``) takes the queued rows right behind the
    relay's run, and stops at a due one (the scan's, chained there)."""
    claims = ClaimQueries(tables_for(), dialect_for(engine), run_length=2)
    add_many(engine, [("hot", "k")] * 4)
    seqs = [seq for seq, _, _ in keyed_seqs(engine, "k")]
    head = claim(engine, claims, limit=2)
    assert [r.seq for r in head] == seqs[:2]

    def guessed_pull():  # type: ignore[no-untyped-def]
        with engine.begin() as conn:
            pulls = [("k", seqs[1], head[0].token)]
            return claims.claim_batch(
                conn, limit=100, lease_seconds=30, now=utcnow(), pulls=pulls, queued_only={"k"}
            )

    due = guessed_pull()
    assert due == [] and due.shallow == {"k"}, "the rows behind are due, not queued: left to the scan"
    assert due.queued == 2, "which (not given the run as its own, as another relay's) queues them"
    queued = guessed_pull()
    assert [r.seq for r in queued] == seqs[2:4] and queued[0].after == seqs[1]


def keep(  # type: ignore[no-untyped-def]
    engine: sa.Engine,
    claims: ClaimQueries,
    token: str,
    ends: list[int],
    *,
    limit: int = 100,
    max_bytes: int = 10**9,
):
    """A run's end as the completer writes it, in one transaction: the run's rows marked delivered, then
    the key's queued run read, taken in part or whole (kept), and what was not taken promoted."""
    with engine.begin() as conn:
        assert claims.mark_delivered(conn, token, ends, now=utcnow()) == len(ends)
        runs = claims.key_queue.queued_runs(conn, [ends[-1]])
        kept, rest = claims.take_queued(
            conn, runs, limit=limit, max_bytes=max_bytes, lease_seconds=30, now=utcnow()
        )
        claims.key_queue.promote_runs(conn, rest.values(), now=utcnow())
    return kept


def test_a_runs_end_keeps_the_keys_next_queued_rows_for_its_relay(engine: sa.Engine) -> None:
    """Invariant 13: in the transaction that marks a run's last row delivered, the relay takes the key's
    queued run (at most ``run_length``) under a lease of its own, as a run of its own, instead of
    promoting it; the rest stays queued, and comes back at the kept run's end."""
    claims = ClaimQueries(tables_for(), dialect_for(engine), run_length=2)
    add_many(engine, [("hot", "k")] * 5)
    seqs = [seq for seq, _, _ in keyed_seqs(engine, "k")]
    head = claim(engine, claims, limit=2)
    assert [r.seq for r in head] == seqs[:2]
    queued = claim(engine, claims)  # another relay's claim: the rows behind head's run leave the scan
    assert queued == [] and queued.queued == 3
    kept = keep(engine, claims, head[0].token, seqs[:2])
    assert [r.seq for r in kept] == seqs[2:4]
    assert {r.after for r in kept} == {0} and kept[0].token != head[0].token
    states = keyed_seqs(engine, "k")
    assert [status for _, _, status in states] == ["delivered"] * 2 + ["inflight"] * 2 + ["pending"]
    assert states[4][1] is None, "the rest stays queued, behind the kept run"
    with engine.begin() as conn:
        assert claims.promote(conn, seqs[:2], now=utcnow()) == 0, "a kept key needs no promotion"
    assert claim(engine, claims) == [], "nothing of the key is claimable while the kept run holds it"
    again = keep(engine, claims, kept[0].token, seqs[2:4])
    assert [r.seq for r in again] == seqs[4:]


def test_a_kept_run_needs_the_key_free_and_queued_rows_right_behind(engine: sa.Engine) -> None:
    """Invariant 13: nothing is kept while an earlier row still holds the key (the run's own last row,
    a mark that was fenced), nor when the rows behind are due (the scan's: a claim takes them) rather
    than queued."""
    claims = ClaimQueries(tables_for(), dialect_for(engine), run_length=2)
    add_many(engine, [("hot", "k")] * 4)
    seqs = [seq for seq, _, _ in keyed_seqs(engine, "k")]
    head = claim(engine, claims, limit=2)
    assert keep(engine, claims, head[0].token, seqs[:1]) == [], "the run's last row still holds the key"
    kept = keep(engine, claims, head[0].token, seqs[1:2])
    assert kept == [], "the rows behind are due, not queued: left to the scan"
    assert [r.seq for r in claim(engine, claims)] == seqs[2:]


def test_a_kept_run_stops_at_its_room_and_at_a_row_promoted_meanwhile(engine: sa.Engine) -> None:
    """Invariant 13: a relay keeps no more than the room left in its window (messages and bytes; a key
    that does not fit at all is promoted), and a key's rows are taken up to the first one that is not
    queued any more (promoted meanwhile by another writer): the rows after it are given back, due, so
    nothing is taken with a hole before it."""
    claims = ClaimQueries(tables_for(), dialect_for(engine), run_length=4)
    add_many(engine, [("hot", "k")] * 5)
    k = [seq for seq, _, _ in keyed_seqs(engine, "k")]
    head = claim(engine, claims, limit=1)
    assert [r.seq for r in head] == k[:1]
    assert claim(engine, claims, limit=4).queued == 4  # k's rows behind the head
    kept = keep(engine, claims, head[0].token, k[:1], limit=2)
    assert [r.seq for r in kept] == k[1:3], "two rows of room: two rows kept"
    assert [due for _, due, _ in keyed_seqs(engine, "k")][3:] == [None, None], "the rest stays queued"
    nothing = keep(engine, claims, kept[0].token, k[1:3], max_bytes=1)
    assert nothing == [], "no byte room: the key is promoted instead"
    assert all(due is not None for _, due, _ in keyed_seqs(engine, "k")[3:])

    # another key: its queued run read, then its middle row promoted by someone else before the take
    t = tables_for().messages
    add_many(engine, [("hot", "j")] * 4)
    j = [seq for seq, _, _ in keyed_seqs(engine, "j")]
    with engine.begin() as conn:
        conn.execute(sa.update(t).where(t.c.msg_key == "k").values(status="delivered", due_at=None))
    j_head = claim(engine, claims, limit=1)
    assert [r.seq for r in j_head] == j[:1]
    assert claim(engine, claims, limit=4).queued == 3
    with engine.begin() as conn:
        assert claims.mark_delivered(conn, j_head[0].token, j[:1], now=utcnow()) == 1
        runs = claims.key_queue.queued_runs(conn, j[:1])
        assert [seq for seq, *_ in runs["j"]] == j[1:]
        conn.execute(sa.update(t).where(t.c.seq == j[2]).values(due_at=utcnow()))  # promoted meanwhile
        taken, rest = claims.take_queued(
            conn, runs, limit=10, max_bytes=10**9, lease_seconds=30, now=utcnow()
        )
    assert [r.seq for r in taken] == j[1:2] and rest == {}, "taken up to the row that was not queued"
    states = keyed_seqs(engine, "j")
    assert [status for _, _, status in states] == ["delivered", "inflight", "pending", "pending"]
    assert states[3][1] is not None, "the row after it was given back, due (never taken across a hole)"
    with engine.connect() as conn:
        assert conn.execute(sa.select(t.c.lease_token).where(t.c.seq == j[3])).scalar() is None


def test_a_kept_run_stops_at_a_row_of_its_key_held_under_another_lease(engine: sa.Engine) -> None:
    """Invariants 3 and 13: a key's queued run ends at its first row holding the key otherwise. After a
    crash, a claim may queue a dead relay's expired rows behind the key's head while later rows of that
    relay are still in flight (their lease expires later): the run's end keeps only the queued rows
    before the one in flight, and neither keeps nor promotes the rows after it (they wait for it)."""
    claims = ClaimQueries(tables_for(), dialect_for(engine), run_length=10)
    t = tables_for().messages
    add_many(engine, [("hot", "k")] * 5)
    k = [seq for seq, _, _ in keyed_seqs(engine, "k")]
    head = claim(engine, claims, limit=1)
    assert claim(engine, claims, limit=10).queued == 4
    later = utcnow() + dt.timedelta(seconds=30)
    with engine.begin() as conn:  # the dead relay's row, in flight under its lease
        conn.execute(
            sa.update(t).where(t.c.seq == k[2]).values(status="inflight", lease_token="other", due_at=later)
        )
    with engine.connect() as conn, conn.begin() as tx:  # a promotion instead, rolled back
        assert claims.mark_delivered(conn, head[0].token, k[:1], now=utcnow()) == 1
        assert claims.promote(conn, k[:1], now=utcnow()) == 1, "promoted up to the row in flight"
        tx.rollback()
    kept = keep(engine, claims, head[0].token, k[:1])
    assert [r.seq for r in kept] == k[1:2], "kept up to the row in flight, never across it"
    states = keyed_seqs(engine, "k")
    assert [(due, status) for _, due, status in states[3:]] == [(None, "pending")] * 2, "they wait for it"


def test_a_deep_scan_of_one_key_finds_every_row_holding_it_between_and_before(engine: sa.Engine) -> None:
    """Invariants 3 and 8 with many rows of one key in a scan (on MariaDB these are probed with
    constants, per key, after the scan: ``PROBE_BY_KEY``): a row in flight under another lease between
    the scanned rows blocks those after it, and a failed row before them blocks them all."""
    claims = ClaimQueries(tables_for(), dialect_for(engine))
    t = tables_for().messages
    add_many(engine, [("hot", "k")] * 8)
    seqs = [seq for seq, _, _ in keyed_seqs(engine, "k")]
    later = utcnow() + dt.timedelta(hours=1)
    with engine.begin() as conn:  # the 4th row in flight under another relay's lease
        conn.execute(
            sa.update(t)
            .where(t.c.seq == seqs[3])
            .values(status="inflight", lease_token="x" * 32, due_at=later)
        )
    taken = claim(engine, claims)
    assert [r.seq for r in taken] == seqs[:3], "the rows after the one in flight wait behind it"
    assert taken.queued == 4
    assert [due for _, due, _ in keyed_seqs(engine, "k")][4:] == [None] * 4

    add_many(engine, [("hot", "j")] * 6)
    j = [seq for seq, _, _ in keyed_seqs(engine, "j")]
    with engine.begin() as conn:  # the key's first row failed, its retry an hour away
        conn.execute(sa.update(t).where(t.c.seq == j[0]).values(status="failed", due_at=later))
    blocked = claim(engine, claims)
    assert [r.seq for r in blocked if r.key == "j"] == [], "nothing passes the failed row before them"
    assert [due for _, due, _ in keyed_seqs(engine, "j")][1:] == [None] * 5


def routed_claim(engine: sa.Engine, claims: ClaimQueries, routes: Topics, **options: Any):  # type: ignore[no-untyped-def]
    with engine.begin() as conn:
        options.setdefault("limit", 100)
        return claims.claim_batch(conn, lease_seconds=30, now=utcnow(), topics=routes, **options)


def test_a_claim_takes_only_the_topics_its_relay_routes(engine: sa.Engine, claims: ClaimQueries) -> None:
    """Invariant 15: a claim given topics (names and shell patterns) takes rows of those topics only;
    the others stay exactly as they were (pending, due, attempts 0, no lease), and a key's row behind a
    row of another topic waits for it (queued), whatever relay routes it. Patterns match as the
    registry does: case-sensitive, ``_`` and ``.`` literal, a class exact once the row is read."""
    t = tables_for().messages
    add_many(
        engine,
        [
            ("a.one", None),
            ("c.one", None),
            ("a.two", "k"),
            ("c.two", "k"),  # k's second row: another relay's topic
            ("a.three", "k"),
            ("A.one", None),  # another case: not a.*
            ("a_x", None),  # "_" is no wildcard: not a.x
            ("b7", None),
        ],
    )
    seq = {topic: s for s, topic in _seqs_by_topic(engine).items()}
    before = {s: row_state(engine, s) for s in seq.values()}
    taken = routed_claim(engine, claims, Topics.of(["a.*", "a.x", "b[0-9]"]))
    assert [r.topic for r in taken] == ["a.one", "a.two", "b7"]
    assert taken.queued == 1 and row_state(engine, seq["a.three"]).due_at is None, "waits behind c.two"
    for topic in ("c.one", "c.two", "A.one", "a_x"):
        after = row_state(engine, seq[topic])
        assert (after.status, after.attempts, after.lease_token) == ("pending", 0, None), topic
        assert after.due_at == before[seq[topic]].due_at, topic
    assert routed_claim(engine, claims, Topics.of(["a.*"])) == [], "nothing more for this relay"
    # the relay that routes c.* takes them; k's c.two waits for a.two, in flight
    other = routed_claim(engine, claims, Topics.of(["c.*", "A.one"]))
    assert [r.topic for r in other] == ["c.one", "A.one"]
    with engine.begin() as conn:  # a.two delivered: its key's next run comes back (c.two, then a.three)
        claims.mark_delivered(conn, taken[1].token, [seq["a.two"]], now=utcnow())
        claims.promote(conn, [seq["a.two"]], now=utcnow())
    assert routed_claim(engine, claims, Topics.of(["a.*"])) == [], "a.three still waits for c.two"
    c_two = routed_claim(engine, claims, Topics.of(["c.*"]))
    assert [r.topic for r in c_two] == ["c.two"], "c.two, not a.three: the run stops at the topic"
    assert row_state(engine, seq["a.three"]).status == "pending"
    with engine.begin() as conn:
        conn.execute(sa.update(t).where(t.c.seq == seq["a.three"]).values(due_at=utcnow()))
    assert routed_claim(engine, claims, Topics.of(["a.*"])) == [], "blocked by c.two in flight"


def _seqs_by_topic(engine: sa.Engine) -> dict[int, str]:
    t = tables_for().messages
    with engine.connect() as conn:
        return {row.seq: row.topic for row in conn.execute(sa.select(t.c.seq, t.c.topic).order_by(t.c.seq))}


def test_pulled_and_kept_runs_stop_at_a_topic_their_relay_does_not_route(engine: sa.Engine) -> None:
    """Invariant 15 with invariants 12 and 13: a pull behind the relay's own run, and a run's end that
    keeps the key's queued run, both stop at the key's first row of a topic the relay does not route;
    that row is left due (or promoted) for a relay that routes it, and the rows after it wait for it."""
    claims = ClaimQueries(tables_for(), dialect_for(engine), run_length=10)
    routes = Topics.of(["a"])
    add_many(engine, [("a", "k")])
    head = routed_claim(engine, claims, routes)
    assert len(head) == 1
    add_many(engine, [("a", "k"), ("a", "k"), ("c", "k"), ("a", "k")])
    k = [s for s, _, _ in keyed_seqs(engine, "k")]
    with engine.begin() as conn:
        pulled = claims.claim_batch(
            conn,
            limit=100,
            lease_seconds=30,
            now=utcnow(),
            pulls=[("k", k[0], head[0].token)],
            topics=routes,
        )
    assert [r.seq for r in pulled] == k[1:3] and pulled[0].after == k[0], "stops before the c row"
    c_row = row_state(engine, k[3])
    assert (c_row.status, c_row.attempts, c_row.lease_token) == ("pending", 0, None)
    assert c_row.due_at is not None, "left due, for the relay that routes c"
    assert row_state(engine, k[4]).due_at is None, "the a row behind it waits for it (queued)"
    # the c row queued too (another relay's claim found it behind our run): our run's end keeps none of
    # the queued run, which starts with it, and promotes it all
    t = tables_for().messages
    with engine.begin() as conn:
        conn.execute(sa.update(t).where(t.c.seq == k[3]).values(due_at=None))
        assert claims.mark_delivered(conn, head[0].token, k[:1], now=utcnow()) == 1
        assert claims.mark_delivered(conn, pulled[0].token, k[1:3], now=utcnow()) == 2
        runs = claims.key_queue.queued_runs(conn, [k[2]])
        assert [seq for seq, *_ in runs["k"]] == k[3:]
        kept, rest = claims.take_queued(
            conn, runs, limit=10, max_bytes=10**9, lease_seconds=30, now=utcnow(), topics=routes
        )
        assert kept == [] and list(rest) == ["k"]
        claims.key_queue.promote_runs(conn, rest.values(), now=utcnow())
    assert [(status, due is not None) for _, due, status in keyed_seqs(engine, "k")][3:] == [
        ("pending", True),
        ("pending", True),
    ]
    # a relay that routes c takes it; at its run's end it keeps nothing of a's, and promotes nothing
    # either way: the a row is due already
    c_claim = routed_claim(engine, claims, Topics.of(["c"]))
    assert [r.seq for r in c_claim] == [k[3]]
    assert routed_claim(engine, claims, routes) == [], "the a row waits for the c row in flight"


# --- rows committed late: concurrent writers of one key (seq is the insert's order, not the commit's) ---


def late_row_between(
    engine: sa.Engine, claims: ClaimQueries, before: int, after: int
) -> tuple[list[int], Any]:
    """Key ``k``: ``before`` rows committed, then a row inserted by a transaction that commits only after
    ``after`` more rows were committed and a claim took what it could see. Returns the key's seqs in order
    and that claim's result."""
    add_many(engine, [("hot", "k")] * before)
    with engine.connect() as late:
        late.begin()
        outbox.add(late, "hot", {"late": True}, key="k")
        add_many(engine, [("hot", "k")] * after)
        taken = claim(engine, claims)
        late.commit()
    return [seq for seq, _, _ in keyed_seqs(engine, "k")], taken


def claim_as_relay(engine: sa.Engine, claims: ClaimQueries, token: str, last: int) -> Any:
    """A claim as the relay holding lease ``token`` makes it: its own leases known, and its run ending
    with row ``last`` one it may chain behind."""
    with engine.begin() as conn:
        return claims.claim_batch(
            conn,
            limit=100,
            lease_seconds=30,
            now=utcnow(),
            ours={token}.__contains__,
            own=lambda key, seq: token if seq == last else None,
        )


@pytest.mark.parametrize("backend", SERVER_BACKENDS)  # SQLite: one writer at a time, no late commit
def test_a_row_committed_late_behind_a_row_inside_the_callers_run_is_left_due(engine: sa.Engine) -> None:
    """A row committed after later rows of its key were taken waits behind a row inside the caller's run,
    which it cannot chain behind. It is left due (counted busy), not queued: a run's end promotes what
    follows its last row only, so queued there it would hold back its key (and every row written after
    it) until the maintenance sweep. Once that run is delivered, the next claim takes it."""
    claims = ClaimQueries(tables_for(), dialect_for(engine), run_length=10)
    (first, late, last), run = late_row_between(engine, claims, before=1, after=1)
    assert [r.seq for r in run] == [first, last], "the late row was not visible yet"
    token = run[0].token
    found = claim_as_relay(engine, claims, token, last)
    assert (list(found), found.queued, found.busy) == ([], 0, 1)
    assert row_state(engine, late).due_at is not None, "left due, not set aside"
    with engine.begin() as conn:
        claims.mark_delivered(conn, token, [first, last], now=utcnow())
    assert [r.seq for r in claim(engine, claims)] == [late]


@pytest.mark.parametrize("backend", SERVER_BACKENDS)  # SQLite: one writer at a time, no late commit
def test_a_claim_takes_no_chained_run_beside_a_head_run_of_the_same_key(engine: sa.Engine) -> None:
    """A row committed late with nothing earlier holding its key is a head run; the rows behind the
    caller's run of the same key are then not chained by the same claim (the relay would hand the two
    out as one run: the chained rows before the run they follow was delivered). They stay due for the
    next claim."""
    claims = ClaimQueries(tables_for(), dialect_for(engine), run_length=10)
    (late, *runs), run = late_row_between(engine, claims, before=0, after=2)
    assert [r.seq for r in run] == runs
    add_many(engine, [("hot", "k")])
    behind = keyed_seqs(engine, "k")[-1][0]
    found = claim_as_relay(engine, claims, run[0].token, runs[-1])
    assert [(r.seq, r.after) for r in found] == [(late, 0)]
    assert found.busy == 1 and row_state(engine, behind).due_at is not None
    again = claim_as_relay(engine, claims, run[0].token, runs[-1])
    assert [(r.seq, r.after) for r in again] == [(behind, runs[-1])], "chained by the next claim"
