"""Peers: pgqueuer, procrastinate and a hand-written naive relay doing the same jobs, in the same run.

Why: "fast" means nothing without the alternatives a Python team would otherwise pick, measured on the
same PostgreSQL at the same moment. The issue's target: the relay drains at least 2.5 times as fast as
pgqueuer (the fastest Python peer here). Each system uses its own schema, installed with its own
installer (``pgqueuer.Queries.install()``, what ``pgq install`` runs; procrastinate's
``schema_manager.apply_schema_async()``, what ``procrastinate schema --apply`` runs) in the scenario's
database, and its documented fast settings (:data:`SETTINGS`, also written to the results):

- **enqueue**: one writer process, one job per transaction, as fast as it can for a fixed window
  (``outbox.add`` on a Core connection with the default ``pg_notify``; pgqueuer's ``enqueue`` on an
  asyncpg connection, autocommit; procrastinate's ``defer_async``);
- **drain**: a backlog (bulk-inserted with each system's batch API) handled by one worker process with a
  no-op job that decodes its JSON payload, until empty. pgqueuer runs twice, with its default
  ``batch_size`` (10) and with 250; the slow consumers get smaller backlogs (procrastinate a tenth,
  the naive relay a quarter: their rates are flat, and 100,000 jobs would take minutes per run);
- **latency**: commit-to-handler-start at 1,000 jobs/s, as in :mod:`bench.latency`.

The naive relay (:func:`bench.worker.role_naive`) is the floor everyone hand-writes: on the outbox table,
``BEGIN; SELECT ... ORDER BY due_at LIMIT 1 FOR UPDATE SKIP LOCKED; handle; UPDATE ... delivered;
COMMIT``, polling every 50 ms when idle. Variants alternate their order from run to run.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import sqlalchemy as sa

from bench.harness import (
    Result,
    Settings,
    backend_cpu,
    cpu_between,
    fresh_database,
    libpq_dsn,
    log,
    outbox_engine,
    ratio_values,
    vacuum_analyze,
)
from bench.latency import RATE, latency_once, record_latencies
from bench.processes import Worker, drain_with, stop_all
from bench.workload import insert_backlog, payload

NAME = "peers"
OURS = "sqla-outbox relay"

#: the peers' settings, from their documentation (see BENCHMARKS.md for the sources)
SETTINGS: dict[str, dict[str, Any]] = {
    OURS: {"relay": "product defaults (one process)"},
    "pgqueuer": {
        "driver": "AsyncpgDriver on one dedicated connection (performance-tuning guide)",
        "event loop": "uvloop (what `pgq run` uses)",
        "batch_size": 10,
        "durability": "durable (default; the outbox is durable too)",
        "listen/notify": "on (its insert trigger)",
    },
    "pgqueuer batch 250": {
        "as": "pgqueuer",
        "batch_size": 250,
        "why": "the tuning guide: raise batch_size for short jobs; 250 was the fastest of 10/25/100/250 here",
    },
    "procrastinate": {
        "connector": "PsycopgConnector (psycopg 3 pool)",
        "concurrency": 10,
        "why": "1 is the default; 10 was the fastest of 10/30/100 here for a no-op job",
        "listen_notify": True,
        "delete_jobs": "never (default; the outbox keeps delivered rows too)",
    },
    "naive relay": {"claim": "one row per transaction, FOR UPDATE SKIP LOCKED", "poll_interval_s": 0.05},
}


# --- the peers' schemas and backlogs -----------------------------------------------------------------------


async def _install(dsn: str) -> None:
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    from bench.peer_roles import procrastinate_app

    conn = await asyncpg.connect(dsn)
    try:
        await Queries(AsyncpgDriver(conn)).install()
    finally:
        await conn.close()
    app, _ = procrastinate_app({"dsn": dsn}, lambda **kw: None)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


async def _fill(dsn: str, system: str, count: int) -> None:
    chunk = 5_000
    if system == "pgqueuer":
        import asyncpg
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries

        conn = await asyncpg.connect(dsn)
        queries = Queries(AsyncpgDriver(conn))
        for first in range(0, count, chunk):
            n = min(chunk, count - first)
            bodies: list[bytes | None] = [json.dumps(payload(i)).encode() for i in range(first, first + n)]
            await queries.enqueue(["noop"] * n, bodies, [0] * n)
        await conn.close()
    else:
        from bench.peer_roles import procrastinate_app

        app, noop = procrastinate_app({"dsn": dsn}, lambda **kw: None)
        async with app.open_async():
            for first in range(0, count, chunk):
                await noop.batch_defer_async(*[payload(i) for i in range(first, min(first + chunk, count))])


def _clear(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE outbox, pgqueuer, pgqueuer_log, pgqueuer_statistics")
        conn.exec_driver_sql("TRUNCATE procrastinate_jobs CASCADE")


def _consumer(system: str, url: str, dsn: str, mode: str) -> tuple[str, dict[str, Any]]:
    if system == OURS:
        return "relay", {"url": url}
    if system.startswith("pgqueuer"):
        return "pgqueuer", {"dsn": dsn, "mode": mode, "batch_size": SETTINGS[system]["batch_size"]}
    if system == "procrastinate":
        return "procrastinate", {
            "dsn": dsn,
            "mode": mode,
            "concurrency": SETTINGS["procrastinate"]["concurrency"],
        }
    return "naive", {"dsn": dsn, "mode": mode, "poll_interval": SETTINGS["naive relay"]["poll_interval_s"]}


def _writer(system: str, url: str, dsn: str) -> dict[str, Any]:
    if system in ("pgqueuer", "procrastinate"):
        return {"kind": system, "dsn": dsn}
    return {"kind": "outbox", "url": url, "notify": system == OURS}


# --- the three measurements --------------------------------------------------------------------------------


def drain_peer(
    system: str, url: str, dsn: str, engine: sa.Engine, count: int, settings: Settings
) -> dict[str, float]:
    """Drain a fresh backlog of ``count`` with ``system``: its rate, its CPU and the database's per job."""
    _clear(engine)
    kind = SETTINGS[system].get("as", system)
    if kind in ("pgqueuer", "procrastinate"):
        asyncio.run(_fill(dsn, kind, count))
    else:
        insert_backlog(engine, count)
    vacuum_analyze(url, {"pgqueuer": "pgqueuer", "procrastinate": "procrastinate_jobs"}.get(kind, "outbox"))
    role, config = _consumer(system, url, dsn, "drain")
    workers = [Worker(role, config, settings)]
    database = sa.engine.make_url(url).database or ""
    try:
        workers[0].wait_ready()
        db_before = backend_cpu(database)
        seconds = drain_with(workers, count, timeout=120 + count / 100)
        db_cpu = cpu_between(db_before, backend_cpu(database))
    finally:
        result = stop_all(workers)[0]
    return {
        "rate": count / seconds,
        "cpu_us": result.get("cpu_seconds", 0.0) / count * 1e6,
        "db_cpu_us": db_cpu / count * 1e6,
    }


def enqueue_peer(
    system: str, url: str, dsn: str, engine: sa.Engine, seconds: float, settings: Settings
) -> float:
    _clear(engine)
    writer = Worker(
        "writer", {**_writer(system, url, dsn), "rate": 0, "duration": seconds}, settings
    ).wait_ready()
    writer.go()
    return float(writer.wait_result(timeout=seconds + 60)["rate"])


def run(settings: Settings, recorder: Any) -> None:
    count = settings.size(100_000, 3_000, 300)
    # Slow consumers get smaller backlogs (their rate is flat; 100,000 jobs would take minutes per run).
    backlogs = {system: count for system in SETTINGS}
    backlogs["procrastinate"] = max(50, count // 10)
    backlogs["naive relay"] = max(50, count // 4)
    window = settings.pick(5.0, 0.5, 0.3)
    duration = settings.pick(10.0, 1.5, 0.7)
    runs = settings.pick(settings.runs, 1, 1)  # quick: one run, to stay near two minutes
    systems = list(SETTINGS)
    writes = [OURS, "pgqueuer", "procrastinate"]  # the naive relay reads the outbox table: nothing of its own
    waits = [OURS, "pgqueuer", "procrastinate", "naive relay"]  # latency: one pgqueuer (batch size aside)
    for system, values in SETTINGS.items():
        recorder.note(NAME, f"{system} settings: {json.dumps(values)}; drain backlog {backlogs[system]:,}")
    with fresh_database("postgresql", settings) as url:
        dsn = libpq_dsn(url)
        engine = outbox_engine(url)
        asyncio.run(_install(dsn))
        enqueue: dict[str, list[float]] = {s: [] for s in writes}
        drain: dict[str, list[float]] = {s: [] for s in systems}
        cpu: dict[str, list[float]] = {s: [] for s in systems}
        db_cpu: dict[str, list[float]] = {s: [] for s in systems}
        latency: dict[str, list[dict[str, Any]]] = {s: [] for s in waits}
        for run_index in range(runs):
            shift = run_index % len(systems)
            for system in systems[shift:] + systems[:shift]:
                if system in enqueue:
                    enqueue[system].append(enqueue_peer(system, url, dsn, engine, window, settings))
                began = time.monotonic()
                figures = drain_peer(system, url, dsn, engine, backlogs[system], settings)
                drain[system].append(figures["rate"])
                cpu[system].append(figures["cpu_us"])
                db_cpu[system].append(figures["db_cpu_us"])
                log(f"peers {system}: drain {drain[system][-1]:,.0f}/s ({time.monotonic() - began:.0f}s)")
                if system in latency:
                    _clear(engine)
                    latency[system].append(
                        latency_once(
                            url,
                            _writer(system, url, dsn),
                            _consumer(system, url, dsn, "latency"),
                            duration,
                            settings,
                        )
                    )
        engine.dispose()
    for system in systems:
        common = {"settings": SETTINGS[system]}
        if system in enqueue:
            recorder.add(
                Result(
                    NAME,
                    f"{system} enqueue (1 job/tx)",
                    "postgresql",
                    "enqueue_rate",
                    "jobs/s",
                    enqueue[system],
                    {**common, "window_s": window},
                )
            )
        recorder.add(
            Result(
                NAME,
                f"{system} drain",
                "postgresql",
                "throughput",
                "jobs/s",
                drain[system],
                {**common, "backlog": backlogs[system]},
            )
        )
        # What bounds it: the consumer process's CPU per job, and the database backends' serving it.
        for metric, values in (("CPU per job", cpu), ("db CPU per job", db_cpu)):
            recorder.add(
                Result(
                    NAME,
                    f"{system} drain",
                    "postgresql",
                    metric,
                    "us",
                    values[system],
                    {"backlog": backlogs[system]},
                    higher_is_better=False,
                )
            )
        if system in latency:
            record_latencies(
                recorder,
                NAME,
                f"{system} latency @{RATE}/s",
                latency[system],
                {**common, "duration_s": duration},
            )
    for system in systems[1:]:
        recorder.add(
            Result(
                NAME,
                f"relay drain / {system} drain",
                "postgresql",
                "ratio",
                "x",
                ratio_values(drain[OURS], drain[system]),
                {"backlogs": [backlogs[OURS], backlogs[system]]},
            )
        )
