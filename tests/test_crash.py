"""A relay killed with ``kill -9`` loses nothing: its rows come back after the lease, and a relay that
stalled past its lease cannot change what its successor did (fencing).

Every relay here is a real ``outbox relay`` subprocess on a real PostgreSQL or MariaDB database,
killed or frozen with real signals. SQLite is left out: it runs one relay at a time, and a new relay
takes a dead relay's rows back at start (``relay._runner``), so leases never decide anything there.
"""

from __future__ import annotations

import datetime as dt
import random
import re
import signal
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from outbox._clock import utcnow
from outbox._schema import Status, tables_for
from relay.maintenance import MAINTENANCE_LOCK
from tests.apps import RelayLauncher, RelayProcess, outbox_rows
from tests.apps.freezing import EMPTY_ENV, FREEZE_ENV
from tests.apps.recording import (
    commit_messages,
    count_done,
    create_handled_table,
    first_handling_order,
    handled_rows,
    read_record,
)
from tests.conftest import SERVER_BACKENDS, status_counts, wait_until
from tests.test_metrics import Scraper

pytestmark = pytest.mark.parametrize("backend", SERVER_BACKENDS, indirect=True)

LEASE = 2  # seconds: short, so that killed relays' rows come back quickly
KILLS = 5


def inflight_claimed_since(engine: sa.Engine, since: dt.datetime) -> int:
    """Rows in flight under a claim made after ``since`` (``last_attempt_at`` is the claim time)."""
    t = tables_for("outbox").messages
    query = sa.select(sa.func.count()).where(
        t.c.status == Status.INFLIGHT.value, t.c.last_attempt_at >= since
    )
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def time_to_kill(
    engine: sa.Engine, record: Path, target: int, relay: RelayProcess, since: dt.datetime
) -> bool:
    """``target`` handlings are done and the relay holds rows of its own right now (or it died: fail fast)."""
    if not relay.alive():
        return True
    return count_done(record) >= target and inflight_claimed_since(engine, since) > 0


def all_delivered(engine: sa.Engine, total: int) -> bool:
    return status_counts(engine).get(Status.DELIVERED.value, 0) == total


def takeover_state(engine: sa.Engine, record: Path, successor: RelayProcess) -> str:
    """The rows, the record and the successor's log: what a takeover that never came looked like."""
    rows = "\n".join(
        f"  {r.seq} {r.status} attempts={r.attempts} due_at={r.due_at} token={r.lease_token}"
        for r in outbox_rows(engine).values()
    )
    handlings = "\n".join(f"  {h}" for h in read_record(record))
    return f"now {utcnow()}\nrows:\n{rows}\nrecord:\n{handlings}\nsuccessor's log:\n{successor.log_tail()}"


def take_over(
    engine: sa.Engine, relays: RelayLauncher, record: Path, options: dict[str, Any]
) -> RelayProcess:
    """Start a second relay and wait until it has taken the one message over and delivered it."""
    successor = relays.start(**options)
    wait_until(
        lambda: all_delivered(engine, 1),
        timeout=30,
        what="the second relay to take over and deliver",
        explain=partial(takeover_state, engine, record, successor),
    )
    return successor


@pytest.mark.slow
def test_killed_relay_loses_nothing(engine: sa.Engine, relays: RelayLauncher, record: Path) -> None:
    # 3000 messages: 50 keys of 50 messages each (payload index = position within the key), and 500 unkeyed.
    plan: list[tuple[str | None, int]] = []
    per_key: Counter[str] = Counter()
    for n in range(3000):
        key = None if n % 6 == 0 else f"key-{n % 50}"
        if key is None:
            plan.append((None, n))
        else:
            plan.append((key, per_key[key]))
            per_key[key] += 1
    committed = commit_messages(engine, plan)
    total = len(committed)

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    options = {"lease_seconds": LEASE, "batch_size": 100, "poll_interval": 0.05, "stop_timeout": 10}
    # A small sleep per handling keeps deliveries and marks interleaved, so that a kill lands with
    # handlers running, handled-but-unmarked rows and claimed-but-unstarted rows all at once.
    relays.env["OUTBOX_TEST_SLEEP"] = "0.003"
    claimed_at_kill: list[int] = []
    for _ in range(KILLS):
        since = utcnow()
        relay = relays.start(**options)
        target = count_done(record) + rng.randint(50, 300)
        wait_until(
            partial(time_to_kill, engine, record, target, relay, since),
            timeout=45,
            what="deliveries to progress before the kill",
        )
        assert relay.alive(), f"relay exited on its own:\n{relay.log_tail()}"
        relay.kill()
        claimed_at_kill.append(inflight_claimed_since(engine, since))
    # Each kill is decided while the relay holds rows of its own, but it may finish the last few in the
    # instant before SIGKILL lands; most kills must still have caught it holding rows, or the test
    # would prove nothing about crashes.
    assert sum(1 for held in claimed_at_kill if held) >= KILLS - 2, claimed_at_kill

    final = relays.start(**options)
    wait_until(lambda: all_delivered(engine, total), timeout=60, what=f"all {total} messages delivered")
    final.send(signal.SIGTERM)
    assert final.wait_exit(timeout=15) == 0, final.log_tail()

    rows = outbox_rows(engine)
    assert set(rows) == set(committed)
    assert {r.status for r in rows.values()} == {Status.DELIVERED.value}
    assert [r for r in rows.values() if r.lease_token is not None or r.due_at is not None] == []

    done = [h for h in read_record(record) if h.event == "done"]
    handled_ids = Counter(h.message_id for h in done)
    assert set(handled_ids) == set(committed), "a committed message was never handled"
    for h in done:  # the handler saw the message that was committed, not another one
        assert (h.key, h.index) == committed[h.message_id]

    # Order per key survives the crashes: after dropping duplicates, each key's messages were handled
    # exactly in the order they were committed.
    order = first_handling_order((h.key, h.index, h.message_id) for h in done)
    for key, indexes in order.items():
        assert indexes == list(range(per_key[key])), f"{key} handled out of order: {indexes}"

    duplicates = sum(handled_ids.values()) - len(handled_ids)
    print(
        f"\n{total} messages, {KILLS} kills (seed {seed}), rows held at each kill: {claimed_at_kill}; "
        f"{duplicates} duplicate handling(s) of {sum(1 for n in handled_ids.values() if n > 1)} message(s)"
    )


@pytest.mark.slow
def test_killed_relay_rows_come_back_after_lease(
    engine: sa.Engine, relays: RelayLauncher, record: Path
) -> None:
    committed = commit_messages(engine, [(None, i) for i in range(40)], sleep=0.3)
    options = {"lease_seconds": 3, "batch_size": 10, "workers": 4, "poll_interval": 0.1}
    first = relays.start(**options)
    wait_until(lambda: count_done(record) >= 4, timeout=30, what="the first relay to handle a few messages")
    first.kill()
    killed_at = utcnow()

    rows = outbox_rows(engine)
    orphans = {mid: r for mid, r in rows.items() if r.status == Status.INFLIGHT.value}
    assert orphans, "the kill should have caught claimed rows"
    assert all(r.lease_token is not None for r in orphans.values())
    # The leases were live when the relay died (renewed every lease/3), so nothing may take the rows
    # before they expire.
    assert any(r.due_at > killed_at for r in orphans.values())

    second = relays.start(**options)
    wait_until(lambda: all_delivered(engine, len(committed)), timeout=60, what="every message delivered")
    second.send(signal.SIGTERM)
    assert second.wait_exit(timeout=15) == 0, second.log_tail()

    rows = outbox_rows(engine)
    for mid, orphan in orphans.items():
        row = rows[mid]
        assert row.status == Status.DELIVERED.value
        # Taken back only once the dead relay's lease had expired, and counted as a second attempt.
        assert row.delivered_at >= orphan.due_at, (mid, row.delivered_at, orphan.due_at)
        assert row.attempts == 1, (mid, row.attempts)  # the killed attempt had no outcome: not counted
    handlers = {h.message_id: h.pid for h in read_record(record) if h.event == "done" and h.pid == second.pid}
    assert set(orphans) <= set(handlers), "the second relay should have handled every orphaned row"


@pytest.mark.slow
@pytest.mark.parametrize("handler", ["plain", "session"])
def test_relay_stalled_past_its_lease_is_fenced(
    engine: sa.Engine, relays: RelayLauncher, record: Path, handler: str
) -> None:
    if handler == "session":
        relays.app = "tests.apps.recording:session_registry"
        create_handled_table(engine)
    # The handler works 2 s: long enough to freeze the relay in the middle of it.
    (message_id,) = commit_messages(engine, [("k", 0)], sleep=2.0)
    options = {"lease_seconds": LEASE, "workers": 1, "poll_interval": 0.1, "stop_timeout": 20}
    stalled = relays.start(**options)
    wait_until(
        lambda: any(h.event == "start" for h in read_record(record)),
        timeout=30,
        what="the first relay's handler",
    )
    stalled.send(signal.SIGSTOP)  # a GC pause, a VM freeze: the process holds a lease it cannot renew
    frozen_token = outbox_rows(engine)[message_id].lease_token
    assert frozen_token is not None

    successor = take_over(engine, relays, record, options)
    after_takeover = outbox_rows(engine)[message_id]
    assert after_takeover.attempts == 1  # the successor's start mark; the stalled attempt had no outcome

    # Let the frozen relay run again: its handler finishes and it tries to mark the message delivered
    # with a token that no longer holds the row. Then stop it gracefully, so that every outcome it had
    # is written (or fenced off) before we look.
    stalled.send(signal.SIGCONT)
    wait_until(
        lambda: any(h.event == "done" and h.pid == stalled.pid for h in read_record(record)),
        timeout=30,
        what="the stalled relay's handler to finish",
    )
    stalled.send(signal.SIGTERM)
    assert stalled.wait_exit(timeout=30) == 0, stalled.log_tail()
    successor.send(signal.SIGTERM)
    assert successor.wait_exit(timeout=15) == 0, successor.log_tail()

    row = outbox_rows(engine)[message_id]
    # Nothing the fenced relay wrote stuck: same status, same delivery time, same attempts, no error.
    assert (row.status, row.delivered_at, row.attempts, row.lease_token, row.last_error) == (
        Status.DELIVERED.value,
        after_takeover.delivered_at,
        1,
        None,
        None,
    )
    finished_by = sorted(h.pid for h in read_record(record) if h.event == "done")
    assert finished_by == sorted([stalled.pid, successor.pid])  # both handlers really ran to the end
    if handler == "session":
        # Its database work was rolled back with its delivered mark: one committed handling, the successor's.
        assert [(r.message_id, r.pid) for r in handled_rows(engine)] == [(message_id, successor.pid)]


FREEZE_POINTS = {
    # the renewal: the only update that starts by setting due_at
    "renewal": ({FREEZE_ENV: r"^UPDATE \S+ SET due_at="}),
    # a claim that found nothing (the outbox table is aliased "c" in the claim's statements only)
    "empty-claim": ({FREEZE_ENV: r"FROM \S+ AS c\b", EMPTY_ENV: "1"}),
}


def lease_holder(engine: sa.Engine) -> str | None:
    locks = tables_for().locks
    with engine.connect() as conn:
        holder = conn.execute(sa.select(locks.c.holder).where(locks.c.name == MAINTENANCE_LOCK)).scalar()
    return None if holder is None else str(holder)


@pytest.mark.slow
def test_relay_frozen_taking_the_maintenance_lease_holds_no_lock(
    engine: sa.Engine, relays: RelayLauncher
) -> None:
    """The maintenance lease is written in autocommit too: a relay frozen right after taking it (its
    UPDATE run, its COMMIT not yet sent) does not keep the lease's row locked, so another relay takes
    the lease over once it expires instead of waiting on the lock for as long as the freeze lasts."""
    locks = tables_for().locks
    with engine.begin() as conn:  # an expired lease, so that the first relay's UPDATE takes it
        conn.execute(sa.insert(locks).values(name=MAINTENANCE_LOCK, holder="gone", expires_at=utcnow()))
    options = {"lease_seconds": LEASE, "maintenance_interval": 0.5, "poll_interval": 0.1}
    relays.app = "tests.apps.freezing:registry"
    relays.env[FREEZE_ENV] = r"^UPDATE \S+_locks SET holder="
    frozen = relays.start(**options)
    wait_until(frozen.stopped, timeout=30, what="the first relay to freeze after taking the lease")
    del relays.env[FREEZE_ENV]
    successor = relays.start(**options)
    wait_until(
        lambda: f":{successor.pid}:" in (lease_holder(engine) or ""),
        timeout=LEASE + 20,
        what="the second relay to take the expired maintenance lease over",
        explain=lambda: f"holder {lease_holder(engine)!r}; successor log:\n{successor.log_tail()}",
    )
    frozen.send(signal.SIGCONT)
    for relay in (frozen, successor):
        relay.send(signal.SIGTERM)
    assert frozen.wait_exit(timeout=30) == 0, frozen.log_tail()
    assert successor.wait_exit(timeout=15) == 0, successor.log_tail()


@pytest.mark.slow
@pytest.mark.parametrize("point", list(FREEZE_POINTS))
def test_relay_frozen_mid_write_holds_no_row(
    engine: sa.Engine, relays: RelayLauncher, record: Path, point: str
) -> None:
    """Invariant 7 of ``relay._claim``: a relay frozen mid-write keeps no row locked from its successor.

    The relay holds the message's lease and freezes the instant a statement has run, before anything
    else it would send (such as a COMMIT): right after renewing its lease, or after a claim (it claims
    every poll interval) that found nothing. Had either been left in an open transaction holding a lock
    on the row, the row would stay locked for as long as the relay is frozen, and every other relay's
    claim would skip it.
    """
    (message_id,) = commit_messages(engine, [("k", 0)], sleep=3.0)  # outlives the first renewal (lease/3)
    options = {"lease_seconds": LEASE, "workers": 1, "poll_interval": 0.1, "stop_timeout": 20}
    relays.app = "tests.apps.freezing:registry"
    freeze = FREEZE_POINTS[point]
    relays.env.update(freeze)
    frozen = relays.start(**options)
    wait_until(frozen.stopped, timeout=30, what=f"the first relay to freeze after its {point}")
    assert outbox_rows(engine)[message_id].status == Status.INFLIGHT.value
    assert not read_record(record) or read_record(record)[-1].event == "start"

    for name in freeze:
        del relays.env[name]
    successor = take_over(engine, relays, record, options)
    assert outbox_rows(engine)[message_id].attempts == 1  # the successor's start mark

    frozen.send(signal.SIGCONT)
    for relay in (frozen, successor):
        relay.send(signal.SIGTERM)
    assert frozen.wait_exit(timeout=30) == 0, frozen.log_tail()
    assert successor.wait_exit(timeout=15) == 0, successor.log_tail()
    done = sorted(h.pid for h in read_record(record) if h.event == "done")
    assert successor.pid in done, "the successor should have handled the message"
    row = outbox_rows(engine)[message_id]
    assert (row.status, row.attempts, row.lease_token) == (Status.DELIVERED.value, 1, None)


@pytest.mark.slow
def test_relay_thawed_after_its_leases_expired_starts_none_of_their_handlers(
    engine: sa.Engine, relays: RelayLauncher, record: Path
) -> None:
    """A relay frozen while it holds a claimed batch (one worker: one handler running, the rest queued)
    until its lease expires and another relay has delivered everything: thawed, it finishes the handler
    that was running, and starts none of the queued ones (their lease is gone by its own clock: each
    is released, not attempted), so no handler runs after the key's next message started elsewhere."""
    commit_messages(engine, [(None, i) for i in range(10)], sleep=0.5)
    options = {
        "lease_seconds": LEASE,
        "workers": 1,
        "batch_size": 10,
        "poll_interval": 0.1,
        "stop_timeout": 20,
    }
    frozen = relays.start(**options, metrics_port=0, metrics_host="127.0.0.1")
    wait_until(
        lambda: any(h.event == "start" for h in read_record(record)), timeout=30, what="the first handler"
    )
    port = re.search(r"serving /metrics.* on http://127\.0\.0\.1:(\d+)", frozen.log_path.read_text())
    assert port is not None, frozen.log_tail()
    scrape = Scraper(int(port[1]))
    frozen.send(signal.SIGSTOP)
    wait_until(frozen.stopped, timeout=10, what="the relay frozen")
    started_before = [h.message_id for h in read_record(record) if h.event == "start" and h.pid == frozen.pid]
    assert 1 <= len(started_before) < 10

    successor = relays.start(**options)
    wait_until(
        lambda: all_delivered(engine, 10),
        timeout=60,
        what="the successor to deliver everything",
        explain=partial(takeover_state, engine, record, successor),
    )
    frozen.send(signal.SIGCONT)
    wait_until(
        lambda: scrape.value("outbox_relay_in_flight") == 0,
        timeout=30,
        what="the thawed relay done with its batch",
        explain=frozen.log_tail,
    )
    frozen.send(signal.SIGTERM)
    assert frozen.wait_exit(timeout=30) == 0, frozen.log_tail()
    successor.send(signal.SIGTERM)
    assert successor.wait_exit(timeout=15) == 0, successor.log_tail()

    started_by_frozen = [
        h.message_id for h in read_record(record) if h.event == "start" and h.pid == frozen.pid
    ]
    assert started_by_frozen == started_before, "the thawed relay started a handler whose lease had expired"
    assert "lease expired before its handler could start" in frozen.log_path.read_text(errors="replace")
    assert all_delivered(engine, 10)
