"""``outbox consume``: handlers run on Kafka records, a session handler's effect happens once per group,
a poison record is dead-lettered and replayed, a stop commits what is done.

Records are published by the real relay (``outbox.add`` + ``Relay(kafka=...)``), so they carry the real
``outbox-*`` headers. The consumer runs in-process where that is enough, and as a real ``python -m
outbox consume`` subprocess where the test kills or signals it. The test broker hands a group its first
record about half a session timeout after joining, hence ``session_timeout_ms=6000`` everywhere; every
test uses its own topics and groups, with one member per group (a second member's rebalance is slow).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

import outbox
from consumers import Registry
from consumers._dead_letters import DeadLetters
from consumers._inbox import Inbox
from consumers._kafka import ConsumerSettings, KafkaConsumerRunner, subscription
from consumers._records import (
    RECORD_ID_NAMESPACE,
    UndecodableRecord,
    decode_record_headers,
    encode_record_headers,
    message_from_record,
)
from outbox import cli
from outbox._message import Message
from outbox._policy import PolicyOverrides
from outbox._schema import MIGRATIONS, SCHEMA_VERSION, check_version, current_version, tables_for
from relay import Relay
from relay.publishers.kafka import KafkaSettings
from tests.apps import RelayProcess
from tests.apps.consumer_app import create_effects_table, effect_handler, effect_rows
from tests.conftest import ROOT, status_counts, wait_until

T = tables_for()
APP = "tests.apps.consumer_app:registry"
SESSION_MS = 6000
FAST_RETRY = outbox.RetryPolicy(max_attempts=3, backoff_initial=0.05, backoff_max=0.2, jitter=0)


@pytest.fixture(autouse=True)
def _no_outbox_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OUTBOX_"):
            monkeypatch.delenv(name)


def unique(prefix: str) -> str:
    return f"{prefix}.{uuid.uuid4().hex[:8]}"


def publish(engine: sa.Engine, bootstrap: str, items: list[tuple[str, Any, str | None]]) -> list[str]:
    """Commit ``(topic, payload, key)`` messages and let the real relay publish them; return their ids."""
    with engine.begin() as conn:
        ids = [str(outbox.add(conn, t, p, key=k, headers={"traceparent": "00-t-s-01"})) for t, p, k in items]
    before = status_counts(engine).get("delivered", 0)
    with Relay(engine, Registry(), kafka=KafkaSettings(bootstrap), poll_interval=0.1):
        wait_until(
            lambda: status_counts(engine).get("delivered", 0) == before + len(items),
            timeout=30,
            what="the relay published everything",
        )
    return ids


def runner(
    engine: sa.Engine, registry: Registry, bootstrap: str, group: str, **kwargs: Any
) -> KafkaConsumerRunner:
    settings = ConsumerSettings(bootstrap, group=group, session_timeout_ms=SESSION_MS)
    return KafkaConsumerRunner(engine, registry, settings, retry=FAST_RETRY, stop_timeout=10, **kwargs)


def inbox_ids(engine: sa.Engine, group: str) -> list[str]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(T.inbox.c.message_id).where(T.inbox.c.consumer_group == group)).all()
    return sorted(str(r.message_id) for r in rows)


def dead_letters(engine: sa.Engine, group: str | None = None) -> list[Any]:
    with engine.connect() as conn:
        return DeadLetters(T).find(conn, group=group)


# --- handled once ------------------------------------------------------------------------------------------


def test_session_handler_effects_happen_once(engine: sa.Engine, kafka_bootstrap: str) -> None:
    topic, binary_topic, group = unique("orders"), unique("blobs"), unique("g")
    create_effects_table(engine)
    seen: list[Message] = []
    registry = Registry()
    session_effect = effect_handler("orders")

    def on_order(message: Message, session: sa.orm.Session) -> None:
        seen.append(message)
        session_effect(message, session)

    registry.add(topic, on_order)
    registry.add(binary_topic, lambda message, session: seen.append(message))
    items: list[tuple[str, Any, str | None]] = [(topic, {"i": i}, f"k{i % 5}") for i in range(30)]
    ids = publish(engine, kafka_bootstrap, [*items, (binary_topic, b"\x00\xff", None)])

    with runner(engine, registry, kafka_bootstrap, group) as consumer:
        wait_until(lambda: len(effect_rows(engine)) >= 30 and len(seen) >= 31, timeout=60, what="all handled")
        wait_until(lambda: consumer.stats()["commits"] > 0, timeout=10, what="offsets committed")
    assert sorted(r.message_id for r in effect_rows(engine)) == sorted(ids[:30]), "each effect once"
    assert inbox_ids(engine, group) == sorted(ids)
    assert consumer.stats()["handled"] == 31 and consumer.stats()["duplicates"] == 0
    assert consumer.error is None

    rows = {str(r.id): r for r in _messages(engine)}
    by_id = {str(m.id): m for m in seen}
    first = by_id[ids[0]]
    assert (first.topic, first.key, first.payload, first.attempt) == (topic, "k0", {"i": 0}, 1)
    assert first.headers == {"traceparent": "00-t-s-01"}, "outbox-* and content-type are not user headers"
    assert first.created_at == rows[ids[0]].created_at
    blob = by_id[ids[30]]
    assert (blob.payload, blob.key, blob.content_type) == (b"\x00\xff", None, "application/octet-stream")


def _messages(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(T.messages)).all())


def test_inbox_claim_is_refused_twice(engine: sa.Engine) -> None:
    """Two consumers of one group racing on one message: the second insert waits, then is refused."""
    inbox = Inbox(T, "race")
    message = Message(uuid.uuid4(), "t", None, {}, {}, 1, dt.datetime(2024, 1, 1))
    results: list[bool] = []
    with engine.connect() as first:
        first.begin()
        assert inbox.claim(first, message)
        second = threading.Thread(
            target=lambda: results.append(_claim_in_own_transaction(engine, inbox, message))
        )
        second.start()
        second.join(0.5)
        first.commit()
    second.join(20)
    assert results == [False]
    with engine.connect() as conn:
        assert inbox.contains(conn, message.id)
        assert not Inbox(T, "other").contains(conn, message.id), "the inbox is per group"
        assert Inbox(T, "other").claim(conn, message)


def _claim_in_own_transaction(engine: sa.Engine, inbox: Inbox, message: Message) -> bool:
    with engine.begin() as conn:
        return inbox.claim(conn, message)


# --- subprocess consumers ----------------------------------------------------------------------------------


class Consumers:
    """``outbox consume`` subprocesses of one test; whatever still runs is killed at the end."""

    def __init__(self, log_dir: Path, db_url: str, bootstrap: str) -> None:
        self.log_dir, self.db_url, self.bootstrap = log_dir, db_url, bootstrap
        self.started: list[RelayProcess] = []

    def start(self, group: str, env: dict[str, str]) -> RelayProcess:
        command = [
            sys.executable, "-m", "outbox", "consume", "--app", APP, "--group", group,
            "--database-url", self.db_url, "--kafka-bootstrap-servers", self.bootstrap,
            "--session-timeout-ms", str(SESSION_MS), "--stop-timeout", "10",
        ]  # fmt: skip
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
        child_env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **env)
        log_path = self.log_dir / f"consumer-{len(self.started) + 1}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                command,
                cwd=ROOT,
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        process = RelayProcess(popen, log_path)
        self.started.append(process)
        return process

    def cleanup(self) -> None:
        for process in self.started:
            if process.alive():
                process.kill()


@pytest.fixture
def consumers(tmp_path: Path, db_url: str, kafka_bootstrap: str) -> Iterator[Consumers]:
    launcher = Consumers(tmp_path, db_url, kafka_bootstrap)
    try:
        yield launcher
    finally:
        launcher.cleanup()


def stopped_stats(process: RelayProcess) -> dict[str, int]:
    """The counters of the ``consumer stopped: ...`` line of a consumer that stopped gracefully."""
    match = re.search(r"consumer stopped: (.*)", process.log_path.read_text())
    assert match, process.log_tail()
    return {name: int(value) for name, value in re.findall(r"(\w+)=(\d+)", match.group(1))}


def test_killed_consumer_between_commit_and_offset_commit_has_no_double_effect(
    engine: sa.Engine, kafka_bootstrap: str, consumers: Consumers
) -> None:
    topic, group = unique("paid"), unique("g")
    create_effects_table(engine)
    ids = publish(engine, kafka_bootstrap, [(topic, {"i": i}, f"k{i % 4}") for i in range(20)])
    # one record a transaction, so that the kill lands after the fifth record's commit (batches of many
    # records: tests/test_consumer_batches.py::test_killed_mid_batch_twice_every_effect_exactly_once)
    env = {"OUTBOX_TEST_TOPIC": topic, "OUTBOX_BATCH_RECORDS": "1"}

    killed = consumers.start(group, {**env, "OUTBOX_TEST_KILL_AFTER": "5"})
    assert killed.wait_exit(60) == -signal.SIGKILL, killed.log_tail()
    # it died right after its fifth handler transaction committed; partitions are handled in parallel,
    # so another partition's transaction may commit in that same moment (a sixth, rarely)
    committed = len(effect_rows(engine))
    assert 5 <= committed < 20, committed

    restarted = consumers.start(group, env)
    wait_until(lambda: len(effect_rows(engine)) >= 20, timeout=60, what="every message handled")
    restarted.send(signal.SIGTERM)
    assert restarted.wait_exit(30) == 0, restarted.log_tail()

    effects = [r.message_id for r in effect_rows(engine)]
    assert sorted(effects) == sorted(ids), "every message's effect exactly once"
    assert inbox_ids(engine, group) == sorted(ids)
    stats = stopped_stats(restarted)
    assert stats["duplicates"] >= 1, "the record whose offset was not committed came back and was skipped"
    assert stats["handled"] == 20 - committed and stats["dead_lettered"] == 0
    assert "already processed by group" in restarted.log_path.read_text()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_sigterm_commits_offsets_and_exits_0(
    engine: sa.Engine, kafka_bootstrap: str, consumers: Consumers, tmp_path: Path
) -> None:
    topic, group = unique("shipped"), unique("g")
    record = tmp_path / "plain.log"
    create_effects_table(engine)
    env = {"OUTBOX_TEST_TOPIC": topic, "OUTBOX_TEST_RECORD": str(record)}

    def plain_lines() -> list[str]:
        return record.read_text().splitlines() if record.exists() else []

    first_ids = publish(
        engine, kafka_bootstrap, [(t, {"i": i}, f"k{i}") for i in range(8) for t in (topic, f"{topic}.plain")]
    )
    first = consumers.start(group, env)
    wait_until(lambda: len(effect_rows(engine)) == 8 and len(plain_lines()) == 8, timeout=60, what="handled")
    first.send(signal.SIGTERM)
    assert first.wait_exit(30) == 0, first.log_tail()
    assert stopped_stats(first)["handled"] == 16
    assert "SIGTERM received" in first.log_path.read_text()

    more_ids = publish(
        engine,
        kafka_bootstrap,
        [(t, {"i": i}, f"k{i}") for i in range(8, 11) for t in (topic, f"{topic}.plain")],
    )
    second = consumers.start(group, env)
    wait_until(
        lambda: len(effect_rows(engine)) == 11 and len(plain_lines()) == 11, timeout=60, what="handled"
    )
    second.send(signal.SIGTERM)
    assert second.wait_exit(30) == 0, second.log_tail()
    stats = stopped_stats(second)
    assert (stats["received"], stats["handled"], stats["duplicates"]) == (6, 6, 0), "committed ones not read"
    assert sorted(line.split()[0] for line in plain_lines()) == sorted((first_ids + more_ids)[1::2])


# --- poison records, dead letters, replay ----------------------------------------------------------------


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli.outbox, list(args), catch_exceptions=False)


def test_poison_record_is_dead_lettered_then_replayed_once(
    engine: sa.Engine, db_url: str, kafka_bootstrap: str
) -> None:
    topic, failing, healthy = unique("invoices"), unique("failing"), unique("healthy")
    create_effects_table(engine)
    poisoned = [True]
    registry_a, registry_b = Registry(), Registry()
    registry_a.add(topic, effect_handler("a", poisoned=lambda: poisoned[0]))
    registry_b.add(topic, effect_handler("b"))
    items: list[tuple[str, Any, str | None]] = [
        (topic, {"i": i, "poison": i == 2}, "same-key" if i < 6 else f"k{i}") for i in range(10)
    ]
    ids = publish(engine, kafka_bootstrap, items)
    poison_id = ids[2]

    with (
        runner(engine, registry_a, kafka_bootstrap, failing) as a,
        runner(engine, registry_b, kafka_bootstrap, healthy) as b,
    ):
        wait_until(
            lambda: len(effect_rows(engine, "a")) == 9, timeout=60, what="the rest flowed past the poison"
        )
        wait_until(lambda: len(effect_rows(engine, "b")) == 10, timeout=60, what="the healthy group")
        (letter,) = dead_letters(engine)
        assert (letter.consumer_group, letter.message_id, letter.key) == (
            failing,
            uuid.UUID(poison_id),
            "same-key",
        )
        assert letter.error == "ValueError: poison payload 2" and letter.attempts == 3
        assert json.loads(letter.value or b"") == {"i": 2, "poison": True}
        assert a.stats()["dead_lettered"] == 1 and a.stats()["failed_attempts"] == 3

        listed = invoke("dlq", "list", "--json", "--database-url", db_url)
        assert listed.exit_code == 0, listed.output
        assert [d["seq"] for d in json.loads(listed.stdout)] == [letter.seq]
        shown = invoke("dlq", "show", str(letter.seq), "--database-url", db_url)
        assert shown.exit_code == 0 and "ValueError: poison payload 2" in shown.stdout
        dry = invoke("dlq", "replay", "--all", "--dry-run", "--database-url", db_url)
        assert dry.exit_code == 0 and "would replay 1 dead letter(s)" in dry.stdout

        poisoned[0] = False  # the handler is fixed
        replay = invoke(
            "dlq", "replay", "--group", failing, "--database-url", db_url,
            "--kafka-bootstrap-servers", kafka_bootstrap,
        )  # fmt: skip
        assert replay.exit_code == 0, replay.output
        assert "replayed 1 dead letter(s)" in replay.stdout
        wait_until(
            lambda: len(effect_rows(engine, "a")) == 10, timeout=30, what="the replayed record handled"
        )
        wait_until(lambda: b.stats()["duplicates"] == 1, timeout=30, what="the healthy group skipping it")

    assert sorted(r.message_id for r in effect_rows(engine, "a")) == sorted(ids)
    assert sorted(r.message_id for r in effect_rows(engine, "b")) == sorted(ids), "no second effect"
    (letter,) = dead_letters(engine)
    assert letter.replayed_at is not None
    again = invoke(
        "dlq", "replay", "--group", failing, "--database-url", db_url, "--kafka-bootstrap-servers", "h:1"
    )
    assert again.exit_code == 0 and "replayed 0 dead letter(s)" in again.stdout, (
        "replayed ones are not pending"
    )


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_database_outage_is_waited_out_not_counted(
    engine: sa.Engine, db_url: str, kafka_bootstrap: str
) -> None:
    """The consumer's database goes away inside a handler's transaction: no attempt is used up (one is
    all it has here), nothing is dead-lettered, and the record is handled once the database is back."""
    from tests.tcp_proxy import TcpProxy

    topic, group = unique("outage"), unique("g")
    create_effects_table(engine)
    url = sa.engine.make_url(db_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    through_proxy = outbox.create_engine(url.set(port=proxy.port).render_as_string(hide_password=False))
    calls: list[int] = []
    record_effect = effect_handler("outage")

    def handler(message: Message, session: sa.orm.Session) -> None:
        calls.append(message.attempt)
        if len(calls) == 1:
            proxy.cut()  # the database disappears mid-transaction, for a second
            threading.Timer(1.0, proxy.restore).start()
        record_effect(message, session)

    registry = Registry()
    registry.add(topic, handler, overrides=PolicyOverrides(max_attempts=1))
    (message_id,) = publish(engine, kafka_bootstrap, [(topic, {"i": 0}, None)])
    try:
        with runner(through_proxy, registry, kafka_bootstrap, group) as consumer:
            wait_until(lambda: len(effect_rows(engine)) == 1, timeout=60, what="handled after the outage")
    finally:
        through_proxy.dispose()
        proxy.close()
    assert [r.message_id for r in effect_rows(engine)] == [message_id]
    assert dead_letters(engine) == []
    assert calls == [1, 1], "the attempt cut by the outage was not counted"
    stats = consumer.stats()
    assert stats["outages"] >= 1 and stats["failed_attempts"] == 0 and stats["handled"] == 1


# --- records, settings, schema, CLI errors (no broker) ------------------------------------------------------


def record(**fields: Any) -> SimpleNamespace:
    base: dict[str, Any] = dict(
        topic="kt", partition=1, offset=7, timestamp=1_700_000_000_000, key=None, value=b""
    )
    return SimpleNamespace(**{**base, **fields})


def test_a_record_becomes_the_message_the_relay_would_give() -> None:
    message_id = uuid.uuid4()
    headers = [
        ("outbox-message-id", str(message_id).encode()),
        ("outbox-topic", b"order.created"),
        ("outbox-created-at", b"2024-05-01T12:00:00.123456"),
        ("content-type", b"application/json"),
        ("traceparent", b"00-abc-def-01"),
    ]
    message = message_from_record(record(key=b"k1", value=b'{"a": 1}', headers=headers), attempt=2)
    assert (message.id, message.topic, message.key, message.payload) == (
        message_id,
        "order.created",
        "k1",
        {"a": 1},
    )
    assert message.headers == {"traceparent": "00-abc-def-01"} and message.attempt == 2
    assert message.created_at == dt.datetime(2024, 5, 1, 12, 0, 0, 123456)

    foreign = message_from_record(record(value=b"raw", headers=[]))
    assert foreign.id == uuid.uuid5(RECORD_ID_NAMESPACE, "kt/1/7"), "deterministic id from the coordinates"
    assert (foreign.topic, foreign.payload, foreign.content_type) == (
        "kt",
        b"raw",
        "application/octet-stream",
    )
    assert foreign.created_at == dt.datetime(2023, 11, 14, 22, 13, 20)
    with pytest.raises(UndecodableRecord):
        message_from_record(record(value=b"{not json", headers=[("content-type", b"application/json")]))


def test_dead_letter_headers_survive_any_bytes_and_are_written_once(engine: sa.Engine) -> None:
    headers = [("a", b"\xff\x00x"), ("a", "é".encode()), ("b", b"")]
    assert decode_record_headers(encode_record_headers(headers)) == headers
    letters = DeadLetters(T)
    poison = record(key=b"\xfe", value=None, headers=headers)
    with engine.begin() as conn:
        assert letters.add(conn, group="g", record=poison, message_id=None, error="E" * 5000, attempts=3)
    with engine.begin() as conn:
        assert not letters.add(conn, group="g", record=poison, message_id=None, error="again", attempts=3)
    (letter,) = dead_letters(engine)
    assert (letter.raw_key, letter.value, letter.headers) == (b"\xfe", None, headers)
    assert len(letter.error) == 2000 and letter.error.endswith("[truncated]")


def test_consumer_settings() -> None:
    settings = ConsumerSettings(
        "h:1",
        group="g",
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username="u",
        sasl_password="s3cret",
    )
    assert "s3cret" not in repr(settings)
    config = settings.consumer_config()
    assert (config["group_id"], config["enable_auto_commit"], config["client_id"]) == (
        "g",
        False,
        "outbox-consumer",
    )
    with pytest.raises(outbox.ConfigError, match="group"):
        ConsumerSettings("h:1", group="")
    with pytest.raises(outbox.ConfigError, match="auto_offset_reset"):
        ConsumerSettings("h:1", group="g", auto_offset_reset="middle")
    registry = Registry()
    registry.add("orders.created", print)
    assert subscription(registry) == (["orders.created"], None)
    registry.add("audit.*", print)
    _, pattern = subscription(registry)
    assert pattern is not None
    matches = [bool(re.match(pattern, t)) for t in ("orders.created", "audit.login", "orders.createdX", "x")]
    assert matches == [True, True, False, False]


def test_a_v1_database_upgrades_to_the_current_version(db_url: str) -> None:
    engine = outbox.create_engine(db_url)
    try:
        with engine.begin() as conn:  # what version 1 of this code created
            MIGRATIONS[0].apply(conn, T)
            conn.execute(sa.insert(T.meta).values(name="schema_version", value="1"))
            message_id = outbox.add(conn, "kept", {"n": 1})
        with engine.begin() as conn:
            assert [m.version for m in outbox.upgrade(conn)] == list(range(2, SCHEMA_VERSION + 1))
        with engine.connect() as conn:
            assert current_version(conn) == SCHEMA_VERSION
            check_version(conn)
            assert conn.execute(sa.select(T.messages.c.id)).scalars().all() == [message_id]
            inspector = sa.inspect(conn)
            assert inspector.has_table("outbox_inbox") and inspector.has_table("outbox_dead_letters")
            # the claim's one-probe index of the rows holding each key: PostgreSQL's alone (relay._claim)
            indexes = {ix["name"] for ix in inspector.get_indexes("outbox")}
            assert ("ix_outbox_holding" in indexes) == (engine.dialect.name == "postgresql"), indexes
        with engine.begin() as conn:
            assert outbox.upgrade(conn) == []
    finally:
        engine.dispose()


def test_a_fresh_database_goes_straight_to_the_current_version(db_url: str) -> None:
    engine = outbox.create_engine(db_url)
    try:
        with engine.begin() as conn:
            assert [m.version for m in outbox.upgrade(conn)] == list(range(1, SCHEMA_VERSION + 1))
        with engine.connect() as conn:
            assert current_version(conn) == SCHEMA_VERSION
    finally:
        engine.dispose()


def assert_one_line_error(result: Result, code: int, *fragments: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("outbox: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], result.stderr


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_consume_cli_errors_are_one_line(engine: sa.Engine, db_url: str) -> None:
    base = ["consume", "--database-url", db_url, "--app", APP]
    assert_one_line_error(invoke(*base, "--kafka-bootstrap-servers", "h:1"), cli.RET_CONFIG, "--group")
    assert_one_line_error(invoke(*base, "--group", "g"), cli.RET_CONFIG, "--kafka-bootstrap-servers")
    assert_one_line_error(
        invoke(*base, "--group", "g", "--kafka-bootstrap-servers", "nohostport"), cli.RET_CONFIG, "HOST:PORT"
    )
    secret = invoke(
        *base, "--group", "g", "--kafka-bootstrap-servers", "h:1", "--kafka-security-protocol", "SASL_SSL",
        "--kafka-sasl-username", "u", "--kafka-sasl-password", "hunter2-secret",
    )  # fmt: skip
    assert_one_line_error(secret, cli.RET_CONFIG, "mechanism")
    assert "hunter2-secret" not in secret.output
    assert_one_line_error(invoke("dlq", "show", "42", "--database-url", db_url), cli.RET_NOT_FOUND, "42")
    assert_one_line_error(
        invoke("dlq", "replay", "7", "--database-url", db_url, "--kafka-bootstrap-servers", "h:1"),
        cli.RET_NOT_FOUND,
        "7",
    )
    assert_one_line_error(invoke("dlq", "replay", "--database-url", db_url), cli.RET_USAGE, "--group")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_consume_with_an_unreachable_broker_fails_in_one_line(engine: sa.Engine, db_url: str) -> None:
    from tests.kafka_broker import free_port

    result = invoke(
        "consume", "--database-url", db_url, "--app", APP, "--group", "g",
        "--kafka-bootstrap-servers", f"127.0.0.1:{free_port()}",
    )  # fmt: skip
    assert result.exit_code == cli.RET_BROKER, result.output
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # after kafka-python's own warnings about each try
    assert last.startswith("outbox: error: cannot reach Kafka at 127.0.0.1:"), result.stderr
