"""``outbox consume`` in batches and partitions in parallel: the invariants of ``consumers._batches`` and
``consumers._partitions``, against the real databases and the test broker.

Records are published by the real relay; the consumer runs in-process, or as a real ``python -m outbox
consume`` subprocess where the test kills it. Helpers and the subprocess fixture are those of
``tests/test_consumer.py``.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from consumers import Registry
from consumers._inbox import Inbox
from outbox import cli
from outbox._message import Message
from tests.apps.consumer_app import EFFECTS, create_effects_table, effect_handler, effect_rows
from tests.conftest import wait_until
from tests.test_consumer import (  # noqa: F401  (consumers: the subprocess fixture)
    APP,
    Consumers,
    T,
    assert_one_line_error,
    consumers,
    dead_letters,
    inbox_ids,
    invoke,
    publish,
    runner,
    unique,
)


def partitioned_topic(bootstrap: str, partitions: int = 4) -> str:
    """A new topic of ``partitions`` partitions (the broker creates one of a single partition otherwise)."""
    from kafka.admin import KafkaAdminClient, NewTopic

    name = unique("parts")
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()
    return name


def assert_each_effect_once(engine: sa.Engine, ids: list[str], who: str | None = None) -> None:
    effects = [r.message_id for r in effect_rows(engine, who)]
    assert len(effects) == len(set(effects)), "an effect committed twice"
    assert sorted(effects) == sorted(ids), "every message's effect"


# --- a failing record -------------------------------------------------------------------------------------


@pytest.mark.parametrize("isolation", ["redo", "savepoint"])
def test_a_failing_record_mid_batch_leaves_the_others_once(
    engine: sa.Engine, kafka_bootstrap: str, isolation: str
) -> None:
    topic, group = unique("batch"), unique("g")
    create_effects_table(engine)
    registry = Registry()
    registry.add(topic, effect_handler("b", poisoned=lambda: True))
    ids = publish(engine, kafka_bootstrap, [(topic, {"i": i, "poison": i == 4}, "one") for i in range(10)])

    with runner(engine, registry, kafka_bootstrap, group, batch_isolation=isolation) as consumer:
        wait_until(
            lambda: consumer.stats()["dead_lettered"] == 1, timeout=60, what="the poison dead-lettered"
        )
        wait_until(lambda: len(effect_rows(engine)) == 9, timeout=30, what="the others handled")
        wait_until(lambda: consumer.stats()["commits"] > 0, timeout=10, what="offsets committed")
    good = ids[:4] + ids[5:]
    assert_each_effect_once(engine, good)
    assert [r.idx for r in effect_rows(engine)] == [0, 1, 2, 3, 5, 6, 7, 8, 9], "in order, poison in place"
    assert inbox_ids(engine, group) == sorted(good), "the failing record is not recorded as handled"
    (letter,) = dead_letters(engine)
    assert (str(letter.message_id), letter.attempts) == (ids[4], 3), "only it retried, every attempt counted"
    stats = consumer.stats()
    assert (stats["handled"], stats["failed_attempts"], stats["received"]) == (9, 3, 10), stats
    assert consumer.error is None


class _Effect:
    """An ORM object for the effects table: added with ``session.add``, inserted at the batch's flush."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


sa.orm.registry().map_imperatively(_Effect, EFFECTS)


def test_a_record_failing_at_the_batch_flush_is_found_and_only_it_dead_lettered(
    engine: sa.Engine, kafka_bootstrap: str
) -> None:
    """The batch flushes the handlers' work once, at its end: a flush that fails is run again, each
    handler's work flushed after it, which finds the failing record."""
    topic, group = unique("flush"), unique("g")
    create_effects_table(engine)

    def handler(message: Message, session: sa.orm.Session) -> None:
        who = None if message.payload["poison"] else "f"  # NOT NULL: only the flush finds out
        session.add(_Effect(who=who, message_id=str(message.id), idx=message.payload["i"], pid=0))

    registry = Registry()
    registry.add(topic, handler)
    ids = publish(engine, kafka_bootstrap, [(topic, {"i": i, "poison": i == 6}, "one") for i in range(10)])
    with runner(engine, registry, kafka_bootstrap, group) as consumer:
        wait_until(
            lambda: consumer.stats()["dead_lettered"] == 1, timeout=60, what="the poison dead-lettered"
        )
        wait_until(lambda: len(effect_rows(engine)) == 9, timeout=30, what="the others handled")
    assert_each_effect_once(engine, ids[:6] + ids[7:])
    (letter,) = dead_letters(engine)
    assert str(letter.message_id) == ids[6] and letter.attempts == 3
    assert consumer.stats()["handled"] == 9 and consumer.error is None


# --- kill -9 mid-batch ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"], indirect=True)
def test_killed_mid_batch_twice_every_effect_exactly_once(
    engine: sa.Engine,
    kafka_bootstrap: str,
    consumers: Consumers,  # noqa: F811  (the fixture imported above)
) -> None:
    """Killed right after a batch's commit, before its offsets were committed, twice: each session
    handler's effect exactly once, nothing left unhandled."""
    topic, group = unique("paid"), unique("g")
    create_effects_table(engine)
    ids = publish(engine, kafka_bootstrap, [(topic, {"i": i}, f"k{i % 4}") for i in range(30)])
    env = {"OUTBOX_TEST_TOPIC": topic, "OUTBOX_BATCH_RECORDS": "5"}

    for _ in range(2):
        before = len(effect_rows(engine))
        killed = consumers.start(group, {**env, "OUTBOX_TEST_KILL_AFTER": "2"})
        assert killed.wait_exit(60) == -signal.SIGKILL, killed.log_tail()
        assert before < len(effect_rows(engine)) < 30, "it died after committing batches, before the end"

    last = consumers.start(group, env)
    wait_until(lambda: len(effect_rows(engine)) >= 30, timeout=60, what="every message handled")
    last.send(signal.SIGTERM)
    assert last.wait_exit(30) == 0, last.log_tail()
    assert_each_effect_once(engine, ids)
    assert inbox_ids(engine, group) == sorted(ids)
    assert "already processed by group" in last.log_path.read_text(), "the uncommitted batch came back"


# --- partitions in parallel -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_partitions_in_parallel_keep_their_order(engine: sa.Engine, kafka_bootstrap: str) -> None:
    topic, group = partitioned_topic(kafka_bootstrap), unique("g")
    create_effects_table(engine)
    threads: set[str] = set()
    effect = effect_handler("p")

    def handler(message: Message, session: sa.orm.Session) -> None:
        threads.add(threading.current_thread().name)
        time.sleep(0.002)  # handlers that take a moment: partitions overlap
        effect(message, session)

    registry = Registry()
    registry.add(topic, handler)
    items: list[tuple[str, Any, str | None]] = [(topic, {"i": i}, f"k{i % 8}") for i in range(400)]

    with runner(engine, registry, kafka_bootstrap, group, workers=4, batch_records=25) as consumer:
        ids = publish(engine, kafka_bootstrap, items[:8])
        wait_until(lambda: len(effect_rows(engine)) == 8, timeout=60, what="the group joined")
        ids += publish(engine, kafka_bootstrap, items[8:])  # live traffic: polls bring every partition
        wait_until(lambda: len(effect_rows(engine)) == 400, timeout=90, what="all handled")
    assert consumer.workers == 4 and consumer.error is None
    assert_each_effect_once(engine, ids)
    by_key: dict[int, list[int]] = {}
    for row in effect_rows(engine):
        by_key.setdefault(row.idx % 8, []).append(row.idx)
    assert all(idxs == sorted(idxs) for idxs in by_key.values()), "each key (one partition) in order"
    assert len(threads) > 1, f"partitions were finished on several workers: {threads}"


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_second_consumer_joining_skips_nothing_and_doubles_nothing(
    engine: sa.Engine, kafka_bootstrap: str
) -> None:
    topic, group = partitioned_topic(kafka_bootstrap), unique("g")
    create_effects_table(engine)
    effect = effect_handler("r")

    def slow(message: Message, session: sa.orm.Session) -> None:
        time.sleep(0.05)  # 30 s of work for one consumer: the second joins well before the end
        effect(message, session)

    registry = Registry()
    registry.add(topic, slow)
    ids = publish(engine, kafka_bootstrap, [(topic, {"i": i}, f"k{i % 16}") for i in range(600)])

    with runner(engine, registry, kafka_bootstrap, group, workers=1, batch_records=20) as first:
        wait_until(lambda: len(effect_rows(engine)) >= 30, timeout=60, what="the first consumer under way")
        with runner(engine, registry, kafka_bootstrap, group, workers=1, batch_records=20) as second:
            wait_until(lambda: second.stats()["handled"] > 0, timeout=60, what="partitions for the second")
            wait_until(lambda: len(effect_rows(engine)) >= 600, timeout=120, what="every message handled")
            wait_until(lambda: inbox_ids(engine, group) == sorted(ids), timeout=10, what="all in the inbox")
    assert first.error is None and second.error is None
    assert_each_effect_once(engine, ids)
    assert dead_letters(engine) == []


# --- batches bound by time --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_lone_record_is_handled_without_waiting_for_a_full_batch(
    engine: sa.Engine, kafka_bootstrap: str
) -> None:
    """Light traffic: a batch is whatever came; it never waits for ``batch_records`` or ``batch_ms``
    (here ten minutes: the record is handled long before)."""
    topic, group = unique("lone"), unique("g")
    create_effects_table(engine)
    registry = Registry()
    registry.add(topic, effect_handler("lone"))
    with runner(engine, registry, kafka_bootstrap, group, batch_ms=600_000, batch_records=500) as consumer:
        (first,) = publish(engine, kafka_bootstrap, [(topic, {"i": 0}, None)])
        wait_until(lambda: len(effect_rows(engine)) == 1, timeout=60, what="the lone record handled")
        (second,) = publish(engine, kafka_bootstrap, [(topic, {"i": 1}, None)])
        wait_until(lambda: len(effect_rows(engine)) == 2, timeout=60, what="the next lone record handled")
    assert consumer.stats()["handled"] == 2
    assert_each_effect_once(engine, [first, second])


# --- the inbox's batch statements, settings ---------------------------------------------------------------


def test_the_inbox_is_asked_and_written_for_a_whole_batch_at_once(engine: sa.Engine) -> None:
    import datetime as dt

    inbox = Inbox(T, unique("g"))
    messages = [Message(uuid.uuid4(), "t", None, {}, {}, 1, dt.datetime(2024, 1, 1)) for _ in range(5)]
    with engine.begin() as conn:
        assert inbox.processed_among(conn, [m.id for m in messages]) == set()
        assert inbox.claim_many(conn, messages[:3])
        assert inbox.claim_many(conn, [])
    with engine.connect() as conn:
        assert inbox.processed_among(conn, [m.id for m in messages]) == {m.id for m in messages[:3]}
        assert Inbox(T, "another").processed_among(conn, [messages[0].id]) == set(), "per group"
    with engine.begin() as conn:
        assert not inbox.claim_many(conn, messages[2:]), "one of them is there: refused, roll back"
        conn.rollback()
    with engine.connect() as conn:
        assert inbox.processed_among(conn, [m.id for m in messages]) == {m.id for m in messages[:3]}


def test_workers_default_and_one_writer_on_sqlite(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry()
    registry.add("t", lambda message: None)
    consumer = runner(engine, registry, "127.0.0.1:9", unique("g"))
    assert consumer.workers == (1 if engine.dialect.name == "sqlite" else 4)
    assert runner(engine, registry, "127.0.0.1:9", unique("g"), workers=3).workers == (
        1 if engine.dialect.name == "sqlite" else 3
    )


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_consume_batch_options_are_checked_in_one_line(
    engine: sa.Engine, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = [
        "consume",
        "--database-url",
        db_url,
        "--app",
        APP,
        "--group",
        "g",
        "--kafka-bootstrap-servers",
        "h:1",
    ]
    for flag, value, fragment in [
        ("--batch-records", "0", "batch records"),
        ("--batch-ms", "-1", "batch milliseconds"),
        ("--workers", "0", "workers"),
        ("--fetch-max-wait-ms", "0", "fetch_max_wait_ms"),
    ]:
        assert_one_line_error(invoke(*base, flag, value), cli.RET_CONFIG, fragment)
    monkeypatch.setenv("OUTBOX_CONSUME_WORKERS", "0")
    assert_one_line_error(invoke(*base), cli.RET_CONFIG, "workers")
    monkeypatch.delenv("OUTBOX_CONSUME_WORKERS")
    monkeypatch.setenv("OUTBOX_WORKERS", "0")  # the relay's: not the consumer's
    result = invoke(*base)
    assert "workers" not in result.stderr, result.stderr
    shown = invoke("consume", "--help").stdout
    assert "OUTBOX_CONSUME_WORKERS" in shown and "OUTBOX_BATCH_RECORDS" in shown
    assert "--batch-isolation" not in shown, "a hidden option, for the benchmark"
