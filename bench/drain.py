"""Drain throughput: how fast relays empty a backlog into no-op in-process handlers.

Why: this is the relay's own cost per message (claim, decode, dispatch, mark) with nothing else in the
way; the issue's target is at least 20,000 messages/s on PostgreSQL. A backlog of pending messages
(:mod:`bench.workload`: ~200-byte JSON, half keyed over many keys) is bulk-inserted, then one relay
process, then two relay processes side by side (separate interpreters, so no shared GIL), deliver it.
The figure is messages/s from the moment the relays are told to start until the last delivered mark is
written (each relay reports its ``delivered`` counter, which counts committed marks). SQLite allows
one relay at a time, so it has the one-relay variant only. The relays run with the product's defaults.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from bench.harness import (
    Result,
    Settings,
    backend_cpu,
    busy_share,
    cpu_between,
    cpu_jiffies,
    fresh_database,
    log,
    outbox_engine,
    ratio_values,
    vacuum_analyze,
)
from bench.processes import Worker, drain_with, stop_all
from bench.workload import KeyOf, insert_backlog, key_for, reset_table, status_counts

NAME = "drain"


def drain_once(
    url: str,
    backend: str,
    count: int,
    relays: int,
    settings: Settings,
    *,
    keep_table: bool = False,
    expect_total: int | None = None,
    key_of: KeyOf = key_for,
) -> dict[str, Any]:
    """Insert a backlog of ``count`` and let ``relays`` relay processes drain it; return the figures.

    The table is emptied first unless ``keep_table`` (the scale scenario keeps its delivered rows);
    afterwards it must hold ``expect_total`` (default ``count``) delivered rows and nothing else.
    """
    engine = outbox_engine(url)
    if not keep_table:
        reset_table(engine)
    workers = [Worker("relay", {"url": url}, settings) for _ in range(relays)]
    try:
        insert_backlog(engine, count, key_of=key_of)
        if backend == "postgresql":
            vacuum_analyze(url, "outbox")
        for worker in workers:
            worker.wait_ready()
        database = sa.engine.make_url(url).database or ""
        cpu_before, db_before = cpu_jiffies(), backend_cpu(database)
        seconds = drain_with(workers, count, timeout=60 + count / 300)
        busy = busy_share(cpu_before, cpu_jiffies())
        db_cpu = cpu_between(db_before, backend_cpu(database)) if backend == "postgresql" else None
    finally:
        results = stop_all(workers)
    counts = status_counts(engine)
    engine.dispose()
    expected = count if expect_total is None else expect_total
    if counts != {"delivered": expected}:
        raise RuntimeError(f"after the drain the table holds {counts}, expected {expected} delivered")
    relay_cpu = sum(r.get("cpu_seconds", 0.0) for r in results)
    return {
        "rate": count / seconds,
        "seconds": seconds,
        "workers": results,
        "machine_busy": busy,
        "relay_cpu_us": relay_cpu / count * 1e6,
        "db_cpu_us": db_cpu / count * 1e6 if db_cpu is not None else None,
    }


def run(settings: Settings, recorder: Any) -> None:
    count = settings.size(100_000, 10_000, 500)
    backends = settings.pick(("postgresql", "mariadb", "sqlite"), ("postgresql",), ("postgresql",))
    for backend in backends:
        variants = [("1 relay", 1)] if backend == "sqlite" else [("1 relay", 1), ("2 relays", 2)]
        rates: dict[str, list[float]] = {name: [] for name, _ in variants}
        busy: dict[str, list[float]] = {name: [] for name, _ in variants}
        cpu: dict[str, list[float]] = {name: [] for name, _ in variants}
        db_cpu: dict[str, list[float]] = {name: [] for name, _ in variants}
        relay_settings: dict[str, Any] = {}
        with fresh_database(backend, settings) as url:
            for run_index in range(settings.runs):
                order = variants if run_index % 2 == 0 else list(reversed(variants))
                for name, relays in order:
                    figures = drain_once(url, backend, count, relays, settings)
                    rates[name].append(figures["rate"])
                    busy[name].append(figures["machine_busy"])
                    cpu[name].append(figures["relay_cpu_us"])
                    if figures["db_cpu_us"] is not None:
                        db_cpu[name].append(figures["db_cpu_us"])
                    relay_settings = figures["workers"][0].get("relay_settings", {})
                    log(f"drain {backend} {name}: {figures['rate']:,.0f} msg/s")
        common = {"backlog": count, "relay": relay_settings}
        for name, relays in variants:
            recorder.add(
                Result(NAME, name, backend, "throughput", "msg/s", rates[name], {**common, "relays": relays})
            )
            # What bounds it: the whole machine's CPU (2 cores: relays, database, everything else), the
            # relays' own CPU time per message and (PostgreSQL) the database backends' serving them.
            bounds = [
                ("machine CPU busy", "%", busy),
                ("relay CPU per msg", "us", cpu),
                ("db CPU per msg", "us", db_cpu),
            ]
            for metric, unit, values in bounds:
                if values[name]:
                    recorder.add(
                        Result(
                            NAME, name, backend, metric, unit, values[name], common, higher_is_better=False
                        )
                    )
        if len(variants) == 2:
            recorder.add(
                Result(
                    NAME,
                    "2 relays / 1 relay",
                    backend,
                    "ratio",
                    "x",
                    ratio_values(rates["2 relays"], rates["1 relay"]),
                    common,
                )
            )
