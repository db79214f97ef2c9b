"""Write overhead: what one ``outbox.add`` costs a business transaction.

Why: the outbox is paid for on the write path of every user's service; the issue's target is a business
transaction rate with ``outbox.add`` of at least 90 % of the rate without it, with 1 and 8 concurrent
writers. A business transaction here is one ORM row insert (``bench_orders``) and its commit; the
``+outbox`` variant adds one ``outbox.add`` (a ~200-byte JSON payload, keyed half of the time) in the same
transaction. Writers are threads with sync ``Session`` objects, or asyncio tasks with ``AsyncSession``
(psycopg's async driver) on PostgreSQL. Each variant runs for a fixed window and counts committed
transactions; variants alternate within each run (A B, then B A) so that drifting load hits both alike,
and the ratio is taken per run. On PostgreSQL a third variant, ``+outbox (notify off)``
(``Outbox(notify=False)``), shows what the ``pg_notify`` wake-up sent in each transaction costs, and a
fourth, ``+message built, not written``, calls ``Outbox.build_row`` in its place (the payload encoded,
the id and times made, nothing sent): the floor below which no way of writing the row could bring the
ratio. No relay runs meanwhile: this is the writers' cost alone.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm

import outbox
from bench.harness import Result, Settings, fresh_database, log, outbox_engine, ratio_values
from bench.workload import key_for, payload

NAME = "write_overhead"


class Base(orm.DeclarativeBase):
    pass


class Order(Base):
    """The business row: what a service writes in the transaction that also adds the message."""

    __tablename__ = "bench_orders"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    customer_id: orm.Mapped[int]
    total: orm.Mapped[Decimal] = orm.mapped_column(sa.Numeric(10, 2))
    status: orm.Mapped[str] = orm.mapped_column(sa.String(16))
    created_at: orm.Mapped[dt.datetime]


PLAIN = "plain"
WITH_OUTBOX = "+outbox"
NO_NOTIFY = "+outbox (notify off)"
BUILT_ONLY = "+message built, not written"
_writers = {WITH_OUTBOX: outbox.Outbox(), NO_NOTIFY: outbox.Outbox(notify=False), BUILT_ONLY: outbox.Outbox()}


def _add(writer: outbox.Outbox, variant: str, session: Any, i: int) -> None:
    """The variant's work beside the business row: ``outbox.add``, or only building the row."""
    if variant == BUILT_ONLY:
        writer.build_row("order.created", payload(i), key=key_for(i))
    else:
        writer.add(session, "order.created", payload(i), key=key_for(i))


def _order(i: int) -> Order:
    return Order(customer_id=i % 9973, total=Decimal("24.60"), status="created", created_at=dt.datetime.now())


def measure_sync(engine: sa.Engine, variant: str, writers: int, seconds: float) -> float:
    """Committed business transactions per second with ``writers`` threads for ``seconds``."""
    sessions = orm.sessionmaker(engine)
    writer = _writers.get(variant)
    stop = threading.Event()
    counts = [0] * writers
    barrier = threading.Barrier(writers + 1)

    def work(k: int) -> None:
        i = k * 100_000_000
        barrier.wait()
        while not stop.is_set():
            with sessions() as session, session.begin():
                session.add(_order(i))
                if writer is not None:
                    _add(writer, variant, session, i)
            counts[k] += 1
            i += 1

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(writers)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.monotonic()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.monotonic() - started)


async def _measure_async(engine: Any, variant: str, writers: int, seconds: float) -> float:
    from sqlalchemy.ext.asyncio import async_sessionmaker

    sessions = async_sessionmaker(engine, expire_on_commit=False)
    writer = _writers.get(variant)
    stop = asyncio.Event()
    counts = [0] * writers

    async def work(k: int) -> None:
        i = k * 100_000_000
        while not stop.is_set():
            async with sessions() as session, session.begin():
                session.add(_order(i))
                if writer is not None:
                    _add(writer, variant, session, i)
            counts[k] += 1
            i += 1

    tasks = [asyncio.create_task(work(k)) for k in range(writers)]
    started = time.monotonic()
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    return sum(counts) / (time.monotonic() - started)


def run(settings: Settings, recorder: Any) -> None:
    seconds = settings.pick(2.0, 0.5, 0.25)
    runs = settings.runs
    cases: list[tuple[str, str]] = settings.pick(
        [("postgresql", "sync"), ("postgresql", "async"), ("mariadb", "sync"), ("sqlite", "sync")],
        [("postgresql", "sync"), ("postgresql", "async")],
        [("postgresql", "sync"), ("postgresql", "async")],
    )
    for backend, api in cases:
        with fresh_database(backend, settings) as url:
            measure_case(url, backend, api, seconds, runs, recorder)


class _Measurer:
    """Runs one variant's window on a sync engine, or on an async engine with its own event loop."""

    def __init__(self, url: str, api: str) -> None:
        self.engine = outbox_engine(url, pool_size=10, max_overflow=10)
        Base.metadata.create_all(self.engine)
        self.loop = asyncio.new_event_loop()  # one loop for the async engine's life: its pool is bound to it
        self.async_engine: Any = None
        if api == "async":
            from sqlalchemy.ext.asyncio import create_async_engine

            async_url = sa.engine.make_url(url).set(drivername="postgresql+psycopg")
            self.async_engine = create_async_engine(async_url, pool_size=10, max_overflow=10)

    def __call__(self, variant: str, writers: int, seconds: float) -> float:
        if self.async_engine is not None:
            return self.loop.run_until_complete(_measure_async(self.async_engine, variant, writers, seconds))
        return measure_sync(self.engine, variant, writers, seconds)

    def close(self) -> None:
        if self.async_engine is not None:
            self.loop.run_until_complete(self.async_engine.dispose())
        self.loop.close()
        self.engine.dispose()


def measure_case(url: str, backend: str, api: str, seconds: float, runs: int, recorder: Any) -> None:
    """Every variant with 1 and 8 writers on one database, alternating the variants' order per run."""
    variants = [PLAIN, WITH_OUTBOX] + ([NO_NOTIFY, BUILT_ONLY] if backend == "postgresql" else [])
    measure = _Measurer(url, api)
    try:
        for writers in (1, 8):
            if backend == "sqlite" and writers > 1:
                continue  # SQLite serialises writers on one file lock: the 1-writer figure says it all
            measure(WITH_OUTBOX, writers, min(0.5, seconds))  # warm-up: connections, statement caches
            rates: dict[str, list[float]] = {v: [] for v in variants}
            for run_index in range(runs):
                order = variants if run_index % 2 == 0 else list(reversed(variants))
                for variant in order:
                    rates[variant].append(measure(variant, writers, seconds))
            label = f"{api} x{writers}"
            common = {"writers": writers, "window_s": seconds, "api": api}
            for variant in variants:
                recorder.add(
                    Result(NAME, f"{label} {variant}", backend, "tx_rate", "tx/s", rates[variant], common)
                )
            for variant in variants[1:]:
                ratios = ratio_values(rates[variant], rates[PLAIN])
                recorder.add(
                    Result(NAME, f"{label} {variant} / plain", backend, "ratio", "x", ratios, common)
                )
            log(f"write overhead {backend} {label} done")
    finally:
        measure.close()
