"""Publish throughput: the relay publishing a backlog to Kafka, beside the Kafka client's own ceiling.

Why: when the destination is Kafka, the client library's per-record CPU is the wall, not the database;
the honest yardstick is what that client can do alone on the same machine at the same moment. The issue's
targets: the relay reaches at least 70 % of kafka-python's ceiling, and with the confluent-kafka backend
(when ``relay.publishers.confluent`` exists) at least 15,000 messages/s.

Each run bulk-inserts a backlog on PostgreSQL, then (in alternating order) one relay process publishes it
to the Tansu broker (``KafkaSettings(bootstrap)``, the product's producer settings: idempotent,
``acks=all``, linger 5 ms, 256 KiB batches), and a ceiling process produces the very same records (same
topic, keys, values and the relay's four headers, read from the table before the relay starts) with the
same client and settings, flat out, timed from the first ``send`` to the end of ``flush()`` (after one
warm-up record has connected it). The relay process gets two seconds between its set-up and the start,
in which the confluent publisher connects; kafka-python's publisher connects on its first record, inside
the figure. The ratio relay/ceiling is taken per run. Then two relay processes publish a new backlog
of the same records (each has its own interpreter and GIL: how far a second relay takes the job).
Beside each side's rate: its own process's CPU per record, and the broker's and the database backends'
CPU per record while it ran.

Key depth (issue 14): in the same run, one relay publishes a backlog with no key and one whose every
message has the same key (a hot key: one partition, order kept), in alternating order; the one-key rate
and its ratio to the unkeyed rate say what ordered delivery of a deep key costs (target: at least 0.7).
"""

from __future__ import annotations

from typing import Any

from bench.broker import broker_cpu, running_broker
from bench.harness import (
    Result,
    Settings,
    backend_cpu,
    cpu_between,
    fresh_database,
    log,
    outbox_engine,
    ratio_values,
    vacuum_analyze,
)
from bench.processes import Worker, drain_with, stop_all
from bench.workload import TOPIC, KeyOf, insert_backlog, reset_table, status_counts

NAME = "publish"


def _clients() -> list[str]:
    clients = ["kafka-python"]
    try:
        import confluent_kafka  # noqa: F401

        from relay.publishers import confluent  # noqa: F401
        from relay.publishers.kafka import KafkaSettings

        if "client" in KafkaSettings.__dataclass_fields__:
            clients.append("confluent")
    except ImportError:
        pass
    return clients


def publish_once(
    url: str, bootstrap: str, count: int, client: str, relay_first: bool, settings: Settings
) -> dict[str, float]:
    """One run: the relay and the ceiling on the same fresh backlog, then two relays on a new one;
    returns each side's rate and CPU figures (``<side>``, ``<side>_cpu_us``, ``..._broker_cpu_us``,
    ``..._db_cpu_us``)."""
    engine = outbox_engine(url)

    def fresh_backlog() -> None:
        reset_table(engine)
        insert_backlog(engine, count)
        vacuum_analyze(url, "outbox")

    fresh_backlog()
    options = {"client": client} if client != "kafka-python" else {}
    ceiling = Worker("ceiling", {"url": url, "bootstrap": bootstrap, "client": client}, settings)
    ceiling.wait_ready(timeout=300)  # it has read the records and created the topic
    rates: dict[str, float] = {}
    database = engine.url.database or ""

    def timed(who: str, workers: list[Worker], settle: float = 0.0) -> None:
        """Drain with ``workers``; record the rate, and what the broker and the database's backends
        spent per record meanwhile (read before the workers stop: their backends end with them)."""
        broker_before, db_before = broker_cpu(), backend_cpu(database)
        rates[who] = count / drain_with(workers, count, timeout=120 + count / 200, settle=settle)
        if broker_before:  # none with an external broker (OUTBOX_BENCH_KAFKA_BOOTSTRAP): not measured
            rates[f"{who}_broker_cpu_us"] = cpu_between(broker_before, broker_cpu()) / count * 1e6
        rates[f"{who}_db_cpu_us"] = cpu_between(db_before, backend_cpu(database)) / count * 1e6

    def relays(who: str, how_many: int) -> None:
        config = {"url": url, "kafka": bootstrap, "kafka_options": options}
        workers = [Worker("relay", config, settings) for _ in range(how_many)]
        try:
            # settle: the confluent publisher connects as the relay is built; give it the head start that
            # the ceiling's warm-up record gives the ceiling (kafka-python's connects on its first record).
            timed(who, workers, settle=2.0)
        finally:
            cpu_seconds = sum(result.get("cpu_seconds", 0.0) for result in stop_all(workers))
            rates[f"{who}_cpu_us"] = cpu_seconds / count * 1e6

    def relay() -> None:
        relays("relay", 1)

    def alone() -> None:
        timed("ceiling", [ceiling])
        rates["ceiling_cpu_us"] = stop_all([ceiling])[0].get("cpu_seconds", 0.0) / count * 1e6

    try:
        for step in (relay, alone) if relay_first else (alone, relay):
            step()
    finally:
        ceiling.close()
    _check_all_delivered(engine, count)
    # Then two relay processes on a new backlog of the same records: each has its own interpreter (and
    # GIL), so this says how far running a second relay takes the same job.
    fresh_backlog()
    relays("two_relays", 2)
    _check_all_delivered(engine, count)
    engine.dispose()
    return rates


def keyed_once(
    url: str, bootstrap: str, count: int, client: str, one_key_first: bool, settings: Settings
) -> dict[str, float]:
    """One relay publishing ``count`` unkeyed messages, and ``count`` messages of one key, each on a
    fresh backlog; returns the two rates (``unkeyed``, ``one key``) in msg/s."""
    engine = outbox_engine(url)
    options = {"client": client} if client != "kafka-python" else {}
    shapes: list[tuple[str, KeyOf]] = [("unkeyed", lambda i: None), ("one key", lambda i: "hot")]
    rates: dict[str, float] = {}
    for name, key_of in reversed(shapes) if one_key_first else shapes:
        reset_table(engine)
        insert_backlog(engine, count, key_of=key_of)
        vacuum_analyze(url, "outbox")
        workers = [Worker("relay", {"url": url, "kafka": bootstrap, "kafka_options": options}, settings)]
        try:
            # a key drained one record per broker round trip is slow: allow for it rather than fail
            rates[name] = count / drain_with(workers, count, timeout=120 + count / 20, settle=2.0)
        finally:
            stop_all(workers)
        _check_all_delivered(engine, count)
    engine.dispose()
    return rates


def _check_all_delivered(engine: Any, count: int) -> None:
    counts = status_counts(engine)
    if counts != {"delivered": count}:
        raise RuntimeError(f"after publishing the table holds {counts}, expected {count} delivered")


def run(settings: Settings, recorder: Any) -> None:
    count = settings.size(100_000, 5_000, 300)
    keyed_count = settings.size(100_000, 5_000, 300)
    clients = _clients()
    if "confluent" not in clients:
        recorder.note(NAME, "confluent variant skipped: no relay.publishers.confluent / KafkaSettings.client")
    with fresh_database("postgresql", settings) as url, running_broker(settings.tmp) as bootstrap:
        for client in clients:
            relay_rates: list[float] = []
            ceiling_rates: list[float] = []
            two_rates: list[float] = []
            cpu: dict[str, list[float]] = {}
            for run_index in range(settings.runs):
                rates = publish_once(url, bootstrap, count, client, run_index % 2 == 0, settings)
                relay_rates.append(rates["relay"])
                ceiling_rates.append(rates["ceiling"])
                two_rates.append(rates["two_relays"])
                for name, value in rates.items():
                    if name.endswith("_us"):
                        cpu.setdefault(name, []).append(value)
                log(
                    f"publish {client}: relay {rates['relay']:,.0f}/s, ceiling {rates['ceiling']:,.0f}/s,"
                    f" two relays {rates['two_relays']:,.0f}/s"
                )
            common = {
                "backlog": count,
                "client": client,
                "topic": TOPIC,
                "producer": "idempotent, acks=all, linger 5 ms, batch 256 KiB (KafkaSettings defaults)",
            }
            recorder.add(
                Result(NAME, f"relay ({client})", "postgresql", "throughput", "msg/s", relay_rates, common)
            )
            recorder.add(
                Result(NAME, f"two relays ({client})", "postgresql", "throughput", "msg/s", two_rates, common)
            )
            recorder.add(
                Result(
                    NAME,
                    f"{client} alone (ceiling)",
                    "postgresql",
                    "throughput",
                    "msg/s",
                    ceiling_rates,
                    common,
                )
            )
            # What bounds it: CPU time per record of each side's own process, and of the broker and the
            # database's backends while that side ran (the relay's own figure includes its SQL work).
            sides = (
                ("relay", f"relay ({client})"),
                ("ceiling", f"{client} alone (ceiling)"),
                ("two_relays", f"two relays ({client})"),
            )
            for who, label in sides:
                for part, metric in (
                    ("cpu", "CPU per msg"),
                    ("broker_cpu", "broker CPU per msg"),
                    ("db_cpu", "database CPU per msg"),
                ):
                    values = cpu.get(f"{who}_{part}_us")
                    if values is None:
                        continue
                    recorder.add(
                        Result(
                            NAME, label, "postgresql", metric, "us", values, common, higher_is_better=False
                        )
                    )
            recorder.add(
                Result(
                    NAME,
                    f"relay / ceiling ({client})",
                    "postgresql",
                    "ratio",
                    "x",
                    ratio_values(relay_rates, ceiling_rates),
                    common,
                )
            )
            recorder.add(
                Result(
                    NAME,
                    f"two relays / ceiling ({client})",
                    "postgresql",
                    "ratio",
                    "x",
                    ratio_values(two_rates, ceiling_rates),
                    common,
                )
            )
            keyed: dict[str, list[float]] = {"unkeyed": [], "one key": []}
            for run_index in range(settings.runs):
                rates = keyed_once(url, bootstrap, keyed_count, client, run_index % 2 == 1, settings)
                for name, rate in rates.items():
                    keyed[name].append(rate)
                log(
                    f"publish {client}: unkeyed {rates['unkeyed']:,.0f}/s, one key {rates['one key']:,.0f}/s"
                    f" ({rates['one key'] / rates['unkeyed']:.2f})"
                )
            keyed_common = {**common, "backlog": keyed_count, "relays": 1}
            for name, values in keyed.items():
                recorder.add(
                    Result(
                        NAME,
                        f"relay, {name} ({client})",
                        "postgresql",
                        "throughput",
                        "msg/s",
                        values,
                        keyed_common,
                    )
                )
            recorder.add(
                Result(
                    NAME,
                    f"relay, one key / unkeyed ({client})",
                    "postgresql",
                    "ratio",
                    "x",
                    ratio_values(keyed["one key"], keyed["unkeyed"]),
                    keyed_common,
                )
            )
