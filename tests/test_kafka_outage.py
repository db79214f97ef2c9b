"""The broker goes away for 30 seconds mid-stream; the relay waits, resumes, and loses nothing."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

import outbox
from consumers import Registry
from relay import Relay
from relay.publishers.kafka import HEADER_ID, KafkaSettings
from tests.conftest import status_counts, wait_until
from tests.kafka_broker import Broker
from tests.kafka_check import Record, read_all
from tests.tcp_proxy import TcpProxy

OUTAGE_SECONDS = 30


class SteadyWriter:
    """Commits one keyed message every few milliseconds until stopped (every other one on the key
    ``hot``); remembers what committed."""

    def __init__(self, engine: sa.Engine, topic: str) -> None:
        self.engine = engine
        self.topic = topic
        self.committed: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> SteadyWriter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            with self.engine.begin() as conn:
                # half on one hot key: the outage leaves a deep run of it to publish, pipelined
                key = "hot" if i % 2 == 0 else f"k{i % 25}"
                message_id = outbox.add(conn, self.topic, {"i": i}, key=key)
            self.committed[str(message_id)] = i
            i += 1
            self._stop.wait(0.01)


def check_everything_arrived(engine: sa.Engine, records: list[Record], committed: dict[str, int]) -> None:
    first_seen: dict[str, Record] = {}
    for record in records:
        first_seen.setdefault(record.headers[HEADER_ID], record)
    assert set(first_seen) == set(committed), f"lost: {len(set(committed) - set(first_seen))}"
    per_key: dict[str | None, list[tuple[int, int, int]]] = defaultdict(list)
    for record in first_seen.values():
        per_key[record.key].append((record.partition, record.offset, json.loads(record.value)["i"]))
    for key, items in per_key.items():
        order = [i for _, _, i in sorted(items)]
        assert order == sorted(order), f"order broken for key {key}"
    t = outbox.tables_for().messages
    with engine.connect() as conn:
        errors = conn.execute(sa.select(sa.func.count()).where(t.c.last_error.is_not(None))).scalar()
    assert errors == 0, "the outage was counted against messages"
    assert status_counts(engine) == {"delivered": len(committed)}


def run_outage(
    engine: sa.Engine, bootstrap: str, go_away: Callable[[], None], come_back: Callable[[], None]
) -> None:
    topic = f"outage.{uuid.uuid4().hex[:8]}"
    settings = KafkaSettings(bootstrap, request_timeout_ms=5000, delivery_timeout_ms=15000)
    relay = Relay(engine, Registry(), kafka=settings, poll_interval=0.1, lease_seconds=10)
    writer = SteadyWriter(engine, topic).start()
    with relay:
        wait_until(lambda: status_counts(engine).get("delivered", 0) > 100, timeout=30, what="flowing")
        go_away()
        time.sleep(OUTAGE_SECONDS)  # the outage itself is the thing under test: it must last this long
        pending_during_outage = status_counts(engine).get("pending", 0) + status_counts(engine).get(
            "inflight", 0
        )
        come_back()
        time.sleep(3)
        writer.stop()
        wait_until(
            lambda: status_counts(engine) == {"delivered": len(writer.committed)},
            timeout=120,
            what="everything delivered after the outage",
        )
    assert pending_during_outage > 0, "the outage did hold messages back"
    records = read_all(bootstrap, [topic], expect=len(writer.committed), timeout=90)
    check_everything_arrived(engine, records, writer.committed)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql"])
def test_frozen_broker_for_30s_loses_nothing(engine: sa.Engine, private_broker: Broker) -> None:
    run_outage(engine, private_broker.bootstrap, private_broker.freeze, private_broker.thaw)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mariadb"])
def test_cut_off_broker_for_30s_loses_nothing(engine: sa.Engine, tmp_path: Path) -> None:
    from tests.kafka_broker import free_port

    proxy_port = free_port()
    broker = Broker(tmp_path, advertised_port=proxy_port).start()
    proxy = TcpProxy("127.0.0.1", broker.port, port=proxy_port)
    try:
        run_outage(engine, broker.bootstrap, proxy.cut, proxy.restore)
    finally:
        proxy.close()
        broker.stop()
