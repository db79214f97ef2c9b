"""The messages every scenario uses, and the fast ways to put them in the table.

A message is an ``order.created``-like JSON payload of about 200 bytes. Half of the messages carry a key
(``customer-N``, :data:`KEYS` distinct keys, so about five messages per key in a 100,000 backlog: the
per-key ordering rule is exercised, but never serialises the whole backlog); the other half have none.

Backlogs are written without going through ``outbox.add`` one by one: :func:`insert_backlog` bulk-inserts
the rows that ``Outbox.build_row`` builds (the same values ``add`` would write, notify off), and
:func:`fill_server_side` makes millions of rows with one ``INSERT ... SELECT generate_series`` on
PostgreSQL, for the scale scenario.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

import outbox
from outbox._schema import tables_for

TOPIC = "bench.noop"
KEYS = 10_000
_PAD = 200


def payload(i: int, **extra: Any) -> dict[str, Any]:
    """A JSON payload of about 200 bytes once encoded."""
    body: dict[str, Any] = {
        "order_id": i,
        "customer_id": i % 9973,
        "total": f"{(i % 50_000) / 100:.2f}",
        "currency": "EUR",
        "items": [{"sku": f"SKU-{i % 1000:04d}", "qty": 1 + i % 3}],
        **extra,
    }
    size = len(json.dumps(body))
    body["note"] = "x" * max(0, _PAD - size - 12)
    return body


def key_for(i: int) -> str | None:
    """Half the messages are keyed (``customer-N``), half are not."""
    return f"customer-{i % KEYS}" if i % 2 == 0 else None


_writer = outbox.Outbox(notify=False)


KeyOf = Callable[[int], "str | None"]


def build_rows(start: int, count: int, topic: str = TOPIC, key_of: KeyOf = key_for) -> list[dict[str, Any]]:
    """The rows ``outbox.add`` would write for messages ``start`` .. ``start + count - 1``."""
    return [_writer.build_row(topic, payload(i), key=key_of(i)) for i in range(start, start + count)]


def insert_backlog(
    engine: sa.Engine, count: int, *, topic: str = TOPIC, start: int = 0, key_of: KeyOf = key_for
) -> float:
    """Bulk-insert ``count`` pending messages (keyed by ``key_of(i)``); return the seconds it took."""
    table = tables_for().messages
    began = time.monotonic()
    chunk = 5_000
    with engine.begin() as conn:
        for first in range(start, start + count, chunk):
            rows = build_rows(first, min(chunk, start + count - first), topic, key_of)
            conn.execute(sa.insert(table), rows)
    return time.monotonic() - began


def status_counts(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT status, COUNT(*) FROM outbox GROUP BY status")).all()
    return {str(status): int(n) for status, n in rows}


def reset_table(engine: sa.Engine) -> None:
    """Empty the outbox table between runs (its sequence goes on: seq only has to grow)."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(sa.text("DELETE FROM outbox"))
        else:
            conn.execute(sa.text("TRUNCATE TABLE outbox"))


def delete_pending(engine: sa.Engine) -> None:
    """Remove every row that is not delivered (keeps the delivered filler of the scale scenario)."""
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM outbox WHERE status <> 'delivered'"))


_PG_FILL = """
INSERT INTO outbox (id, topic, msg_key, payload, content_type, headers, status, attempts, due_at,
                    created_at, last_attempt_at, delivered_at)
SELECT gen_random_uuid(), :topic,
       CASE WHEN g % 2 = 0 THEN 'customer-' || (g % :keys) END,
       convert_to(json_build_object('order_id', g, 'customer_id', g % 9973, 'total', '123.45',
                                    'currency', 'EUR', 'items', json_build_array(json_build_object(
                                        'sku', 'SKU-' || lpad((g % 1000)::text, 4, '0'), 'qty', 1 + g % 3)),
                                    'note', repeat('x', 60))::text, 'UTF8'),
       'application/json', NULL, CAST(:status AS varchar), :attempts,
       CASE WHEN CAST(:status AS varchar) = 'pending' THEN now() AT TIME ZONE 'utc' END,
       now() AT TIME ZONE 'utc',
       CASE WHEN CAST(:status AS varchar) = 'delivered' THEN now() AT TIME ZONE 'utc' END,
       CASE WHEN CAST(:status AS varchar) = 'delivered' THEN now() AT TIME ZONE 'utc' END
FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS g
"""


def fill_server_side(engine: sa.Engine, count: int, *, status: str, start: int = 0) -> float:
    """Insert ``count`` rows (``delivered`` filler, or a ``pending`` backlog) with one statement per
    million on PostgreSQL; return the seconds it took."""
    if engine.dialect.name != "postgresql":
        raise NotImplementedError("the server-side fill is written for PostgreSQL")
    began = time.monotonic()
    step = 1_000_000
    for first in range(start, start + count, step):
        last = min(first + step, start + count) - 1
        with engine.begin() as conn:
            conn.execute(
                sa.text(_PG_FILL),
                {
                    "topic": TOPIC,
                    "keys": KEYS,
                    "status": status,
                    "attempts": 1 if status == "delivered" else 0,
                    "first": first,
                    "last": last,
                },
            )
    return time.monotonic() - began
