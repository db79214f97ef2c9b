"""Consume: how fast ``outbox consume`` finishes Kafka records, beside a bare kafka-python consumer.

Why: issue 15's targets, on this machine with the broker and PostgreSQL on it too: one ``outbox
consume`` process on a 4-partition topic of 100,000 records (published by the relay, half of them
keyed) finishes at least 5,000 records/s with a session handler that inserts one row (``session.add``)
and 10,000 records/s with a handler without a session; from the send to the handler's start at 1,000
records/s, p99 under 100 ms.

Each figure is a real ``outbox consume`` subprocess (product defaults: batches of up to 500 records,
4 partition workers) in a consumer group of its own, reading the topic from the start; the rate runs
from the first committed batch to the last (``processed_at`` of the group's inbox rows), so that joining
the group (about half the session timeout with the test broker) is not counted. Variants:

- ``session handler`` and ``plain handler`` (``bench.consume_app``);
- ``session handler, savepoints``: ``--batch-isolation savepoint`` (a savepoint around each handler)
  against the default ``redo`` (a failing handler rolls the batch back and it is run again without it),
  on a fifth of the records;
- ``bare kafka-python``: ``bench.consume_ceiling``, a ``KafkaConsumer`` that only reads, the ceiling,
  in the same run;
- ``latency``: a paced kafka-python producer sends records the way the relay does (its headers, the
  send time in the payload) at 1,000 records/s; the handler records ``time.time()`` minus that time on
  entry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.broker import running_broker
from bench.harness import (
    ROOT,
    Result,
    Settings,
    fresh_database,
    log,
    outbox_engine,
    percentile,
    vacuum_analyze,
)
from bench.workload import insert_backlog, status_counts

NAME = "consume"
PARTITIONS = 4
RATE = 1_000
SESSION_MS = 6000


def create_topic(bootstrap: str, name: str) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(name, num_partitions=PARTITIONS, replication_factor=1)])
    finally:
        admin.close()


def publish_backlog(engine: sa.Engine, bootstrap: str, topic: str, count: int) -> None:
    """``count`` messages (half keyed) published to ``topic`` by the real relay."""
    from consumers import Registry
    from relay import Relay
    from relay.publishers.kafka import KafkaSettings

    insert_backlog(engine, count, topic=topic)
    deadline = time.monotonic() + 120 + count / 1000
    with Relay(engine, Registry(), kafka=KafkaSettings(bootstrap)):
        while status_counts(engine).get("delivered", 0) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the relay did not publish {count} messages: {status_counts(engine)}")
            time.sleep(0.2)


def consume_process(
    url: str, bootstrap: str, group: str, env: dict[str, str], *extra: str
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "outbox", "consume", "--app", "bench.consume_app:registry", "--group", group,
        "--database-url", url, "--kafka-bootstrap-servers", bootstrap,
        "--session-timeout-ms", str(SESSION_MS), *extra,
    ]  # fmt: skip
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    child_env.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.Popen(
        command, cwd=ROOT, env=child_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def stop(process: subprocess.Popen[bytes]) -> str:
    """SIGTERM, wait; the stderr tail (for errors)."""
    process.terminate()
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    return err.decode(errors="replace")[-2000:]


def rate_once(
    engine: sa.Engine, url: str, bootstrap: str, topic: str, kind: str, count: int, *extra: str
) -> float:
    """Records/s of one ``outbox consume`` finishing ``count`` records with a ``kind`` handler."""
    group = f"bench-{kind}-{uuid.uuid4().hex[:8]}"
    env = {"BENCH_CONSUME_TOPIC": topic, "BENCH_CONSUME_KIND": kind}
    process = consume_process(url, bootstrap, group, env, "--batch-records", "500", *extra)
    query = sa.text(
        "SELECT count(*), min(processed_at), max(processed_at) FROM outbox_inbox WHERE consumer_group = :g"
    )
    deadline = time.monotonic() + 120 + count / 500
    try:
        while True:
            with engine.connect() as conn:
                done, first, last = conn.execute(query, {"g": group}).one()
            if done >= count:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"outbox consume finished {done} of {count}: {stop(process)}")
            time.sleep(0.1)
    finally:
        stop(process)
    with engine.connect() as conn:
        at_first = conn.execute(
            sa.text("SELECT count(*) FROM outbox_inbox WHERE consumer_group = :g AND processed_at = :t"),
            {"g": group, "t": first},
        ).scalar_one()
    # smoke sizes may finish in a batch or two: a millisecond at least, so that the figure stays finite
    return float((count - at_first) / max((last - first).total_seconds(), 0.001))


def ceiling_once(bootstrap: str, topic: str, count: int) -> float:
    done = subprocess.run(
        [sys.executable, "-m", "bench.consume_ceiling", bootstrap, topic, f"bare-{uuid.uuid4().hex[:8]}",
         str(count)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["records"] < count:
        raise RuntimeError(f"the bare consumer read {result['records']} of {count}")
    return float(result["rate"])


def latency_once(url: str, bootstrap: str, seconds: float, tmp: Path) -> dict[str, float]:
    """p50/p99/max in ms from the send to the handler's start, at ``RATE`` records/s for ``seconds``."""
    topic = f"bench.consume.latency.{uuid.uuid4().hex[:8]}"
    create_topic(bootstrap, topic)
    path = tmp / f"{topic}.txt"
    env = {"BENCH_CONSUME_TOPIC": topic, "BENCH_CONSUME_KIND": "latency", "BENCH_LATENCY_FILE": str(path)}
    process = consume_process(url, bootstrap, f"bench-latency-{uuid.uuid4().hex[:8]}", env)
    producer = _producer(bootstrap)
    try:
        _send(producer, topic, 0)  # the group is joined and consuming before the paced records start
        _wait_lines(path, 1, 60, process)
        count = int(seconds * RATE)
        started = time.monotonic()
        for i in range(count):
            pause = started + i / RATE - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            _send(producer, topic, i + 1)
        producer.flush()
        _wait_lines(path, count + 1, 60, process)
    finally:
        producer.close()
        stop(process)
    latencies = sorted(float(line) * 1000 for line in path.read_text().split()[1:])
    return {"p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99), "max": latencies[-1]}


def _producer(bootstrap: str) -> Any:
    from kafka import KafkaProducer

    from relay.publishers.kafka import KafkaSettings

    return KafkaProducer(**KafkaSettings(bootstrap).producer_config())


def _send(producer: Any, topic: str, i: int) -> None:
    """A record as the relay sends it: its headers, a JSON value (with the send time ``t``)."""
    headers = [
        ("outbox-message-id", str(uuid.uuid4()).encode()),
        ("outbox-topic", topic.encode()),
        ("content-type", b"application/json"),
    ]
    value = json.dumps({"i": i, "t": time.time()}).encode()
    producer.send(topic, value=value, key=f"k{i % 16}".encode(), headers=headers)


def _wait_lines(path: Path, lines: int, timeout: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or path.read_text().count("\n") < lines:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the latency consumer handled too little: {stop(process)}")
        time.sleep(0.05)


def run(settings: Settings, recorder: Any) -> None:
    count = settings.size(100_000, 20_000, 500)
    savepoint_count = max(10, count // 5)
    seconds = settings.pick(10.0, 3.0, 1.0)
    rates: dict[str, list[float]] = {}
    latencies: list[dict[str, float]] = []
    with fresh_database("postgresql", settings) as url, running_broker(settings.tmp) as bootstrap:
        engine = outbox_engine(url)
        from bench.consume_app import Base

        Base.metadata.create_all(engine)
        topic = f"bench.consume.{uuid.uuid4().hex[:8]}"
        create_topic(bootstrap, topic)
        publish_backlog(engine, bootstrap, topic, count)
        vacuum_analyze(url, "outbox")  # the relay's 100,000 marks settled: the first run starts as the others
        with engine.connect() as conn:
            conn.execute(sa.text("CHECKPOINT"))
        log(f"consume: {count:,} records published to {PARTITIONS} partitions")
        variants = {
            "session handler": lambda: rate_once(engine, url, bootstrap, topic, "session", count),
            "plain handler": lambda: rate_once(engine, url, bootstrap, topic, "plain", count),
            "bare kafka-python": lambda: ceiling_once(bootstrap, topic, count),
            "session handler, redo": lambda: rate_once(
                engine, url, bootstrap, topic, "session", savepoint_count, "--batch-isolation", "redo"
            ),
            "session handler, savepoints": lambda: rate_once(
                engine, url, bootstrap, topic, "session", savepoint_count, "--batch-isolation", "savepoint"
            ),
        }
        for _ in range(settings.runs):
            for name, measure in variants.items():
                rate = measure()
                rates.setdefault(name, []).append(rate)
                log(f"consume {name}: {rate:,.0f} records/s")
            latencies.append(latency_once(url, bootstrap, seconds, settings.tmp))
            log(f"consume latency: p50 {latencies[-1]['p50']:.1f} ms, p99 {latencies[-1]['p99']:.1f} ms")
        engine.dispose()
    common = {"records": count, "partitions": PARTITIONS, "batch_records": 500}
    for name, values in rates.items():
        records = savepoint_count if name.endswith(("redo", "savepoints")) else count
        recorder.add(
            Result(NAME, name, "postgresql", "rate", "rec/s", values, {**common, "records": records})
        )
    for metric in ("p50", "p99", "max"):
        recorder.add(
            Result(
                NAME,
                "latency at 1,000 rec/s",
                "postgresql",
                metric,
                "ms",
                [s[metric] for s in latencies],
                {"rate": RATE, "seconds": seconds, "partitions": PARTITIONS},
                higher_is_better=False,
            )
        )
