"""The claim's scan with a relay's topics: ``EXPLAIN (ANALYZE, BUFFERS)`` on PostgreSQL.

``python -m bench.topic_scan`` (in a database of its own, dropped afterwards) writes 100,000 due rows in
four layouts and prints, for the scan of a relay that routes one topic, the plan's time, the rows its
``due_at`` index scan read and the buffers it touched (BENCHMARKS.md, "A relay's topics in its claim").
A plan, not a throughput: one run each, printed, not recorded.
"""

from __future__ import annotations

import datetime as dt
import re
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from bench.harness import Settings, fresh_database, outbox_engine
from outbox._clock import utcnow
from outbox._dialects import dialect_for
from outbox._schema import tables_for
from relay._claim import ClaimQueries
from relay._topics import Topics

ROWS = 100_000
LIMIT = 200

#: name -> (the topic of row i, the topics the relay routes; None: every topic)
LAYOUTS: dict[str, tuple[Callable[[int], str], Topics | None]] = {
    "no condition (every topic the relay's)": (lambda i: "big", None),
    "one topic, the relay's": (lambda i: "big", Topics.of(["big"])),
    "the relay's topic is 1 % of the rows, spread out": (
        lambda i: "mine" if i % 100 == 0 else "big",
        Topics.of(["mine"]),
    ),
    "99,000 rows of another topic first": (
        lambda i: "mine" if i >= ROWS - 1000 else "big",
        Topics.of(["mine"]),
    ),
}


def fill(engine: sa.Engine, topic_of: Callable[[int], str]) -> None:
    t = tables_for().messages
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(sa.delete(t))
        conn.execute(
            sa.insert(t),
            [
                {
                    "id": uuid.uuid4(),
                    "topic": topic_of(i),
                    "msg_key": None if i % 2 else f"k{i % 500}",
                    "payload": b'{"a": 1}',
                    "content_type": "application/json",
                    "status": "pending",
                    "attempts": 0,
                    "due_at": now - dt.timedelta(seconds=ROWS - i),
                    "created_at": now,
                }
                for i in range(ROWS)
            ],
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE outbox"))


def explain(engine: sa.Engine, topics: Topics | None) -> str:
    scan = ClaimQueries(tables_for(), dialect_for(engine))._scan_of(topics)
    with engine.connect() as conn:
        sql = str(
            scan.params(now=utcnow(), limit=LIMIT).compile(
                dialect=conn.dialect, compile_kwargs={"literal_binds": True}
            )
        ).replace("%%", "%")
        plan = conn.execute(sa.text(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")).scalars().all()
    top = next(line for line in plan if line.startswith("Limit"))
    elapsed = re.search(r"actual time=[\d.]+\.\.([\d.]+)", top)
    buffers = next((line.split("hit=")[1] for line in plan if "Buffers" in line), "?")
    at = next((i for i, line in enumerate(plan) if "Index Scan using ix_outbox_due" in line), None)
    read = "?"
    if at is not None and (kept := re.search(r"rows=(\d+) loops", plan[at])):
        removed = next((line for line in plan[at + 1 : at + 4] if "Rows Removed by Filter" in line), "")
        read = str(int(kept.group(1)) + int(removed.split(":")[1]) if removed else int(kept.group(1)))
    ms = float(elapsed.group(1)) if elapsed else float("nan")
    return f"{ms:7.1f} ms, due index read {read} rows, buffers {buffers}"


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    settings = Settings(mode="quick", runs=1, scale=1.0, out=tmp, tmp=tmp)
    with fresh_database("postgresql", settings) as url:
        engine = outbox_engine(url)
        for name, (topic_of, topics) in LAYOUTS.items():
            fill(engine, topic_of)
            explain(engine, topics)  # warm
            print(f"{name:50s} {explain(engine, topics)}")
        engine.dispose()


if __name__ == "__main__":
    main()
