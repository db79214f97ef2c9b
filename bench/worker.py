"""The processes the scenarios start: ``python -m bench.worker ROLE CONFIG_JSON``.

Each role prints ``ready`` once set up, waits for ``go`` on stdin, reports ``progress COUNT MONOTONIC``
while it works (``done MONOTONIC`` when it finishes by itself), and on ``stop`` prints ``result JSON`` and
exits (:mod:`bench.protocol`; the parent side is :class:`bench.processes.Worker`). Roles:

``relay``
    One :class:`relay.Relay` delivering to a no-op handler (or to Kafka), or recording latencies.
``writer``
    Writes one message per transaction, paced at ``rate`` per second (or as fast as it can with
    ``rate`` 0), through ``outbox.add``, pgqueuer's ``enqueue`` or procrastinate's ``defer_async``.
``ceiling``
    A Kafka producer alone (kafka-python or confluent-kafka) sending the backlog's records as fast as it
    can: the figure the relay's publish rate is compared with.
``naive``, ``pgqueuer``, ``procrastinate``
    The peers (:mod:`bench.peer_roles`), draining their backlog or handling a paced stream.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from bench import peer_roles
from bench.protocol import (
    Reporter,
    cpu_seconds,
    go,
    latency_summary,
    memory_kb,
    paced,
    read_commands,
    run_async,
    say,
    stop,
)

# --- our relay ---------------------------------------------------------------------------------------------


def role_relay(cfg: dict[str, Any]) -> dict[str, Any]:
    from consumers import Registry
    from relay import Relay

    latencies: list[float] = []
    by_id: list[list[float]] = []
    registry = Registry()

    def noop(message: Any) -> None:
        pass

    def record(message: Any) -> None:
        started = time.time()
        if "t" in message.payload:  # not the warm-up message
            latencies.append(started - message.payload["t"])
            by_id.append([message.payload["order_id"], latencies[-1]])

    kafka = None
    if cfg.get("kafka"):
        from relay.publishers.kafka import KafkaSettings

        kafka = KafkaSettings(cfg["kafka"], **cfg.get("kafka_options", {}))
    else:
        from bench.workload import TOPIC

        # An exact topic, as applications register (a pattern such as "*" costs an fnmatch per message).
        registry.add(TOPIC, record if cfg.get("handler") == "latency" else noop)
    # Only what the scenario sets is passed: everything else is as `outbox relay` runs it, the engine
    # included (built by the relay from the URL) and freeze_gc (the CLI's: see relay.Relay).
    settable = ("batch_size", "max_batch_size", "workers", "poll_interval", "max_in_flight")
    options = {k: cfg[k] for k in settable if k in cfg}
    relay = Relay(cfg["url"], registry, kafka=kafka, freeze_gc=True, **options)
    engine = relay.engine
    effective = {
        "batch_size": relay.batch_size,
        "max_batch_size": relay.max_batch_size,
        "workers": relay.handlers.workers,
        "max_in_flight": relay.max_in_flight,
        "poll_interval": relay.poll_interval,
    }
    say("ready")
    go.wait()
    before = memory_kb()
    cpu_before = cpu_seconds()
    started = time.monotonic()
    relay.start()
    reporter = Reporter(lambda: relay.counters["delivered"]).start()
    stop.wait()
    reporter.stop()
    relay.stop()
    engine.dispose()
    return {
        "counters": dict(relay.counters),
        "seconds": time.monotonic() - started,
        "cpu_seconds": cpu_seconds() - cpu_before,
        "rss_before_kb": before.get("VmRSS"),
        "memory_kb": memory_kb(),
        "latency": latency_summary(latencies, by_id),
        "relay_settings": effective,
    }


# --- writers -----------------------------------------------------------------------------------------------
def role_writer(cfg: dict[str, Any]) -> dict[str, Any]:
    from bench.workload import TOPIC, payload

    kind = cfg.get("kind", "outbox")
    rate, duration = float(cfg["rate"]), float(cfg["duration"])
    lanes = int(cfg.get("lanes", 1))
    if kind == "outbox":
        import outbox

        engine = outbox.create_engine(cfg["url"], pool_size=max(5, lanes))
        writer = outbox.Outbox(notify=cfg.get("notify", True))
        keys = int(cfg.get("keys", 0))  # messages keyed over this many keys, round robin (0: unkeyed)
        with engine.connect():
            pass  # open a pooled connection before the clock starts

        def write(i: int, lane: int) -> float:
            body = payload(i)
            with engine.begin() as conn:
                body["t"] = sent = time.time()
                writer.add(conn, TOPIC, body, key=f"k{i % keys}" if keys else None)
            return time.time() - sent

        say("ready")
        go.wait()
        result = paced(rate, duration, lanes, write)
        engine.dispose()
        return result
    if kind == "pgqueuer":
        return run_async(peer_roles.pgqueuer_writer(cfg, rate, duration, lanes), uvloop=True)
    if kind == "procrastinate":
        return run_async(peer_roles.procrastinate_writer(cfg, rate, duration, lanes), uvloop=False)
    raise ValueError(f"unknown writer kind {kind!r}")


# --- the Kafka ceiling -------------------------------------------------------------------------------------


def role_ceiling(cfg: dict[str, Any]) -> dict[str, Any]:
    """Produce the backlog's records (read from the outbox table) with the client alone."""
    import sqlalchemy as sa

    import outbox
    from outbox._runtime.kafka_settings import HEADER_CONTENT_TYPE, HEADER_CREATED_AT, HEADER_ID, HEADER_TOPIC
    from relay.publishers.kafka import KafkaSettings

    engine = outbox.create_engine(cfg["url"])
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT id, topic, msg_key, payload, content_type, created_at FROM outbox "
                "WHERE status = 'pending' ORDER BY seq"
            )
        ).all()
    engine.dispose()
    records = [
        (
            cfg.get("topic") or r.topic,
            r.msg_key.encode() if r.msg_key is not None else None,
            bytes(r.payload),
            [
                (HEADER_ID, str(r.id).encode()),
                (HEADER_TOPIC, r.topic.encode()),
                (HEADER_CREATED_AT, r.created_at.isoformat().encode()),
                (HEADER_CONTENT_TYPE, r.content_type.encode()),
            ],
        )
        for r in rows
    ]
    settings = KafkaSettings(cfg["bootstrap"], **cfg.get("kafka_options", {}))
    sent = [0]
    if cfg.get("client", "kafka-python") == "kafka-python":
        from kafka import KafkaProducer

        producer = KafkaProducer(**settings.producer_config())
        producer.send(records[0][0], value=b"warm-up").get(30)  # metadata and connection before the clock

        def produce() -> None:
            for topic, key, value, headers in records:
                producer.send(topic, key=key, value=value, headers=headers)
                sent[0] += 1
            producer.flush()

    else:
        from confluent_kafka import Producer

        try:  # the relay's own librdkafka configuration, when the confluent backend exists
            from relay.publishers.confluent import librdkafka_config

            config = librdkafka_config(settings)
        except ImportError:
            config = {
                "bootstrap.servers": cfg["bootstrap"],
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": settings.linger_ms,
                "batch.size": settings.batch_size,
                "message.max.bytes": settings.max_request_size,
            }
        producer = Producer(config)
        producer.produce(records[0][0], value=b"warm-up")
        producer.flush(30)

        def produce() -> None:
            for topic, key, value, headers in records:
                while True:
                    try:
                        producer.produce(topic, value=value, key=key, headers=headers)
                        break
                    except BufferError:
                        producer.poll(0.05)
                producer.poll(0)
                sent[0] += 1
            producer.flush(120)

    say("ready")
    go.wait()
    reporter = Reporter(lambda: sent[0]).start()
    cpu_before = cpu_seconds()
    started = time.monotonic()
    produce()
    finished = time.monotonic()
    reporter.stop()  # the final count goes out before "done", which the parent takes as the end
    say("done", finished)
    return {
        "records": len(records),
        "cpu_seconds": cpu_seconds() - cpu_before,
        "seconds": finished - started,
        "rate": len(records) / (finished - started),
    }


ROLES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "relay": role_relay,
    "writer": role_writer,
    "ceiling": role_ceiling,
    "naive": peer_roles.role_naive,
    "pgqueuer": peer_roles.role_pgqueuer,
    "procrastinate": peer_roles.role_procrastinate,
}


def main() -> None:
    role, config = sys.argv[1], json.loads(sys.argv[2])
    threading.Thread(target=read_commands, daemon=True).start()
    try:
        result = ROLES[role](config)
    except BaseException as exc:
        say("error", f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500])
        raise
    say("result", json.dumps(result, default=str))
    sys.stdout.flush()
    os._exit(0)  # do not wait for library threads (producers, pools) at interpreter exit


if __name__ == "__main__":
    main()
