"""The claim path's invariants, checked statement by statement on each database (see relay/claim.py)."""

from __future__ import annotations

import datetime as dt
import time

import pytest
import sqlalchemy as sa

import outbox
from outbox.dialects import dialect_for
from outbox.schema import Status, tables_for
from outbox.writer import utcnow
from relay.claim import ClaimQueries, Failure
from tests.conftest import SERVER_BACKENDS


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


def test_claim_takes_only_the_head_of_each_key(engine: sa.Engine, claims: ClaimQueries) -> None:
    add_many(engine, [("a", "k1"), ("b", "k1"), ("c", "k2"), ("d", None), ("e", None), ("f", "k2")])
    rows = claim(engine, claims)
    assert sorted(r.topic for r in rows) == ["a", "c", "d", "e"]
    assert len({r.token for r in rows}) == 1
    assert all(r.attempts == 1 for r in rows)
    # nothing more is claimable until the heads finish
    assert claim(engine, claims) == []
    with engine.begin() as conn:
        claims.mark_delivered(
            conn, rows[0].token, [r.seq for r in rows if r.topic in ("a", "c")], now=utcnow()
        )
    assert sorted(r.topic for r in claim(engine, claims)) == ["b", "f"]


def test_delayed_message_is_claimed_only_when_due(engine: sa.Engine, claims: ClaimQueries) -> None:
    with engine.begin() as conn:
        outbox.add(conn, "later", {}, delay=60)
    assert claim(engine, claims) == []
    assert [r.topic for r in claim(engine, claims, now=utcnow() + dt.timedelta(seconds=61))] == ["later"]


def test_expired_lease_is_fenced(engine: sa.Engine, claims: ClaimQueries) -> None:
    """Invariant 2: once a lease is reclaimed, the old token can neither mark, fail, release nor renew."""
    add_many(engine, [("t", "k")])
    (first,) = claim(engine, claims, lease=0.2)
    assert claim(engine, claims) == []  # live lease: nobody else gets it
    time.sleep(0.3)
    (second,) = claim(engine, claims)  # lease expired: reclaimed with a new token
    assert second.seq == first.seq and second.token != first.token and second.attempts == 2
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


def test_release_gives_the_attempt_back(engine: sa.Engine, claims: ClaimQueries) -> None:
    add_many(engine, [("t", "k")])
    (row,) = claim(engine, claims)
    with engine.begin() as conn:
        assert claims.release(conn, row.token, [row.seq], due_at=utcnow()) == 1
    state = row_state(engine, row.seq)
    assert (state.status, state.attempts, state.lease_token) == ("pending", 0, None)
    (again,) = claim(engine, claims)
    assert again.seq == row.seq and again.attempts == 1


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
        claims.mark_delivered(conn, rows["c"].token, [rows["c"].seq], now=utcnow())
    assert claim(engine, claims) == []  # b waits behind failed a
    later = claim(engine, claims, now=retry_at + dt.timedelta(seconds=1))
    assert [r.topic for r in later] == ["a"] and later[0].attempts == 2
    assert row_state(engine, rows["a"].seq).last_error == "boom"


def test_dead_lets_the_key_go_on_but_parked_holds_it(engine: sa.Engine, claims: ClaimQueries) -> None:
    add_many(engine, [("a", "k1"), ("b", "k1"), ("c", "k2"), ("d", "k2")])
    rows = {r.topic: r for r in claim(engine, claims)}
    with engine.begin() as conn:
        claims.mark_failed(conn, rows["a"].token, [Failure(rows["a"].seq, Status.DEAD, None, "poison")])
        claims.mark_failed(conn, rows["c"].token, [Failure(rows["c"].seq, Status.PARKED, None, "poison")])
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
