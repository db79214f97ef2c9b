"""The relay's heartbeat (relay._heartbeat) on each database: its row says it is alive and what it did,
its per-minute rows count every outcome and latency, a failing write never disturbs delivery, and old
rows go away."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time

import pytest
import sqlalchemy as sa

import outbox
from consumers import Registry
from outbox._clock import utcnow
from outbox._message import Message
from outbox._schema import LATENCY_BUCKETS_MS, tables_for
from relay import Relay
from relay._heartbeat import latency_bucket
from tests.conftest import status_counts, wait_until

T = tables_for()


def registry_failing(poison: str) -> Registry:
    registry = Registry()

    @registry.handler("orders.*")
    def deliver(message: Message) -> None:
        pass

    @registry.handler(poison, max_attempts=1)
    def fail(message: Message) -> None:
        raise RuntimeError("no")

    return registry


def test_a_relay_writes_its_row_and_counts_each_minute(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        for n in range(30):
            outbox.add(conn, "orders.created", {"n": n})
        outbox.add(conn, "mail.poison", {"n": 0})
    relay = Relay(engine, registry_failing("mail.poison"), poll_interval=0.05, name="relay-a")
    with relay:
        with engine.connect() as conn:  # the first beat is written at start
            row = conn.execute(sa.select(T.relays)).one()
        assert (row.relay_id, row.pid, row.version, row.stopped_at) == (
            "relay-a",
            os.getpid(),
            outbox.__version__,
            None,
        )
        assert row.routes == "mail.poison, orders.*"
        wait_until(lambda: status_counts(engine) == {"delivered": 30, "dead": 1}, what="the drain")
    with engine.connect() as conn:
        row = conn.execute(sa.select(T.relays)).one()
        minutes = conn.execute(sa.select(T.stats)).all()
    assert (row.delivered, row.failed, row.dead) == (30, 0, 1)
    assert row.stopped_at is not None and row.progress_at is not None and row.seen_at >= row.progress_at
    assert sum(m.delivered for m in minutes) == 30 and sum(m.dead for m in minutes) == 1
    assert all(m.relay_id == "relay-a" and m.minute.second == 0 for m in minutes)
    buckets = [sum(column) for column in zip(*(json.loads(m.latency) for m in minutes), strict=True)]
    assert len(buckets) == len(LATENCY_BUCKETS_MS) + 1 and sum(buckets) == 30

    # a restart under the same name: its row describes this start
    with Relay(engine, registry_failing("mail.poison"), poll_interval=0.05, name="relay-a"):
        with engine.connect() as conn:
            again = conn.execute(sa.select(T.relays)).one()
        assert again.started_at > row.started_at and again.stopped_at is None and again.delivered == 0


def test_latency_buckets() -> None:
    assert latency_bucket(0) == 0 and latency_bucket(1) == 0 and latency_bucket(1.01) == 1
    assert latency_bucket(45) == LATENCY_BUCKETS_MS.index(50)
    assert latency_bucket(10**9) == len(LATENCY_BUCKETS_MS)


def test_a_failing_heartbeat_never_disturbs_delivery(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    with engine.begin() as conn:
        T.stats.drop(conn)  # every beat with outcomes now fails
    with engine.begin() as conn:
        for n in range(20):
            outbox.add(conn, "orders.created", {"n": n})
    with (
        caplog.at_level(logging.WARNING, logger="outbox.relay"),
        Relay(engine, registry_failing("mail.poison"), poll_interval=0.05),
    ):
        wait_until(lambda: status_counts(engine) == {"delivered": 20}, what="delivery despite the heartbeat")
    warnings = [r.getMessage() for r in caplog.records if "heartbeat not written" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once per outage, not once per beat


def test_rows_older_than_the_retention_go_away(engine: sa.Engine) -> None:
    old = utcnow() - dt.timedelta(days=9)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(T.stats).values(
                minute=old.replace(second=0, microsecond=0),
                relay_id="gone",
                delivered=1,
                failed=0,
                dead=0,
                latency="[]",
            )
        )
        conn.execute(
            sa.insert(T.relays).values(
                relay_id="gone",
                host="h",
                pid=1,
                version="0",
                routes="*",
                started_at=old,
                seen_at=old,
                delivered=0,
                failed=0,
                dead=0,
            )
        )
        conn.execute(
            sa.insert(T.audit).values(at=old, who="x", client="-", action="replay", target="t", count=1)
        )
    with Relay(engine, registry_failing("mail.poison"), poll_interval=0.05, name="fresh"):
        pass
    with engine.connect() as conn:
        assert conn.execute(sa.select(T.relays.c.relay_id)).scalars().all() == ["fresh"]
        assert conn.execute(sa.select(sa.func.count()).select_from(T.stats)).scalar() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(T.audit)).scalar() == 0


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"], indirect=True)
def test_a_stuck_heartbeat_never_holds_a_relays_stop(engine: sa.Engine) -> None:
    """A heartbeat write that cannot finish (here its row is locked by another transaction, as a frozen
    or partitioned database would leave it) delays a stop by STOP_WAIT seconds at most."""
    from relay._heartbeat import STOP_WAIT

    with engine.begin() as conn:
        outbox.add(conn, "orders.created", {"n": 1})
    relay = Relay(engine, registry_failing("mail.poison"), poll_interval=0.05, name="held").start()
    wait_until(lambda: status_counts(engine) == {"delivered": 1}, what="delivery")
    blocker = engine.connect()
    try:
        blocker.begin()
        blocker.execute(sa.select(T.relays).where(T.relays.c.relay_id == "held").with_for_update())
        started = time.monotonic()
        relay.stop()
        took = time.monotonic() - started
    finally:
        blocker.rollback()
        blocker.close()
    assert took < STOP_WAIT + 5, f"the stop took {took:.1f}s"
