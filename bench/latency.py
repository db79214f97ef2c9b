"""Latency: from a writer's commit to the start of the handler, at a steady 1,000 messages/s.

Why: an outbox is only as useful as it is prompt; the issue's target with LISTEN/NOTIFY is p50 under 5 ms
and p99 under 50 ms at 1,000 messages/s. A writer process commits one message per transaction, paced at
``RATE`` per second (four threads share the schedule, so a commit slower than 1 ms does not lower the
rate; the achieved rate is reported, with a note when it falls short); a relay process delivers to a
handler that records ``time.time()`` on entry minus the wall-clock time the writer put in the payload.
The writer reads that time just before its ``INSERT``, so ``p50``/``p99``/``max`` also include the
writer's own INSERT and COMMIT (reported beside them as ``writer commit p50``). The ``... from commit``
figures, which the issue's targets name ("from the writer's commit to the handler's start"), subtract
each message's own transaction time as the writer measured it (from before the INSERT to the return of
its COMMIT): they run from the moment the writer knows its message is committed.
One warm-up message goes through the relay before the writer starts (steady state, not connecting).

Variants (PostgreSQL):

- ``notify``: the default ``Outbox()`` sends ``pg_notify`` in each transaction; the relay (product
  defaults, poll interval 1 s) is woken by LISTEN;
- ``notify, 10 keys``: as ``notify``, each message keyed over 10 keys (round robin), so a key's next
  message is often committed while its previous one is still in flight;
- ``notify, 1 key``: as ``notify``, every message on one key, written by the four writer threads at
  once, so that messages of the key now and then commit out of ``seq`` order;
- ``polling 50 ms``: the writer uses ``Outbox(notify=False)`` and the relay polls every 50 ms
  (``poll_interval=0.05``), the price of finding work by polling alone.

- ``notify, Kafka ack``: as ``notify``, but the relay publishes to the Tansu broker (kafka-python,
  product settings) instead of running a handler; the latency runs from the writer's time to the row's
  ``delivered_at``, which the relay writes once the broker has acknowledged the record (so: commit to
  broker acknowledgement, plus the moment it takes to write the mark).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import sqlalchemy as sa

import outbox
from bench.broker import running_broker
from bench.harness import Result, Settings, fresh_database, log, outbox_engine
from bench.processes import Worker, stop_all
from bench.protocol import from_commit, latency_summary
from bench.workload import TOPIC, reset_table
from outbox._dialects import create_engine

NAME = "latency"
RATE = 1_000
#: writer threads (or asyncio tasks) sharing the 1,000/s schedule, so that a commit slower than 1 ms
#: (a NOTIFY commit under load is) does not lower the rate: each message is still due at start + i / RATE
LANES = 4

KAFKA = "notify, Kafka ack"
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (writer config, relay config); "kafka": True is replaced by the broker's address
    "notify": ({"notify": True}, {}),
    # the same rate spread over 10 keys, each key's messages in order (issue 14's target: as for unkeyed)
    "notify, 10 keys": ({"notify": True, "keys": 10}, {}),
    # one key written by the four writer lanes at once: they commit out of seq order now and then (a
    # message committed late must not stop its key: BENCHMARKS.md, "One key, concurrent writers")
    "notify, 1 key": ({"notify": True, "keys": 1}, {}),
    "polling 50 ms": ({"notify": False}, {"poll_interval": 0.05}),
    KAFKA: ({"notify": True}, {"kafka": True}),
}


def latency_once(
    url: str,
    writer: dict[str, Any],
    consumer: tuple[str, dict[str, Any]],
    duration: float,
    settings: Settings,
    *,
    marks: sa.Engine | None = None,
) -> dict[str, Any]:
    """Run one paced writer against one consumer process; return the consumer's latency summary.

    With ``marks`` (an engine on the outbox's database) the latencies are read from the table instead:
    from the writer's time in the payload to the row's ``delivered_at`` (for a relay publishing to Kafka,
    written once the broker has acknowledged the record).
    """
    role, config = consumer
    handler = Worker(role, {**config, "handler": "latency"}, settings).wait_ready()
    pacer = Worker(
        "writer", {**writer, "rate": RATE, "duration": duration, "lanes": LANES}, settings
    ).wait_ready()
    handler.go()
    warmed = 0
    if role == "relay":  # one message first: the relay's connections (and Kafka producer) are up
        _warm_up(url)
        warmed = 1
        deadline = time.monotonic() + 30
        while handler.count < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    time.sleep(0.5)  # the consumer is up and listening before the first commit
    pacer.go()
    written = pacer.wait_result(timeout=duration + 120)
    deadline = time.monotonic() + 30
    while handler.count < written["written"] + warmed and time.monotonic() < deadline:
        time.sleep(0.05)
    result = stop_all([handler])[0]
    latency = result["latency"] if marks is None else mark_latencies(marks)
    if latency.get("count", 0) < written["written"]:
        raise RuntimeError(f"{role} handled {latency.get('count', 0)} of {written['written']} messages")
    committed = latency_summary(from_commit(latency.pop("by_id"), written["commit_s"]))
    return {
        **latency,
        **{f"{name} from commit": value for name, value in committed.items() if name != "count"},
        "writer_rate": written["rate"],
        "writer_commit_p50_ms": written["commit_p50_ms"],
    }


def _warm_up(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        outbox.add(conn, TOPIC, {"warmup": True})
    engine.dispose()


def mark_latencies(engine: sa.Engine) -> dict[str, Any]:
    """Latencies from the payload's ``t`` to ``delivered_at`` (naive UTC) of every delivered row."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT payload, delivered_at FROM outbox WHERE delivered_at IS NOT NULL")
        ).all()
    bodies = [(r.delivered_at, json.loads(r.payload)) for r in rows]
    by_id = [
        [body["order_id"], at.replace(tzinfo=dt.UTC).timestamp() - body["t"]]
        for at, body in bodies
        if "t" in body
    ]
    return latency_summary([lat for _, lat in by_id], by_id)


def record_latencies(
    recorder: Any, scenario: str, variant: str, samples: list[dict[str, Any]], common: dict[str, Any]
) -> None:
    for metric in ("p50_ms", "p99_ms", "max_ms"):
        for suffix in ("", " from commit"):
            recorder.add(
                Result(
                    scenario,
                    variant,
                    "postgresql",
                    metric.removesuffix("_ms") + suffix,
                    "ms",
                    [s[metric + suffix] for s in samples],
                    common,
                    higher_is_better=False,
                )
            )
    rates = [s["writer_rate"] for s in samples]
    recorder.add(Result(scenario, variant, "postgresql", "writer rate", "msg/s", rates, common))
    if min(rates) < 0.95 * RATE:
        recorder.note(
            scenario,
            f"{variant}: the writer reached only {min(rates):,.0f} messages/s in its slowest run "
            f"(target {RATE:,}): its latency figures are at that rate",
        )
    recorder.add(
        Result(
            scenario,
            variant,
            "postgresql",
            "writer commit p50",
            "ms",
            [s["writer_commit_p50_ms"] for s in samples],
            common,
            higher_is_better=False,
        )
    )


def run(settings: Settings, recorder: Any) -> None:
    duration = settings.pick(10.0, 2.0, 0.7)
    with fresh_database("postgresql", settings) as url, running_broker(settings.tmp) as bootstrap:
        engine = outbox_engine(url)
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
        for run_index in range(settings.runs):
            names = list(VARIANTS) if run_index % 2 == 0 else list(reversed(VARIANTS))
            for name in names:
                writer_cfg, relay_cfg = VARIANTS[name]
                kafka = bool(relay_cfg.get("kafka"))
                relay_cfg = {**relay_cfg, "kafka": bootstrap} if kafka else relay_cfg
                reset_table(engine)
                sample = latency_once(
                    url,
                    {"kind": "outbox", "url": url, **writer_cfg},
                    ("relay", {"url": url, **relay_cfg}),
                    duration,
                    settings,
                    marks=engine if kafka else None,
                )
                samples[name].append(sample)
                log(f"latency {name}: p50 {sample['p50_ms']:.1f} ms, p99 {sample['p99_ms']:.1f} ms")
        engine.dispose()
    for name, (writer_cfg, relay_cfg) in VARIANTS.items():
        common = {
            "rate": RATE,
            "duration_s": duration,
            "writer": writer_cfg,
            "relay": relay_cfg or "defaults",
        }
        record_latencies(recorder, NAME, name, samples[name], common)
