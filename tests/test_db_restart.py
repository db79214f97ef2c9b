"""A relay rides out a PostgreSQL restart: it reconnects by itself, loses nothing, and the outage never
counts against a message (no failed or dead status, no recorded error).

The database is a throwaway cluster (``tests.pgcluster``) that the test stops with ``pg_ctl stop -m
fast`` (every connection cut, open transactions rolled back) while a writer keeps committing and a
real ``outbox relay`` subprocess keeps delivering.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import orm

import outbox
from outbox._dialects import is_outage
from outbox._schema import Status
from tests.apps import RelayLauncher, RelayProcess, outbox_rows
from tests.apps.recording import TOPIC, create_handled_table, first_handling_order, handled_rows, read_record
from tests.conftest import wait_until
from tests.pgcluster import PgCluster, throwaway_cluster

KEYS = 10
OUTAGE_SECONDS = 5.0
RESTARTS = 2


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    with throwaway_cluster() as running:
        yield running


class Writer(threading.Thread):
    """Commits one message every ~10 ms until stopped, through outages, and knows what it committed.

    A write that fails before its commit is simply not committed (its transaction is gone with the
    connection). A write whose COMMIT itself fails is in doubt: the server may or may not have
    committed it, so it is kept apart in ``in_doubt``; it must not be delivered unless it exists.
    """

    def __init__(self, engine: sa.Engine) -> None:
        super().__init__(name="writer", daemon=True)
        self.engine = engine
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.committed: dict[str, tuple[str | None, int]] = {}
        self.in_doubt: dict[str, tuple[str | None, int]] = {}
        self.failures = 0
        self.error: BaseException | None = None
        self._next_index: Counter[str | None] = Counter()

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            key = None if n % 5 == 0 else f"key-{n % KEYS}"
            n += 1
            # Indexes grow with every attempt, committed or not: per key, commit order = index order.
            index = self._next_index[key]
            self._next_index[key] += 1
            if self._write(key, index):
                self.halt.wait(0.01)
            else:
                self.failures += 1
                self.halt.wait(0.05)

    def _write(self, key: str | None, index: int) -> bool:
        message_id = None
        try:
            with self.engine.connect() as conn:
                transaction = conn.begin()
                message_id = str(outbox.add(conn, TOPIC, {"i": index}, key=key))
                try:
                    transaction.commit()
                except Exception:
                    with self.lock:
                        self.in_doubt[message_id] = (key, index)
                    raise
        except Exception as exc:
            # Not only DBAPIError: the outage may surface as PendingRollbackError, see
            # test_write_cut_by_an_outage_raises_the_database_error.
            if not is_outage(exc):
                self.error = exc
                raise
            return False
        with self.lock:
            self.committed[message_id] = (key, index)
        return True

    def committed_ids(self) -> list[str]:
        with self.lock:
            return list(self.committed)


def undelivered(engine: sa.Engine, ids: list[str]) -> list[str]:
    rows = outbox_rows(engine)
    return [m for m in ids if m not in rows or rows[m].status != Status.DELIVERED.value]


def await_fresh_deliveries(engine: sa.Engine, writer: Writer, count: int = 50) -> None:
    """Wait for ``count`` more commits, then for those messages to be delivered."""
    already = len(writer.committed_ids())
    wait_until(lambda: len(writer.committed_ids()) >= already + count, timeout=30, what="writes to resume")
    fresh = writer.committed_ids()[already : already + count]
    wait_until(lambda: not undelivered(engine, fresh), timeout=30, what="delivery of fresh messages")


def hold_outage(relay: RelayProcess, seconds: float) -> None:
    """Keep the database down for ``seconds`` (the outage is the point), checking the relay stays up."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert relay.alive(), f"relay died during the outage:\n{relay.log_tail()}"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("handler", ["plain", "session"])
def test_relay_survives_postgres_restart(cluster: PgCluster, tmp_path: Path, handler: str) -> None:
    url = cluster.create_database("outbox_restart")
    engine = outbox.create_engine(url)
    with engine.begin() as conn:
        outbox.upgrade(conn)
    record = tmp_path / "handled.log"
    env = {"OUTBOX_TEST_RECORD": str(record)}
    app = "tests.apps.recording:registry"
    if handler == "session":
        # The session handler keeps its transaction open 50 ms, and the writer keeps 4 workers about
        # busy: each restart cuts handler transactions mid-way, which must be released, not failed.
        app = "tests.apps.recording:session_registry"
        env["OUTBOX_TEST_SLEEP"] = "0.05"
        create_handled_table(engine)
    launcher = RelayLauncher(tmp_path, url, app, env=env)
    writer = Writer(engine)
    try:
        # Lease well above the outage (plus the relay's reconnect backoff), so that leases do not expire
        # while the database is away: what is tested here is the outage, not the lease.
        relay = launcher.start(lease_seconds=20, poll_interval=0.2, batch_size=50, workers=4, stop_timeout=10)
        writer.start()
        wait_until(lambda: len(writer.committed_ids()) >= 100, timeout=30, what="the writer to get going")
        wait_until(
            lambda: not undelivered(engine, writer.committed_ids()[:50]), timeout=30, what="first deliveries"
        )

        for _ in range(RESTARTS):
            failures_before = writer.failures
            cluster.stop("fast")
            hold_outage(relay, OUTAGE_SECONDS)
            cluster.start()
            assert writer.failures > failures_before, "the writer should have run into the outage"
            # Reconnected by itself: messages committed after the restart get delivered.
            await_fresh_deliveries(engine, writer)

        writer.halt.set()
        writer.join(timeout=10)
        assert writer.error is None, f"the writer failed: {writer.error!r}"
        committed = writer.committed_ids()
        wait_until(
            lambda: not undelivered(engine, committed), timeout=60, what="every committed message delivered"
        )
        assert relay.alive(), relay.log_tail()
        relay.send(signal.SIGTERM)
        assert relay.wait_exit(timeout=20) == 0, relay.log_tail()
    finally:
        writer.halt.set()
        launcher.cleanup()

    rows = outbox_rows(engine)
    handled = handled_rows(engine) if handler == "session" else []
    engine.dispose()
    assert set(committed) <= set(rows)
    assert set(rows) <= set(committed) | set(writer.in_doubt), "a row nobody committed"
    # Never failed, dead or in error: ``last_error`` is written with every failed attempt and never
    # cleared by a delivery, so NULL everywhere means no attempt was ever counted as failed.
    assert Counter(r.status for r in rows.values()) == {Status.DELIVERED.value: len(rows)}
    assert [r for r in rows.values() if r.last_error is not None or r.lease_token is not None] == []

    handlings = read_record(record)
    done = [h for h in handlings if h.event == "done"]
    assert {h.message_id for h in done} >= set(rows)
    expected = {**writer.in_doubt, **writer.committed}
    if handler == "session":
        # Exactly one committed handling per message: interrupted transactions left nothing behind.
        assert Counter(r.message_id for r in handled) == Counter(list(rows))
        order = first_handling_order((r.msg_key, r.idx, r.message_id) for r in handled)
        interrupted = sum(1 for h in handlings if h.event == "start") - len(handled)
        assert interrupted > 0, "the restarts should have cut handler transactions"
    else:
        order = first_handling_order((h.key, h.index, h.message_id) for h in done)
        interrupted = 0
    for key, indexes in order.items():
        assert indexes == sorted(i for m, (k, i) in expected.items() if k == key and m in rows), key

    duplicates = len(done) - len({h.message_id for h in done})
    print(
        f"\n{handler}: {len(rows)} messages over {RESTARTS} restarts, {writer.failures} failed writes, "
        f"{len(writer.in_doubt)} in doubt, {duplicates} duplicate handling(s), {interrupted} interrupted "
        f"handler transaction(s), max attempts {max(r.attempts for r in rows.values())}"
    )


@pytest.mark.parametrize("form", ["connection", "session"])
def test_write_cut_by_an_outage_raises_the_database_error(cluster: PgCluster, form: str) -> None:
    # Business code retries a transaction cut by a database restart by catching the driver's error
    # (sqlalchemy.exc.OperationalError). Writing to the outbox in that transaction must not change
    # the error it gets.
    url = cluster.create_database("outbox_write")
    engine = outbox.create_engine(url)
    with engine.begin() as conn:
        outbox.upgrade(conn)
    with pytest.raises(sa.exc.OperationalError):
        if form == "connection":
            with engine.begin() as conn:
                outbox.add(conn, TOPIC, {"i": 0})
                cluster.stop("fast")
                conn.execute(sa.text("SELECT 1"))
        else:
            with orm.Session(engine) as session, session.begin():
                outbox.add(session, TOPIC, {"i": 0})
                cluster.stop("fast")
                session.execute(sa.text("SELECT 1"))
    cluster.start()
    assert outbox_rows(engine) == {}  # and nothing was committed
    engine.dispose()
