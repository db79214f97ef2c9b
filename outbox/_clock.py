"""Time as the outbox stores it: naive UTC.

Every time column of the outbox and inbox tables (``created_at``, ``available_at``, ``lease_until``,
``processed_at``...) holds naive UTC, on every dialect, so that comparisons in SQL never depend on a
session time zone. Compute those values with :func:`utcnow`, never with ``datetime.now()``.
"""

from __future__ import annotations

import datetime as dt


def utcnow() -> dt.datetime:
    """Naive UTC now: the form every time column of the outbox uses."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


__all__ = ["utcnow"]
