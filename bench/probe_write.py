"""Probe: where the write overhead goes, one transaction at a time (not part of ``make bench``).

``python -m bench.probe_write [--transactions N] [--rounds R]`` runs the write-overhead scenario's
business transaction (one ORM row and its commit, one sync writer, PostgreSQL, ``notify=False``) in
variants interleaved transaction by transaction, so that the machine's drift hits them all alike, and
prints each variant's median time and its rate as a share of the plain transaction's:

- ``plain``: the business row alone;
- ``+outbox``: with ``outbox.add`` as shipped (the ``INSERT`` runs at once, in its own round trip);
- ``+insert in the commit's round trip``: the row kept aside and sent as ``EXECUTE`` of a statement
  prepared once per connection, in one simple query with the ``COMMIT`` (a design that was measured and
  not shipped: see BENCHMARKS.md);
- ``+message built, not written``: ``Outbox.build_row`` only (and the payload built), nothing sent: the
  floor that no way of writing the row can go below;
- ``+spin``: a busy loop as long as building the payload and the row takes in a tight loop: what the
  same CPU time costs when it is not spread over cold code and data.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy import event, orm

import outbox
from bench.harness import Settings, fresh_database, outbox_engine
from bench.workload import key_for, payload
from bench.write_overhead import Base, _order

_KEPT = "probe.kept_rows"
_PREPARED = "probe.prepared"
_COLUMNS = (
    "id",
    "topic",
    "msg_key",
    "payload",
    "content_type",
    "headers",
    "status",
    "attempts",
    "due_at",
    "created_at",
)
_PREPARE = (
    "PREPARE probe_outbox_insert (uuid, varchar, varchar, bytea, varchar, text, varchar, integer,"
    f" timestamp, timestamp) AS INSERT INTO outbox ({', '.join(_COLUMNS)})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
)


def _literal(escaping: psycopg.pq.Escaping, value: Any) -> bytes:
    if value is None:
        return b"NULL"
    if isinstance(value, bytes):
        return b"'" + escaping.escape_bytea(value) + b"'"
    if isinstance(value, int):
        return str(value).encode()
    return escaping.escape_literal(str(value).encode())


def _send_kept_with_commit(conn: sa.Connection) -> None:
    """Engine ``commit`` listener: the kept rows and the COMMIT in one simple query, one round trip."""
    rows = conn.info.pop(_KEPT, None)
    if not rows:
        return
    if not conn.info.get(_PREPARED):
        conn.exec_driver_sql(_PREPARE)
        conn.info[_PREPARED] = True
    escaping = psycopg.pq.Escaping(conn.connection.driver_connection.pgconn)  # type: ignore[union-attr]
    calls = [
        b"EXECUTE probe_outbox_insert(" + b",".join(_literal(escaping, r[c]) for c in _COLUMNS) + b")"
        for r in rows
    ]
    conn.exec_driver_sql((b";".join(calls) + b";COMMIT").decode())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.probe_write", description=__doc__.split("\n\n")[0])
    parser.add_argument("--transactions", type=int, default=3000, help="per variant and round (default 3000)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="repetitions, each on a fresh table (default 3)"
    )
    args = parser.parse_args(argv)
    tmp = Path(tempfile.gettempdir())
    settings = Settings(mode="full", runs=1, scale=1.0, out=tmp, tmp=tmp)
    writer = outbox.Outbox(notify=False)
    hot = min(
        _timeit(lambda: writer.build_row("order.created", payload(7), key=key_for(7))) for _ in range(5)
    )

    with fresh_database("postgresql", settings) as url:
        engine = outbox_engine(url)
        Base.metadata.create_all(engine)
        event.listen(engine, "commit", _send_kept_with_commit)
        sessions = orm.sessionmaker(engine)

        def keep(session: orm.Session, i: int) -> None:
            row = writer.build_row("order.created", payload(i), key=key_for(i))
            session.connection().info.setdefault(_KEPT, []).append(row)

        def spin(session: orm.Session, i: int) -> None:
            end = time.perf_counter() + hot
            while time.perf_counter() < end:
                pass

        variants: dict[str, Callable[[orm.Session, int], Any] | None] = {
            "plain": None,
            "+outbox": lambda s, i: writer.add(s, "order.created", payload(i), key=key_for(i)),
            "+insert in the commit's round trip": keep,
            "+message built, not written": lambda s, i: writer.build_row(
                "order.created", payload(i), key=key_for(i)
            ),
            "+spin": spin,
        }
        names = list(variants)

        def one(i: int, name: str) -> float:
            extra = variants[name]
            started = time.perf_counter()
            with sessions() as session, session.begin():
                session.add(_order(i))
                if extra is not None:
                    extra(session, i)
            return time.perf_counter() - started

        print(f"build_row in a tight loop: {hot * 1e6:.1f} us (the spin's length)")
        for round_index in range(args.rounds):
            times: dict[str, list[float]] = {name: [] for name in names}
            for i in range(300):  # warm-up: connections, statement caches
                one(i, names[i % len(names)])
            for i in range(args.transactions):
                shift = i % len(names)
                for name in names[shift:] + names[:shift]:
                    times[name].append(one(i, name))
            plain = statistics.median(times["plain"])
            cells = [
                f"{name} {statistics.median(t) * 1e6:.0f} us ({plain / statistics.median(t):.3f})"
                for name, t in times.items()
            ]
            print(f"round {round_index + 1}: " + "; ".join(cells), flush=True)
            with engine.begin() as conn:
                conn.execute(sa.text("TRUNCATE outbox, bench_orders"))
        engine.dispose()


def _timeit(call: Callable[[], Any], number: int = 20_000) -> float:
    started = time.perf_counter()
    for _ in range(number):
        call()
    return (time.perf_counter() - started) / number


if __name__ == "__main__":
    main()
