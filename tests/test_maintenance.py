"""Built-in maintenance (``relay.maintenance``): retention deletes only what it should, in small batches,
while relays keep delivering; one relay at a time holds the maintenance lease; a relay killed with its
lease held is reported by another relay's monitor, which then takes its messages back.

Relays that are killed are real ``outbox relay`` subprocesses (``kill -9``); the relays that watch are
in-process, so the test can read their monitor's findings directly.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import outbox
from consumers import Registry
from consumers._inbox import Inbox
from outbox._clock import utcnow
from outbox._schema import Status, tables_for
from outbox.writer import Outbox
from relay import Relay
from relay._runner import AWAKE_SECONDS
from relay.maintenance import MAINTENANCE_LOCK, Maintenance, StuckFindings
from relay.metrics import RelayMetrics
from tests.apps import RelayLauncher
from tests.apps.recording import TOPIC, read_record
from tests.apps.recording import registry as recording_registry
from tests.conftest import SERVER_BACKENDS, status_counts, wait_until

T = tables_for().messages
LOCKS = tables_for().locks
servers_only = pytest.mark.parametrize("backend", SERVER_BACKENDS, indirect=True)


def insert_quietly(engine: sa.Engine, topic: str, count: int, *, key: str | None = None) -> list[uuid.UUID]:
    """Insert ``count`` pending messages without waking any relay (no commit hook, no NOTIFY)."""
    writer = Outbox(notify=False)
    rows = [writer.build_row(topic, {"i": i}, key=key) for i in range(count)]
    with engine.begin() as conn:
        for start in range(0, len(rows), 1000):
            conn.execute(sa.insert(T), rows[start : start + 1000])
    return [row["id"] for row in rows]


def some_handler() -> Registry:
    """A registry with one handler, of a topic these tests never write: a relay needs somewhere to
    deliver to start, and this one delivers nothing."""
    registry = Registry()
    registry.add("maintenance.unused", lambda message: None)
    return registry


def set_rows(engine: sa.Engine, topic: str, **values: Any) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(T).where(T.c.topic == topic).values(**values))


def count_topic(engine: sa.Engine, topic: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).where(T.c.topic == topic)).scalar_one())


def lock_holder(engine: sa.Engine) -> tuple[str, dt.datetime] | None:
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(LOCKS.c.holder, LOCKS.c.expires_at).where(LOCKS.c.name == MAINTENANCE_LOCK)
        ).first()
    return None if row is None else (str(row.holder), row.expires_at)


# --- retention ------------------------------------------------------------------------------------------


def test_retention_deletes_only_old_delivered_while_relays_deliver(engine: sa.Engine) -> None:
    now = utcnow()
    old, recent, far = now - dt.timedelta(days=10), now - dt.timedelta(hours=1), now + dt.timedelta(days=1)
    insert_quietly(engine, "old.delivered", 5000)
    set_rows(engine, "old.delivered", status=Status.DELIVERED.value, due_at=None, delivered_at=old)
    # Everything else must survive, however old: recent deliveries, and every status that is not delivered
    # (given an old delivered_at too where that is possible, so only the status protects them).
    keep: dict[str, dict[str, Any]] = {
        "recent.delivered": {"status": Status.DELIVERED.value, "due_at": None, "delivered_at": recent},
        "old.dead": {"status": Status.DEAD.value, "due_at": None, "delivered_at": old, "created_at": old},
        "old.parked": {"status": Status.PARKED.value, "due_at": None, "delivered_at": old, "created_at": old},
        "old.failed": {"status": Status.FAILED.value, "due_at": far, "delivered_at": old, "created_at": old},
        "old.pending": {"status": Status.PENDING.value, "due_at": far, "created_at": old},
        "old.inflight": {"status": Status.INFLIGHT.value, "due_at": far, "lease_token": "f" * 32},
    }
    for topic, values in keep.items():
        insert_quietly(engine, topic, 50)
        set_rows(engine, topic, **values)

    delivered_at: list[dt.datetime] = []
    registry = Registry()

    @registry.handler("live.stream")
    def record(message: outbox.Message) -> None:
        delivered_at.append(utcnow())

    written: list[uuid.UUID] = []
    stop_writing = threading.Event()

    def write_stream() -> None:
        while not stop_writing.is_set():
            with engine.begin() as conn:
                written.append(outbox.add(conn, "live.stream", {"n": len(written)}))
            time.sleep(0.005)

    relay = Relay(engine, registry, poll_interval=0.1, lease_seconds=5, maintenance_interval=0.5)
    assert relay.maintenance is not None
    relay.maintenance.batch_size = 500
    relay.maintenance.batch_pause = 0.05
    writer = threading.Thread(target=write_stream, daemon=True)
    writer.start()
    wait_until(lambda: len(written) > 20, what="the stream to start")
    with relay:
        maintenance = relay.maintenance
        wait_until(lambda: maintenance.deleted_total == 5000, timeout=60, what="retention")
        run = maintenance.last_retention
        wait_until(lambda: len(delivered_at) > 100, what="the stream to keep flowing")
        stop_writing.set()
        writer.join()
        wait_until(
            lambda: status_counts(engine).get("delivered", 0) >= len(written) + 50,
            timeout=30,
            what="every stream message delivered",
        )
    assert run is not None
    assert maintenance.deleted_total == 5000
    assert run.batches >= 10, run  # 500 rows per transaction, never one big DELETE
    # The relay delivered while retention was deleting: deliveries fall inside the run's window.
    window_end = run.started_at + dt.timedelta(seconds=run.seconds)
    assert any(run.started_at <= at <= window_end for at in delivered_at), (run, delivered_at[:3])
    for topic in keep:
        assert count_topic(engine, topic) == 50, topic
    assert count_topic(engine, "live.stream") == len(written)
    with engine.connect() as conn:
        undelivered = conn.execute(
            sa.select(sa.func.count()).where(T.c.topic == "live.stream", T.c.status != "delivered")
        ).scalar_one()
    assert undelivered == 0


def test_retention_off_deletes_nothing(engine: sa.Engine) -> None:
    insert_quietly(engine, "old.delivered", 10)
    set_rows(
        engine,
        "old.delivered",
        status="delivered",
        due_at=None,
        delivered_at=utcnow() - dt.timedelta(days=99),
    )
    with Relay(engine, some_handler(), retention=None, maintenance_interval=0.1) as relay:
        assert relay.maintenance is not None
        maintenance = relay.maintenance
        wait_until(lambda: maintenance.findings is not None, what="a maintenance tick")
    assert maintenance.last_retention is None
    assert count_topic(engine, "old.delivered") == 10


# --- the maintenance lease ------------------------------------------------------------------------------


@pytest.fixture
def relays(tmp_path: Path, db_url: str) -> Iterator[RelayLauncher]:
    record = tmp_path / "handled.log"
    launcher = RelayLauncher(
        tmp_path,
        db_url,
        "tests.apps.recording:registry",
        env={"OUTBOX_TEST_RECORD": str(record), "OUTBOX_TEST_SLEEP": "60"},
    )
    try:
        yield launcher
    finally:
        launcher.cleanup()


@servers_only
def test_one_relay_at_a_time_holds_the_maintenance_lease(
    engine: sa.Engine, db_url: str, relays: RelayLauncher
) -> None:
    # A subprocess relay takes the lease first.
    first = relays.start(lease_seconds=2, maintenance_interval=0.2, poll_interval=0.2)
    wait_until(
        lambda: (held := lock_holder(engine)) is not None and f":{first.pid}:" in held[0],
        timeout=30,
        what="the first relay to hold the maintenance lease",
    )
    options: dict[str, Any] = {"lease_seconds": 2, "maintenance_interval": 0.2, "poll_interval": 0.2}
    second = Relay(db_url, recording_registry, **options).start()
    third: Relay | None = None
    try:
        assert second.maintenance is not None
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # several of its ticks: it never takes a live lease
            assert not second.maintenance.holds_lease
            time.sleep(0.05)
        held = lock_holder(engine)
        assert held is not None and f":{first.pid}:" in held[0]
        expires_before_kill = held[1]

        first.kill()  # kill -9: the lease is not released, it expires
        wait_until(lambda: second.maintenance is not None and second.maintenance.holds_lease, timeout=10)
        taken_at = utcnow()
        assert taken_at >= expires_before_kill, "took over a lease that had not expired"
        held = lock_holder(engine)
        assert held is not None and held[0] == second.name

        # A graceful stop releases the lease: the next relay takes it at once, not after expiry.
        third = Relay(db_url, recording_registry, **options).start()
        assert third.maintenance is not None
        time.sleep(0.5)  # a few ticks of both: still exactly one holder
        assert [second.maintenance.holds_lease, third.maintenance.holds_lease] == [True, False]
        stopped_at = time.monotonic()
        second.stop()
        wait_until(
            lambda: third is not None and third.maintenance is not None and third.maintenance.holds_lease
        )
        assert time.monotonic() - stopped_at < 1.5, "the stopped relay did not release the lease"
        # Only the holder applies retention.
        wait_until(
            lambda: third is not None and third.maintenance is not None and third.maintenance.last_retention
        )
    finally:
        second.stop()
        if third is not None:
            third.stop()


# --- the stuck monitor ----------------------------------------------------------------------------------


@servers_only
def test_killed_relay_lease_is_reported_and_reclaimed(
    engine: sa.Engine, db_url: str, relays: RelayLauncher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="outbox.maintenance")
    seen: list[StuckFindings] = []
    gauge: list[float | None] = []  # outbox_expired_leases as a scrape at that moment would show it
    metrics = RelayMetrics(interval=0.5, process=False)
    # The watcher polls only every 30 s and nothing wakes it (quiet inserts): only its monitor can make it
    # take the dead relay's messages back within seconds.
    watcher = Relay(
        db_url,
        recording_registry,
        lease_seconds=2,
        poll_interval=30,
        maintenance_interval=0.2,
        observers=[metrics],
    )
    assert watcher.maintenance is not None

    def observe(findings: StuckFindings) -> None:
        seen.append(findings)
        gauge.append(metrics.registry.get_sample_value("outbox_expired_leases"))

    watcher.maintenance.add_observer(observe)
    watcher.start()
    try:
        wait_until(lambda: watcher.maintenance is not None and watcher.maintenance.holds_lease)
        # Its start woke it (LISTEN set up): let it fall asleep again, or it takes the quiet inserts itself.
        time.sleep(AWAKE_SECONDS + 0.25)
        doomed = relays.start(lease_seconds=2, poll_interval=0.05)  # its handlers sleep 60 s
        ids = insert_quietly(engine, TOPIC, 5)
        record = relays.env["OUTBOX_TEST_RECORD"]
        wait_until(
            lambda: len(read_record(Path(record))) == 5, timeout=30, what="the doomed relay to start all five"
        )
        assert status_counts(engine).get("inflight") == 5
        doomed.kill()
        killed_at = time.monotonic()

        wait_until(
            lambda: status_counts(engine).get("delivered") == 5,
            timeout=20,
            what="the watcher to take the messages back and deliver them",
        )
        assert time.monotonic() - killed_at < 15, "reclaimed by polling, not because the monitor saw it"
    finally:
        watcher.stop()

    reports = [f for f in seen if f.expired_messages]
    assert reports, "the monitor never saw the expired lease"
    assert set(reports[0].expired_ids) == set(ids)
    assert reports[0].expired_leases >= 1 and reports[0].reported
    assert watcher.maintenance.findings is not None
    assert watcher.maintenance.findings.expired_leases_total >= 1
    # The metrics count it: the gauge showed the expired lease, the counter the five messages taken back.
    assert max(v or 0 for v in gauge) >= 1
    assert metrics.registry.get_sample_value("outbox_messages_reclaimed_total") == 5
    warnings = [r for r in caplog.records if r.name == "outbox.maintenance" and r.levelno == logging.WARNING]
    assert any("expired" in r.getMessage() and all(str(i) in r.getMessage() for i in ids) for r in warnings)


def test_monitor_reports_overdue_messages_and_held_keys(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="outbox.maintenance")
    now = utcnow()
    [blocker] = insert_quietly(engine, "stuck.first", 1, key="customer-7")
    waiting = insert_quietly(engine, "stuck.later", 3, key="customer-7")
    [lonely] = insert_quietly(engine, "stuck.alone", 1)
    fresh = insert_quietly(engine, "fresh", 2, key="customer-8")
    # The first message of customer-7 keeps failing (next retry in an hour); the later ones have been due
    # for ten minutes behind it. One unkeyed message is ten minutes overdue: no relay runs.
    set_rows(engine, "stuck.first", status="failed", due_at=now + dt.timedelta(hours=1), attempts=3)
    set_rows(engine, "stuck.later", due_at=now - dt.timedelta(minutes=10))
    set_rows(engine, "stuck.alone", due_at=now - dt.timedelta(minutes=10))

    maintenance = Maintenance(
        engine, tables_for(), holder="test-monitor", stuck_after=dt.timedelta(minutes=5)
    )
    assert maintenance.hold_lease()
    findings = maintenance.check()

    assert findings.stuck_messages == 4
    assert set(findings.stuck_ids) == {*waiting, lonely}
    assert findings.held_key_count == 1
    assert findings.held_keys == (("customer-7", blocker, "failed"),)
    assert findings.expired_messages == 0
    assert not set(fresh) & set(findings.stuck_ids)
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(lonely) in text and "customer-7" in text and str(blocker) in text
    assert findings.stuck_topics == (("stuck.later", 3), ("stuck.alone", 1))
    assert "by topic: stuck.later 3, stuck.alone 1" in text
    maintenance.release_lease()


def test_monitor_names_the_waiting_topics_its_relay_does_not_route(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A message no relay routes waits, attempts untouched (relay._claim, invariant 15): the stuck
    monitor of a relay without a handler for it names the topic and says what to start."""
    caplog.set_level(logging.WARNING, logger="outbox.maintenance")
    [lost] = insert_quietly(engine, "nobody.listens", 1)
    set_rows(engine, "nobody.listens", due_at=utcnow() - dt.timedelta(minutes=10))
    relay = Relay(engine, some_handler(), stuck_after=dt.timedelta(minutes=5), maintenance_interval=0.1)
    with relay:
        assert relay.maintenance is not None
        maintenance = relay.maintenance
        wait_until(lambda: maintenance.findings is not None, what="a maintenance tick")
    findings = maintenance.findings
    assert findings is not None
    assert findings.stuck_ids == (lost,) and findings.unrouted_topics == ("nobody.listens",)
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "no handler or publisher for nobody.listens" in text
    with engine.connect() as conn:
        t = tables_for().messages
        assert conn.execute(sa.select(t.c.status, t.c.attempts).where(t.c.id == lost)).one() == ("pending", 0)
    assert lock_holder(engine) is None


# --- inbox retention ------------------------------------------------------------------------------------

INBOX = tables_for().inbox


def insert_inbox(engine: sa.Engine, group: str, count: int, processed_at: dt.datetime) -> list[uuid.UUID]:
    """``count`` inbox rows of consumer ``group``, processed at ``processed_at``."""
    ids = [uuid.uuid4() for _ in range(count)]
    rows = [
        {"consumer_group": group, "message_id": i, "topic": "t", "processed_at": processed_at} for i in ids
    ]
    with engine.begin() as conn:
        for start in range(0, len(rows), 1000):
            conn.execute(sa.insert(INBOX), rows[start : start + 1000])
    return ids


def inbox_rows(engine: sa.Engine) -> set[tuple[str, uuid.UUID]]:
    with engine.connect() as conn:
        return {(r.consumer_group, r.message_id) for r in conn.execute(sa.select(INBOX))}


def test_inbox_retention_deletes_only_old_inbox_rows_in_batches(engine: sa.Engine) -> None:
    """The lease holder deletes the consumers' inbox rows processed longer than the retention ago, of
    every group, in small batches; younger rows stay, so their redeliveries are still skipped."""
    now = utcnow()
    old = insert_inbox(engine, "billing", 700, now - dt.timedelta(days=10))
    old += insert_inbox(engine, "shipping", 500, now - dt.timedelta(days=8))
    young = {("billing", i) for i in insert_inbox(engine, "billing", 30, now - dt.timedelta(days=6))}
    young |= {("shipping", i) for i in insert_inbox(engine, "shipping", 20, now - dt.timedelta(minutes=1))}

    relay = Relay(engine, some_handler(), poll_interval=0.1, lease_seconds=5, maintenance_interval=0.2)
    assert relay.maintenance is not None
    maintenance = relay.maintenance
    maintenance.batch_size = 250
    maintenance.max_batches = 2  # 500 rows per run at most: the rest goes on at the next tick
    with relay:
        wait_until(lambda: maintenance.inbox_deleted_total == 1200, timeout=30, what="inbox retention")
        run = maintenance.last_inbox_retention
    assert run is not None and run.batches <= 2 and run.deleted <= 500, run
    assert inbox_rows(engine) == young, "exactly the rows older than the retention (7 days) are gone"
    with engine.connect() as conn:
        assert not Inbox(tables_for(), "billing").contains(conn, old[0]), "a redelivery: handled again"
        assert Inbox(tables_for(), "billing").contains(conn, next(i for g, i in young if g == "billing"))

    off = Maintenance(engine, tables_for(), holder="retention-off", retention=None)
    with pytest.raises(ValueError, match="retention is off"):
        off.apply_inbox_retention()
