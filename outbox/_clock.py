"""Time as the outbox stores it: naive UTC.

Every time column of the outbox and inbox tables (``created_at``, ``available_at``, ``lease_until``,
``processed_at``...) holds naive UTC, on every dialect, so that comparisons in SQL never depend on a
session time zone. Compute those values with :func:`utcnow`, never with ``datetime.now()``. What leaves
the process for a reader (``--json`` output) says it is UTC: :func:`utc_iso`, at output only.
"""

from __future__ import annotations

import datetime as dt


def utcnow() -> dt.datetime:
    """Naive UTC now: the form every time column of the outbox uses."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def utc_iso(value: dt.datetime) -> str:
    """``value`` (naive UTC, as stored; or aware) as ISO 8601 with its offset: ``...T15:18:31.974082+00:00``.

    A naive time in ``--json`` output would be read as local time by most parsers.
    """
    aware = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
    return aware.isoformat()


__all__ = ["utc_iso", "utcnow"]
