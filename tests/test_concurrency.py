"""Several relays on one database: each message handled once, order per key kept, failures included."""

from __future__ import annotations

import signal
import threading
from collections import defaultdict
from pathlib import Path

import pytest
import sqlalchemy as sa

import outbox
from consumers import Registry
from outbox._message import Message
from outbox._schema import tables_for
from relay import Relay
from tests.apps import RelayLauncher
from tests.apps.recording import commit_messages, count_done
from tests.conftest import SERVER_BACKENDS, status_counts, wait_until

TOTAL = 10_000
KEYS = 250  # coprime with 3, so every key gets messages


def write_backlog(engine: sa.Engine, total: int) -> None:
    """``total`` messages: two thirds over KEYS keys, the rest unkeyed; payload i is the insertion index."""
    with engine.begin() as conn:
        for i in range(total):
            key = f"key-{i % KEYS}" if i % 3 else None
            outbox.add(conn, "work", {"i": i}, key=key)


@pytest.mark.parametrize("backend", SERVER_BACKENDS)  # SQLite: one relay at a time, tested below
def test_three_relays_deliver_each_once(engine: sa.Engine) -> None:
    lock = threading.Lock()
    successes: list[tuple[str | None, int]] = []
    handled: dict[str, int] = defaultdict(int)
    failures_left = {i for i in range(0, TOTAL, 37)}  # these fail once, then succeed on retry
    active_keys: set[str] = set()
    overlaps: list[str] = []

    def make_registry() -> Registry:
        registry = Registry()

        @registry.handler("work", backoff_initial=0.05, backoff_max=0.2)
        def work(message: Message) -> None:
            index = message.payload["i"]
            with lock:
                if message.key is not None:
                    if message.key in active_keys:
                        overlaps.append(message.key)
                    active_keys.add(message.key)
            try:
                with lock:
                    should_fail = index in failures_left
                    failures_left.discard(index)
                if should_fail:
                    raise RuntimeError(f"transient failure of {index}")
                with lock:
                    successes.append((message.key, index))
                    handled[str(message.id)] += 1
            finally:
                with lock:
                    active_keys.discard(message.key or "")

        return registry

    write_backlog(engine, TOTAL)
    relays = [
        Relay(
            outbox.create_engine(engine.url.render_as_string(hide_password=False)),
            make_registry(),
            batch_size=100,
            workers=4,
            poll_interval=0.05,
            name=f"relay-{n}",
        )
        for n in range(3)
    ]
    for relay in relays:
        relay.start()
    try:
        wait_until(lambda: status_counts(engine).get("delivered") == TOTAL, timeout=180, what="all delivered")
    finally:
        for relay in relays:
            relay.stop()
            relay.engine.dispose()

    assert status_counts(engine) == {"delivered": TOTAL}
    assert len(handled) == TOTAL and set(handled.values()) == {1}, "a message was handled twice"
    assert overlaps == [], "two messages of one key ran at the same time"
    per_key: dict[str, list[int]] = defaultdict(list)
    for key, index in successes:
        if key is not None:
            per_key[key].append(index)
    assert len(per_key) == KEYS
    for key, indexes in per_key.items():
        assert indexes == sorted(indexes), f"order broken for {key}"
    claimed = sum(r.counters["claimed"] for r in relays)
    released = sum(r.counters["released"] for r in relays)  # the rest of a run after a failure
    assert claimed == TOTAL + len(range(0, TOTAL, 37)) + released
    assert all(r.counters["delivered"] > 0 for r in relays), "every relay took part"
    with engine.connect() as conn:
        retried = conn.execute(sa.text("SELECT COUNT(*) FROM outbox WHERE attempts = 2")).scalar()
    assert retried == len(range(0, TOTAL, 37))


@pytest.mark.parametrize("backend", ["sqlite"])
def test_second_sqlite_relay_is_refused(engine: sa.Engine) -> None:
    registry = Registry()
    registry.add("work", lambda message: None)
    first = Relay(engine, registry).start()
    try:
        with pytest.raises(outbox.RelayConflict, match="SQLite supports one relay at a time"):
            Relay(engine, registry).start()
    finally:
        first.stop()
    second = Relay(engine, registry).start()  # after a clean stop the lock is free again
    second.stop()


def lock_holder(engine: sa.Engine) -> str | None:
    locks = tables_for().locks
    with engine.connect() as conn:
        holder = conn.execute(sa.select(locks.c.holder).where(locks.c.name == "relay")).scalar()
    return None if holder is None else str(holder)


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sqlite_relay_starts_at_once_after_its_predecessor_was_killed(
    engine: sa.Engine, db_url: str, relays: RelayLauncher, record: Path
) -> None:
    """Issue 17: after ``kill -9`` of the relay, a new one was refused until the dead one's lock row
    expired (30 s). The lock is the operating system's now, and dies with its process; a relay that is
    alive still keeps every other one out."""
    options = {"lease_seconds": 30, "poll_interval": 0.05}
    commit_messages(engine, [(None, 0)])
    first = relays.start(**options)
    wait_until(lambda: count_done(record) == 1 or not first.alive(), timeout=60, what="the first delivery")
    assert first.alive(), first.log_tail()
    assert str(first.pid) in (lock_holder(engine) or "")
    first.kill()

    second = relays.start(**options)  # at once: the dead relay's lock row has 30 s of lease left
    commit_messages(engine, [(None, 1)])
    wait_until(
        lambda: count_done(record) == 2 or not second.alive(),
        timeout=20,
        what="the relay started after the kill to deliver",
        explain=second.log_tail,
    )
    assert second.alive(), second.log_tail()
    assert str(second.pid) in (lock_holder(engine) or "")

    third = relays.start(**options)
    assert third.wait_exit(60) == 6  # outbox.cli.RET_CONFLICT
    assert "SQLite supports one relay at a time" in third.log_tail()
    assert f"{db_url.removeprefix('sqlite:///')}.outbox-relay.lock" in third.log_tail()

    second.send(signal.SIGTERM)
    assert second.wait_exit(30) == 0, second.log_tail()
    assert lock_holder(engine) is None  # a clean stop deletes the row
