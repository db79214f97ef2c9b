"""`outbox relay` publishing to Kafka, killed with SIGKILL mid-stream: after restarts, all arrives."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
import sqlalchemy as sa

import outbox
from outbox._clock import utcnow
from outbox._runtime.kafka_settings import HEADER_ID
from tests.apps import ROOT
from tests.conftest import status_counts, wait_until
from tests.kafka_check import read_all

#: enough that a relay killed shortly after its 200 more deliveries is still mid-stream: runs of up to
#: 1,024 published 5,000 messages over 40 keys before a second kill could come (CI, MariaDB)
TOTAL = 12_000


def key_state(engine: sa.Engine) -> str:
    """Each unfinished key's first unfinished row (status, due_at, attempts) and how many rows of it wait."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT msg_key, MIN(seq), COUNT(*), SUM(CASE WHEN due_at IS NULL THEN 1 ELSE 0 END) "
                "FROM outbox WHERE status <> 'delivered' GROUP BY msg_key ORDER BY msg_key"
            )
        ).all()
        lines = []
        for key, first, waiting, queued in rows:
            head = conn.execute(
                sa.text("SELECT status, due_at, attempts FROM outbox WHERE seq = :seq"), {"seq": first}
            ).one()
            lines.append(f"{key}: {waiting} left ({queued} queued), first {first}: {tuple(head)}")
    return f"now {utcnow()}; " + "\n".join(lines)


def start_relay(db_url: str, bootstrap: str, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env["PYTHONPATH"] = str(ROOT)
    command = [
        sys.executable, "-m", "outbox", "relay", "--database-url", db_url,
        "--kafka-bootstrap-servers", bootstrap, "--lease-seconds", "2", "--batch-size", "100",
        "--poll-interval", "0.1",
    ]  # fmt: skip
    with log.open("ab") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_killed_relay_publishing_to_kafka_loses_nothing(
    engine: sa.Engine, db_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = f"crash.{uuid.uuid4().hex[:8]}"
    committed: dict[str, int] = {}
    with engine.begin() as conn:
        for i in range(TOTAL):
            committed[str(outbox.add(conn, topic, {"i": i}, key=f"k{i % 40}"))] = i
    log = tmp_path / "relay.log"
    rng = random.Random(7)
    kills = 0
    for _ in range(4):
        relay = start_relay(db_url, kafka_bootstrap, log)
        # 200 more delivered (or all of them: a fast relay may have left fewer), then killed mid-stream
        enough = min(status_counts(engine).get("delivered", 0) + 200, TOTAL)
        wait_until(
            lambda enough=enough: status_counts(engine).get("delivered", 0) >= enough,  # type: ignore[misc]
            timeout=60,
            what="the relay publishing",
            explain=lambda: key_state(engine),
        )
        time.sleep(rng.uniform(0.02, 0.15))
        relay.send_signal(signal.SIGKILL)
        relay.wait(10)
        kills += 1
        if status_counts(engine).get("delivered", 0) == TOTAL:
            break
    running = log.read_text().count("relay running with")
    final = start_relay(db_url, kafka_bootstrap, log)
    try:
        # (its signal handlers are in place once it says so: a SIGTERM before that would kill it)
        wait_until(lambda: log.read_text().count("relay running with") > running, what="the relay running")
        wait_until(
            lambda: status_counts(engine) == {"delivered": TOTAL},
            timeout=120,
            what="all delivered",
            explain=lambda: key_state(engine),
        )
    finally:
        final.send_signal(signal.SIGTERM)
        assert final.wait(30) == 0
    assert kills >= 2

    records = read_all(kafka_bootstrap, [topic], expect=TOTAL, timeout=90)
    first_seen: dict[str, tuple[int, int, int]] = {}
    for record in records:
        position = (record.partition, record.offset, json.loads(record.value)["i"])
        first_seen.setdefault(record.headers[HEADER_ID], position)
    assert set(first_seen) == set(committed), f"lost {len(set(committed) - set(first_seen))} message(s)"
    duplicates = len(records) - len(first_seen)
    print(f"{kills} kills, {duplicates} duplicate record(s) of {TOTAL}")
    per_key: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for _message_id, (partition, offset, i) in first_seen.items():
        per_key[i % 40].append((partition, offset, i))
    for key, items in per_key.items():
        order = [i for _, _, i in sorted(items)]
        assert order == sorted(order), f"order broken for key k{key} after de-duplication"
