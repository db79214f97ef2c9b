"""Scale: drain throughput with millions of delivered rows kept, and the relay's peak memory.

Why: delivered rows stay in the table until retention removes them, so the claim path must not slow down
as they pile up (the issue's target: with 5 million kept, within 20 % of the empty table), and a relay
that meets a huge backlog must not hold it in memory (target: peak RSS under 200 MB for a 1 million
backlog).

On PostgreSQL, ``delivered`` filler rows are made server-side (:func:`bench.workload.fill_server_side`,
one ``INSERT ... SELECT generate_series`` per million, then ``VACUUM ANALYZE``); at each level the same
backlog as :mod:`bench.drain` is drained by one relay process (product defaults), then deleted again so
that the level stays what it says. The levels grow in one database, so their runs are not interleaved;
the ratio compares each level's median with the empty table's. Peak memory is the relay process's
``VmHWM`` after draining a pending backlog made server-side, with its RSS before the drain beside it.
"""

from __future__ import annotations

from typing import Any

from bench.drain import drain_once
from bench.harness import Result, Settings, fresh_database, log, outbox_engine, vacuum_analyze
from bench.processes import Worker, drain_with, stop_all
from bench.workload import fill_server_side, status_counts

NAME = "scale"


def _label(n: int) -> str:
    return f"{n / 1_000_000:g}M kept" if n >= 1_000_000 else f"{n / 1000:g}k kept" if n else "empty table"


def run(settings: Settings, recorder: Any) -> None:
    levels: list[int] = settings.pick([0, 1_000_000, 5_000_000], [0, 100_000], [0, 2_000])
    levels = [int(n * settings.scale) for n in levels]
    backlog = settings.size(100_000, 5_000, 300)
    memory_backlog = settings.size(1_000_000, 50_000, 1_000)
    with fresh_database("postgresql", settings) as url:
        engine = outbox_engine(url)
        kept = 0
        medians: dict[int, Result] = {}
        for level in levels:
            if level > kept:
                seconds = fill_server_side(engine, level - kept, status="delivered", start=kept)
                log(f"scale: {level - kept:,} delivered rows made in {seconds:.0f}s")
                kept = level
            rates = []
            for _ in range(settings.runs):
                vacuum_analyze(url, "outbox")
                rates.append(_drain_on_top(url, engine, kept, backlog, settings))
                log(f"scale {_label(level)}: {rates[-1]:,.0f} msg/s")
            medians[level] = recorder.add(
                Result(
                    NAME,
                    _label(level),
                    "postgresql",
                    "throughput",
                    "msg/s",
                    rates,
                    {"backlog": backlog, "kept": level},
                )
            )
        for level in levels[1:]:
            ratio = [v / medians[levels[0]].median for v in medians[level].values]
            recorder.add(
                Result(NAME, f"{_label(level)} / empty", "postgresql", "ratio", "x", ratio, {"kept": level})
            )

        # Peak memory while draining a big backlog (one run: it is long, and memory does not jitter).
        with engine.begin() as conn:
            conn.exec_driver_sql("TRUNCATE TABLE outbox")
        seconds = fill_server_side(engine, memory_backlog, status="pending", start=10_000_000_000)
        vacuum_analyze(url, "outbox")
        log(f"scale: {memory_backlog:,} pending rows made in {seconds:.0f}s")
        workers = [Worker("relay", {"url": url}, settings)]
        try:
            drain_seconds = drain_with(workers, memory_backlog, timeout=120 + memory_backlog / 300)
        finally:
            results = stop_all(workers)
        memory = results[0]["memory_kb"]
        common = {"backlog": memory_backlog, "relay": results[0].get("relay_settings")}
        recorder.add(
            Result(
                NAME,
                f"peak RSS, {memory_backlog:,} backlog",
                "postgresql",
                "VmHWM",
                "MB",
                [memory["VmHWM"] / 1024],
                common,
                higher_is_better=False,
            )
        )
        recorder.add(
            Result(
                NAME,
                "RSS before the drain",
                "postgresql",
                "VmRSS",
                "MB",
                [results[0]["rss_before_kb"] / 1024],
                common,
                higher_is_better=False,
            )
        )
        recorder.add(
            Result(
                NAME,
                f"drain, {memory_backlog:,} backlog",
                "postgresql",
                "throughput",
                "msg/s",
                [memory_backlog / drain_seconds],
                common,
            )
        )
        counts = status_counts(engine)
        engine.dispose()
        if counts != {"delivered": memory_backlog}:
            raise RuntimeError(f"after the big drain the table holds {counts}")


def _drain_on_top(url: str, engine: Any, kept: int, backlog: int, settings: Settings) -> float:
    """Drain a fresh backlog above ``kept`` delivered rows, then delete it again; return msg/s."""
    with engine.begin() as conn:
        top = conn.exec_driver_sql("SELECT COALESCE(MAX(seq), 0) FROM outbox").scalar()
    figures = drain_once(
        url, "postgresql", backlog, 1, settings, keep_table=True, expect_total=kept + backlog
    )
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DELETE FROM outbox WHERE seq > {int(top)}")
    return float(figures["rate"])
