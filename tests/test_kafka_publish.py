"""Publishing to a real Kafka-protocol broker: everything committed arrives, in order per key."""

from __future__ import annotations

import json
import uuid
from collections import defaultdict

import pytest
import sqlalchemy as sa
from sqlalchemy import orm

import outbox
from consumers import Registry
from relay import Relay
from relay.publishers import Failed, Released
from relay.publishers.kafka import HEADER_CONTENT_TYPE, HEADER_ID, HEADER_TOPIC, KafkaSettings, classify
from tests.conftest import status_counts, wait_until
from tests.kafka_check import Record, read_all


def unique_topic(prefix: str) -> str:
    return f"{prefix}.{uuid.uuid4().hex[:8]}"


def test_committed_messages_reach_kafka_in_order_per_key(engine: sa.Engine, kafka_bootstrap: str) -> None:
    topic = unique_topic("orders")
    committed: dict[str, dict[str, object]] = {}
    rolled_back: set[str] = set()
    for batch in range(100):  # 100 transactions of 100 messages; every fourth one rolls back
        with orm.Session(engine) as session:
            session.begin()
            ids = []
            for n in range(100):
                i = batch * 100 + n
                payload = {"i": i, "text": "x" * 150}
                key = f"order-{i % 97}"
                message_id = str(
                    outbox.add(session, topic, payload, key=key, headers={"traceparent": "00-t-s-01"})
                )
                ids.append((message_id, payload, key))
            if batch % 4 == 3:
                session.rollback()
                rolled_back.update(m for m, _, _ in ids)
            else:
                session.commit()
                committed.update({m: {"payload": p, "key": k} for m, p, k in ids})
    assert len(committed) == 7500

    relay = Relay(engine, Registry(), kafka=KafkaSettings(kafka_bootstrap), poll_interval=0.1, batch_size=500)
    with relay:
        wait_until(lambda: status_counts(engine) == {"delivered": 7500}, timeout=120, what="all published")

    records = read_all(kafka_bootstrap, [topic], expect=7500)
    by_id = {r.headers[HEADER_ID]: r for r in records}
    assert set(by_id) == set(committed), "every committed message, and only those, reached the broker"
    assert not set(by_id) & rolled_back
    assert len(records) == 7500, "no duplicates without a crash"
    for message_id, record in by_id.items():
        assert json.loads(record.value) == committed[message_id]["payload"]
        assert record.key == committed[message_id]["key"]
        assert record.headers[HEADER_TOPIC] == topic
        assert record.headers[HEADER_CONTENT_TYPE] == "application/json"
        assert record.headers["traceparent"] == "00-t-s-01"
    per_key: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for record in records:
        assert record.key is not None
        per_key[record.key].append((record.partition, record.offset, json.loads(record.value)["i"]))
    for key, items in per_key.items():
        assert len({p for p, _, _ in items}) == 1, f"key {key} spread over partitions"
        in_log_order = [i for _, _, i in sorted(items)]
        assert in_log_order == sorted(in_log_order), f"order broken for {key}"


def test_in_process_handler_wins_over_kafka_and_routes_rename(
    engine: sa.Engine, kafka_bootstrap: str
) -> None:
    local: list[str] = []
    registry = Registry()
    registry.add("local.only", lambda m: local.append(m.topic))
    renamed = unique_topic("renamed")
    settings = KafkaSettings(kafka_bootstrap, routes=(("audit.*", renamed),))
    with engine.begin() as conn:
        outbox.add(conn, "local.only", {})
        outbox.add(conn, "audit.login", {"user": "ann"})
    with Relay(engine, registry, kafka=settings, poll_interval=0.1):
        wait_until(lambda: status_counts(engine) == {"delivered": 2}, timeout=30)
    assert local == ["local.only"]
    (record,) = read_all(kafka_bootstrap, [renamed], expect=1)
    assert record.headers[HEADER_TOPIC] == "audit.login"


def test_record_too_large_goes_dead_and_the_rest_flow(engine: sa.Engine, kafka_bootstrap: str) -> None:
    topic = unique_topic("big")
    with engine.begin() as conn:
        too_big = outbox.add(conn, topic, b"x" * 2_000_000, key="k")
        for i in range(20):
            outbox.add(conn, topic, {"i": i}, key="k")
    with Relay(engine, Registry(), kafka=KafkaSettings(kafka_bootstrap), poll_interval=0.1):
        wait_until(lambda: status_counts(engine) == {"dead": 1, "delivered": 20}, timeout=60)
    t = outbox.tables_for().messages
    with engine.connect() as conn:
        dead = conn.execute(sa.select(t).where(t.c.id == too_big)).one()
    assert dead.attempts == 1, "a permanent error does not use up retries"
    assert "MessageSizeTooLargeError" in (dead.last_error or "")
    assert len(read_all(kafka_bootstrap, [topic], expect=20)) == 20


def test_error_classification() -> None:
    from kafka import errors

    assert isinstance(classify(errors.MessageSizeTooLargeError("big")), Failed)
    assert classify(errors.MessageSizeTooLargeError("big")).permanent  # type: ignore[union-attr]
    assert isinstance(classify(errors.KafkaTimeoutError("slow")), Released)
    assert isinstance(classify(errors.NotLeaderForPartitionError()), Released)
    assert isinstance(classify(errors.KafkaConnectionError("refused")), Released)
    assert isinstance(classify(ConnectionRefusedError()), Released)
    assert isinstance(classify(errors.TopicAuthorizationFailedError()), Failed)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"bootstrap_servers": "nohostport"}, "HOST:PORT"),
        ({"bootstrap_servers": "h:1", "security_protocol": "SASL_SSL"}, "mechanism"),
        ({"bootstrap_servers": "h:1", "compression_type": "brotli"}, "compression"),
    ],
)
def test_bad_kafka_settings_are_refused(kwargs: dict[str, str], fragment: str) -> None:
    with pytest.raises(outbox.ConfigError, match=fragment):
        KafkaSettings(**kwargs)


def test_password_is_never_in_repr() -> None:
    settings = KafkaSettings(
        "h:1", security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u", sasl_password="s3cret"
    )
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize("backend", ["postgresql"])
def test_confluent_backend_publishes_the_same_records(engine: sa.Engine, kafka_bootstrap: str) -> None:
    topic = unique_topic("confluent")
    with engine.begin() as conn:
        ids = {
            str(outbox.add(conn, topic, {"i": i}, key=f"k{i % 7}", headers={"h": "v"})) for i in range(2000)
        }
        too_big = outbox.add(conn, topic, b"x" * 2_000_000)
    settings = KafkaSettings(kafka_bootstrap, client="confluent")
    with Relay(engine, Registry(), kafka=settings, poll_interval=0.1, batch_size=500):
        wait_until(lambda: status_counts(engine) == {"delivered": 2000, "dead": 1}, timeout=60)
    records = read_all(kafka_bootstrap, [topic], expect=2000)
    assert {r.headers[HEADER_ID] for r in records} == ids and len(records) == 2000
    assert all(r.headers["h"] == "v" and r.headers[HEADER_TOPIC] == topic for r in records)
    per_key: dict[str, list[int]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        per_key[record.key or ""].append(json.loads(record.value)["i"])
    assert all(items == sorted(items) for items in per_key.values())
    t = outbox.tables_for().messages
    with engine.connect() as conn:
        error = conn.execute(sa.select(t.c.last_error).where(t.c.id == too_big)).scalar()
    assert "MSG_SIZE_TOO_LARGE" in (error or "")


def first_appearances(records: list[Record]) -> dict[str, list[int]]:
    """Per topic, the ``i`` of each message in the order of its first record in the partition's log
    (a record published again after a failure is a duplicate: it does not count)."""
    seen: set[str] = set()
    order: dict[str, list[int]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.topic, r.partition, r.offset)):
        if record.headers[HEADER_ID] not in seen:
            seen.add(record.headers[HEADER_ID])
            order[record.topic].append(json.loads(record.value)["i"])
    return order


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_hot_key_reaches_kafka_complete_and_in_order(
    engine: sa.Engine, kafka_bootstrap: str, client: str
) -> None:
    """2,000 messages of one key, handed to the producer a run at a time: all of them, once, in order."""
    topic = unique_topic("hot")
    with engine.begin() as conn:
        for i in range(2000):
            outbox.add(conn, topic, {"i": i}, key="hot")
    settings = KafkaSettings(kafka_bootstrap, client=client)
    with Relay(engine, Registry(), kafka=settings, poll_interval=0.1, batch_size=500):
        wait_until(lambda: status_counts(engine) == {"delivered": 2000}, timeout=120, what="all published")
    records = read_all(kafka_bootstrap, [topic], expect=2000)
    assert len(records) == 2000, "every message once: no failure, no duplicate"
    assert len({r.partition for r in records}) == 1
    in_log_order = [json.loads(r.value)["i"] for r in sorted(records, key=lambda r: r.offset)]
    assert in_log_order == list(range(2000))


def test_a_key_alternating_between_two_topics_keeps_its_order_on_each(
    engine: sa.Engine, kafka_bootstrap: str
) -> None:
    """A run whose topics alternate goes out a topic's stretch at a time: each topic's log in order."""
    first, second = unique_topic("even"), unique_topic("odd")
    with engine.begin() as conn:
        topics: list[str] = []
        for stretch in range(400):  # stretches of 1, 2, 3, 1, ... messages, on one topic then the other
            topics += [(first, second)[stretch % 2]] * (1 + stretch % 3)
        for i, topic in enumerate(topics[:600]):
            outbox.add(conn, topic, {"i": i}, key="k")
    with Relay(engine, Registry(), kafka=KafkaSettings(kafka_bootstrap), poll_interval=0.1, batch_size=500):
        wait_until(lambda: status_counts(engine) == {"delivered": 600}, timeout=120, what="all published")
    records = read_all(kafka_bootstrap, [first, second], expect=600)
    order = first_appearances(records)
    assert sorted(order[first] + order[second]) == list(range(600)), "every message arrived"
    assert order[first] and order[second]
    for topic in (first, second):
        assert order[topic] == sorted(order[topic]), f"order broken on {topic}"


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_record_that_fails_for_good_inside_a_hot_key_holds_nothing_back(
    engine: sa.Engine, kafka_bootstrap: str, client: str
) -> None:
    """A too-large record in the middle of a run ends dead; every other record of the key arrives, first
    appearances in order (a failure the broker reports makes duplicates of the records sent after it;
    the producer refuses this one before sending it, so the rest of its group is not sent either)."""
    topic = unique_topic("hot-big")
    with engine.begin() as conn:
        for i in range(1000):
            payload: object = {"i": i} if i != 500 else {"i": i, "pad": "x" * 2_000_000}
            message_id = outbox.add(conn, topic, payload, key="hot")
            if i == 500:
                too_big = message_id
    settings = KafkaSettings(kafka_bootstrap, client=client)
    with Relay(engine, Registry(), kafka=settings, poll_interval=0.1, batch_size=500):
        wait_until(lambda: status_counts(engine) == {"dead": 1, "delivered": 999}, timeout=120)
    t = outbox.tables_for().messages
    with engine.connect() as conn:
        dead = conn.execute(sa.select(t).where(t.c.id == too_big)).one()
    assert dead.attempts == 1, "a permanent error does not use up retries"
    assert any(name in (dead.last_error or "") for name in ("MessageSizeTooLargeError", "MSG_SIZE_TOO_LARGE"))
    records = read_all(kafka_bootstrap, [topic], expect=999)
    assert first_appearances(records)[topic] == [i for i in range(1000) if i != 500]
    assert len(records) == 999, "nothing after the refused record was sent before it was refused"
