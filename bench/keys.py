"""Ordered delivery at depth: how fast keyed backlogs drain, against unkeyed ones, in the same run.

Why: order per key is the product's distinctive promise, and it must not be paid for in throughput
(issue 14). Real backlogs concentrate on few keys (an outage, a bulk import, a busy tenant), so the
shapes here are: no key (the baseline), one key, 10 keys, 100 keys, 10,000 keys, and unkeyed messages
drained while a deep strict-order key is parked in front of them (its messages met by the relay for the
first time, each set aside by one write, or already set aside), each drained by one relay process
with no-op in-process handlers (as :mod:`bench.drain`) and reported as messages/s and as a ratio to the
unkeyed drain of the same run; and 10 keys drained by three relays at once, against one relay (a key's
runs go to one relay at a time: more relays must not make it slower). The last figures are the claim's
own cost: the median time of a claim with 10,000 and with 1,000,000 messages queued behind one key, and
of a claim of 2,000 messages over 10 keys whose heads come after 10,000 and after 1,000,000 delivered
messages of those keys (a table's history, which a plan reading the primary key backwards, filtering by
key, read whole; PostgreSQL; the targets want each pair within 2x).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import sqlalchemy as sa

from bench.drain import drain_once
from bench.harness import Result, Settings, fresh_database, log, outbox_engine, ratio_values, vacuum_analyze
from bench.processes import Worker, drain_with, stop_all
from bench.workload import KeyOf, insert_backlog, reset_table, status_counts
from outbox._clock import utcnow
from outbox._dialects import dialect_for
from outbox._schema import tables_for
from relay._claim import ClaimQueries

NAME = "keys"


def _shapes(count: int) -> list[tuple[str, KeyOf]]:
    return [
        ("unkeyed", lambda i: None),
        ("one key", lambda i: "hot"),
        ("10 keys", lambda i: f"k{i % 10}"),
        ("100 keys", lambda i: f"k{i % 100}"),
        ("10,000 keys", lambda i: f"k{i % 10_000}"),
    ]


def drain_behind_parked(
    url: str, backend: str, count: int, settings: Settings, *, set_aside: bool = False
) -> float:
    """Unkeyed messages/s while ``count`` messages wait behind a parked strict-order key, written just
    before the unkeyed ones (the relay meets them first, and sets each aside: one write a message), or,
    ``set_aside``, already set aside by a relay that ran before the unkeyed ones were written (a key
    parked for a while: the messages written behind it were each set aside by the claim that found it)."""
    engine = outbox_engine(url)
    reset_table(engine)
    t = tables_for().messages
    insert_backlog(engine, 1, key_of=lambda i: "parked")
    with engine.begin() as conn:
        conn.execute(sa.update(t).values(status="parked", due_at=None, last_error="parked by the benchmark"))
    insert_backlog(engine, count, key_of=lambda i: "parked", start=1)
    if set_aside:
        _let_a_relay_set_aside(url, engine, settings, timeout=60 + count / 1000)
    insert_backlog(engine, count, key_of=lambda i: None, start=count + 1)
    if backend == "postgresql":
        vacuum_analyze(url, "outbox")
    workers = [Worker("relay", {"url": url}, settings)]
    try:
        seconds = drain_with(workers, count, timeout=60 + count / 300)
    finally:
        stop_all(workers)
    counts = status_counts(engine)
    engine.dispose()
    if counts.get("delivered") != count:
        raise RuntimeError(f"behind the parked key the table holds {counts}, expected {count} delivered")
    return count / seconds


def _let_a_relay_set_aside(url: str, engine: sa.Engine, settings: Settings, *, timeout: float) -> None:
    """Run a relay until no pending message is due any more (each is set aside behind its parked key)."""
    t = tables_for().messages
    due = sa.select(sa.func.count()).where(t.c.status == "pending", t.c.due_at.is_not(None))
    workers = [Worker("relay", {"url": url}, settings)]
    try:
        workers[0].wait_ready()
        workers[0].send("go")
        deadline = time.monotonic() + timeout
        while True:
            with engine.connect() as conn:
                if not conn.execute(due).scalar():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the parked key's messages were not set aside within {timeout:.0f} s")
            time.sleep(0.1)
    finally:
        stop_all(workers)


def claim_times(url: str, depth: int, claims_measured: int = 30) -> list[float]:
    """Seconds per claim (take one run, deliver it, promote the next) with ``depth`` messages on one key
    queued behind it, after the first pass that queues them."""
    engine = outbox_engine(url)
    reset_table(engine)
    insert_backlog(engine, depth, key_of=lambda i: "deep")
    vacuum_analyze(url, "outbox")
    claims = ClaimQueries(tables_for(), dialect_for(engine))
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    times: list[float] = []
    with autocommit.connect() as marks:
        while True:  # the first pass: the head's run taken, every row behind it queued once
            with engine.begin() as conn:
                rows = claims.claim_batch(conn, limit=2000, lease_seconds=300, now=utcnow())
            if rows:
                claims.mark_delivered(marks, rows[0].token, [r.seq for r in rows], now=utcnow())
                last = rows[-1].seq
            if not rows and not rows.queued:
                break
        claims.promote(marks, [last], now=utcnow())
        for _ in range(claims_measured):
            began = time.perf_counter()
            with engine.begin() as conn:
                rows = claims.claim_batch(conn, limit=2000, lease_seconds=300, now=utcnow())
            times.append(time.perf_counter() - began)
            if not rows:
                break
            claims.mark_delivered(marks, rows[0].token, [r.seq for r in rows], now=utcnow())
            claims.promote(marks, [rows[-1].seq], now=utcnow())
    engine.dispose()
    return times


def claim_times_after_history(url: str, delivered: int, claims_measured: int = 15) -> list[float]:
    """Seconds per claim of 2,000 messages over 10 keys, each key's head right after ``delivered``
    delivered messages of the keys (a drained backlog, kept until retention deletes it), with the
    statistics of when they were pending (ANALYZE runs after a drain, not during it). Each claim is
    rolled back, so every one finds the same rows; the first few are left out (the statement is planned
    generically, as a relay's prepared one, from the sixth run on)."""
    engine = outbox_engine(url)
    reset_table(engine)
    t = tables_for().messages
    insert_backlog(engine, delivered + 2_000, key_of=lambda i: f"k{i % 10}")
    # The statistics as autovacuum takes them during a backlog (every row pending), then the backlog
    # drained but its last 2,000 (a relay's view while it drains: ANALYZE comes after)
    vacuum_analyze(url, "outbox")
    with engine.begin() as conn:
        last = conn.execute(sa.select(sa.func.max(t.c.seq))).scalar_one()
        conn.execute(
            sa.update(t)
            .where(t.c.seq <= last - 2_000)
            .values(status="delivered", due_at=None, delivered_at=utcnow(), attempts=1)
        )
    claims = ClaimQueries(tables_for(), dialect_for(engine))
    times: list[float] = []
    with engine.connect() as conn:
        for _ in range(claims_measured + 6):
            began = time.perf_counter()
            with conn.begin() as transaction:
                rows = claims.claim_batch(conn, limit=2_000, lease_seconds=300, now=utcnow())
                transaction.rollback()
            times.append(time.perf_counter() - began)
            if len(rows) != 2_000:
                raise RuntimeError(f"a claim after the history took {len(rows)} rows, expected 2,000")
    engine.dispose()
    return times[6:]


def run(settings: Settings, recorder: Any) -> None:
    count = settings.size(100_000, 10_000, 600)
    backends = settings.pick(("postgresql", "mariadb", "sqlite"), ("postgresql",), ("postgresql",))
    for backend in backends:
        shapes = _shapes(count)
        rates: dict[str, list[float]] = {name: [] for name, _ in shapes}
        parked: list[float] = []
        aside: list[float] = []  # the same, the parked key's messages set aside before
        three: list[float] = []  # 10 hot keys drained by three relays (target: at least one relay's rate)
        with fresh_database(backend, settings) as url:
            for run_index in range(settings.runs):
                order = shapes if run_index % 2 == 0 else list(reversed(shapes))
                for name, key_of in order:
                    figures = drain_once(url, backend, count, 1, settings, key_of=key_of)
                    rates[name].append(figures["rate"])
                    log(f"keys {backend} {name}: {figures['rate']:,.0f} msg/s")
                parked.append(drain_behind_parked(url, backend, count, settings))
                log(f"keys {backend} unkeyed behind a parked key: {parked[-1]:,.0f} msg/s")
                aside.append(drain_behind_parked(url, backend, count, settings, set_aside=True))
                log(f"keys {backend} unkeyed behind a parked key set aside: {aside[-1]:,.0f} msg/s")
                if backend != "sqlite":  # (SQLite: one relay at a time)
                    figures = drain_once(url, backend, count, 3, settings, key_of=lambda i: f"k{i % 10}")
                    three.append(figures["rate"])
                    log(f"keys {backend} 10 keys, 3 relays: {three[-1]:,.0f} msg/s")
        common = {"backlog": count, "relays": 1}
        for name, _ in shapes:
            recorder.add(Result(NAME, name, backend, "throughput", "msg/s", rates[name], common))
            if name != "unkeyed":
                ratio = ratio_values(rates[name], rates["unkeyed"])
                recorder.add(Result(NAME, f"{name} / unkeyed", backend, "ratio", "x", ratio, common))
        if three:
            many = {**common, "relays": 3}
            recorder.add(Result(NAME, "10 keys, 3 relays", backend, "throughput", "msg/s", three, many))
            ratio = ratio_values(three, rates["10 keys"])
            recorder.add(Result(NAME, "10 keys, 3 relays / 1 relay", backend, "ratio", "x", ratio, many))
        behind = {**common, "parked_behind": count}
        for variant, figures in (("a parked key", parked), ("a parked key set aside", aside)):
            recorder.add(
                Result(NAME, f"unkeyed behind {variant}", backend, "throughput", "msg/s", figures, common)
            )
            ratio = ratio_values(figures, rates["unkeyed"])
            recorder.add(Result(NAME, f"behind {variant} / unkeyed", backend, "ratio", "x", ratio, behind))
    if "postgresql" in backends:
        depths = settings.pick((10_000, 1_000_000), (10_000, 100_000), (1_000, 5_000))
        with fresh_database("postgresql", settings) as url:
            medians = {}
            for depth in depths:
                times = claim_times(url, depth)
                medians[depth] = statistics.median(times)
                recorder.add(
                    Result(
                        NAME,
                        f"claim time, {depth:,} behind one key",
                        "postgresql",
                        "claim time",
                        "ms",
                        [s * 1000 for s in times],
                        {"depth": depth},
                        higher_is_better=False,
                    )
                )
                log(f"keys claim time with {depth:,} behind one key: {medians[depth] * 1000:.2f} ms (median)")
            deep, shallow = depths[-1], depths[0]
            _record_claim_ratio(recorder, "behind one key", medians, deep, shallow)
            medians = {}
            for depth in depths:  # the same sizes of delivered history before every key's head
                times = claim_times_after_history(url, depth)
                medians[depth] = statistics.median(times)
                recorder.add(
                    Result(
                        NAME,
                        f"claim time, heads after {depth:,} delivered",
                        "postgresql",
                        "claim time",
                        "ms",
                        [s * 1000 for s in times],
                        {"delivered": depth, "claimed": 2_000, "keys": 10},
                        higher_is_better=False,
                    )
                )
                log(f"keys claim time after {depth:,} delivered: {medians[depth] * 1000:.2f} ms (median)")
            _record_claim_ratio(recorder, "heads after delivered", medians, deep, shallow)


def _record_claim_ratio(recorder: Any, what: str, medians: dict[int, float], deep: int, shallow: int) -> None:
    """The ratio of the median claim times at two sizes (the targets want it within 2x)."""
    recorder.add(
        Result(
            NAME,
            f"claim time {deep:,} / {shallow:,} {what}",
            "postgresql",
            "ratio",
            "x",
            [medians[deep] / medians[shallow]],
            {"depths": [shallow, deep]},
            higher_is_better=False,
        )
    )
