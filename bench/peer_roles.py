"""The peers' roles for ``python -m bench.worker``: pgqueuer, procrastinate and the naive relay.

Each drains its own backlog (``mode`` ``drain``: it says ``done`` when empty) or handles a paced stream
and records commit-to-start latencies (``handler`` ``latency``), and has a writer for the latency and
enqueue measurements. Their settings come from :data:`bench.peers.SETTINGS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.protocol import (
    Reporter,
    cpu_seconds,
    go,
    latency_summary,
    paced_async,
    run_async,
    say,
    stop,
    wait_go,
)


async def pgqueuer_writer(cfg: dict[str, Any], rate: float, duration: float, lanes: int) -> dict[str, Any]:
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    from bench.workload import payload

    connections = [await asyncpg.connect(cfg["dsn"]) for _ in range(lanes)]  # one per lane: no sharing
    queries = [Queries(AsyncpgDriver(conn)) for conn in connections]

    async def write(i: int, lane: int) -> float:
        body = payload(i)
        body["t"] = sent = time.time()
        await queries[lane].enqueue("noop", json.dumps(body).encode())  # autocommit: one job per transaction
        return time.time() - sent

    await wait_go()
    result = await paced_async(rate, duration, lanes, write)
    for conn in connections:
        await conn.close()
    return result


async def procrastinate_writer(
    cfg: dict[str, Any], rate: float, duration: float, lanes: int
) -> dict[str, Any]:
    from bench.workload import payload

    app, noop = procrastinate_app(cfg, lambda **kw: None)
    async with app.open_async():

        async def write(i: int, lane: int) -> float:
            body = payload(i)
            body["t"] = sent = time.time()
            await noop.defer_async(**body)
            return time.time() - sent

        await wait_go()
        return await paced_async(rate, duration, lanes, write)


def role_naive(cfg: dict[str, Any]) -> dict[str, Any]:
    """The relay everyone writes first: one row per transaction, ``FOR UPDATE SKIP LOCKED``."""
    import psycopg

    latencies: list[float] = []
    by_id: list[list[float]] = []
    done = [0]
    record = cfg.get("handler") == "latency"
    poll = float(cfg.get("poll_interval", 0.05))
    conn = psycopg.connect(cfg["dsn"])
    say("ready")
    go.wait()
    reporter = Reporter(lambda: done[0]).start()
    started, cpu_before = time.monotonic(), cpu_seconds()
    while not stop.is_set():
        with conn.transaction():
            row = conn.execute(
                "SELECT seq, payload FROM outbox WHERE due_at IS NOT NULL "
                "ORDER BY due_at LIMIT 1 FOR UPDATE SKIP LOCKED"
            ).fetchone()
            if row is not None:
                message = json.loads(row[1])  # the handler: decode, and nothing else
                if record:
                    latencies.append(time.time() - message["t"])
                    by_id.append([message["order_id"], latencies[-1]])
                conn.execute(
                    "UPDATE outbox SET status = 'delivered', due_at = NULL, "
                    "delivered_at = now() AT TIME ZONE 'utc' WHERE seq = %s",
                    (row[0],),
                )
        if row is not None:
            done[0] += 1
        elif cfg.get("mode") == "drain":
            break
        else:
            stop.wait(poll)
    finished, cpu_used = time.monotonic(), cpu_seconds() - cpu_before
    reporter.stop()  # the final count goes out before "done", which the parent takes as the end
    if cfg.get("mode") == "drain":
        say("done", finished)
    stop.wait()  # keep the connection (and its backend's CPU figures) until the parent has read them
    conn.close()
    return {
        "handled": done[0],
        "seconds": finished - started,
        "cpu_seconds": cpu_used,
        "latency": latency_summary(latencies, by_id),
    }


def role_pgqueuer(cfg: dict[str, Any]) -> dict[str, Any]:
    return run_async(_pgqueuer_worker(cfg), uvloop=True)


async def _pgqueuer_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    from datetime import timedelta

    import asyncpg
    from pgqueuer import PgQueuer
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.types import QueueExecutionMode

    latencies: list[float] = []
    by_id: list[list[float]] = []
    done = [0]
    record = cfg.get("handler") == "latency"
    conn = await asyncpg.connect(cfg["dsn"])
    pgq = PgQueuer(AsyncpgDriver(conn))

    @pgq.entrypoint("noop")
    async def noop(job: Job) -> None:
        message = json.loads(job.payload or b"{}")
        if record:
            latencies.append(time.time() - message["t"])
            by_id.append([message["order_id"], latencies[-1]])
        done[0] += 1

    drain = cfg.get("mode") == "drain"
    await wait_go()
    loop = asyncio.get_running_loop()
    threading.Thread(
        target=lambda: (stop.wait(), loop.call_soon_threadsafe(pgq.shutdown.set)), daemon=True
    ).start()
    reporter = Reporter(lambda: done[0]).start()
    started, cpu_before = time.monotonic(), cpu_seconds()
    await pgq.qm.run(
        batch_size=cfg.get("batch_size", 10),
        dequeue_timeout=timedelta(seconds=cfg.get("dequeue_timeout", 30.0)),
        mode=QueueExecutionMode.drain if drain else QueueExecutionMode.continuous,
    )
    finished, cpu_used = time.monotonic(), cpu_seconds() - cpu_before
    reporter.stop()  # the final count goes out before "done", which the parent takes as the end
    if drain:
        say("done", finished)
        await asyncio.to_thread(stop.wait)  # keep the connection (its backend's CPU) until the parent read it
    await conn.close()
    return {
        "handled": done[0],
        "seconds": finished - started,
        "cpu_seconds": cpu_used,
        "latency": latency_summary(latencies, by_id),
    }


def procrastinate_app(cfg: dict[str, Any], body: Callable[..., None]) -> tuple[Any, Any]:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=cfg["dsn"]))

    @app.task(name="noop")
    async def noop(**kwargs: Any) -> None:
        body(**kwargs)

    return app, noop


def role_procrastinate(cfg: dict[str, Any]) -> dict[str, Any]:
    return run_async(_procrastinate_worker(cfg), uvloop=False)


async def _procrastinate_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    latencies: list[float] = []
    by_id: list[list[float]] = []
    done = [0]
    record = cfg.get("handler") == "latency"

    def handle(**kwargs: Any) -> None:
        if record:
            latencies.append(time.time() - kwargs["t"])
            by_id.append([kwargs["order_id"], latencies[-1]])
        done[0] += 1

    app, _ = procrastinate_app(cfg, handle)
    drain = cfg.get("mode") == "drain"
    async with app.open_async():
        await wait_go()
        reporter = Reporter(lambda: done[0]).start()
        started, cpu_before = time.monotonic(), cpu_seconds()
        worker = asyncio.create_task(
            app.run_worker_async(
                concurrency=cfg.get("concurrency", 10),
                wait=not drain,
                listen_notify=True,
                fetch_job_polling_interval=cfg.get("polling_interval", 5.0),
                install_signal_handlers=False,
            )
        )
        stopper = asyncio.create_task(asyncio.to_thread(stop.wait))
        await asyncio.wait({worker, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finished, cpu_used = time.monotonic(), cpu_seconds() - cpu_before
        if drain:
            reporter.stop()  # the final count goes out before "done", which the parent takes as the end
            say("done", finished)
            await stopper  # keep the pool (and its backends' CPU figures) until the parent has read them
        if not worker.done():
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(worker, 30)
        if not drain:
            reporter.stop()
    return {
        "handled": done[0],
        "seconds": finished - started,
        "cpu_seconds": cpu_used,
        "latency": latency_summary(latencies, by_id),
    }
