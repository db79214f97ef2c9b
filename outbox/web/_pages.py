"""What each page shows, as plain values: the query a page's URL asks for, and how values are displayed.

Nothing here runs SQL or knows HTTP: the queries are :class:`outbox.admin.Operations`', the routes are in
:mod:`outbox.web._app`. Kept apart so that the rules a reader looks for ("how big may a page be", "what
does a payload of bytes look like") sit in one short module.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from outbox._clock import utc_iso
from outbox._schema import Status
from outbox.admin import Activity, MessageFilter, MessageRecord
from outbox.admin._reports import SEQ_DIGITS

#: messages per page unless the URL asks for fewer; and the most a URL may ask for (a bounded query)
PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
#: bytes of a binary payload shown as hex (as ``outbox show``)
HEX_PREVIEW = 64
#: messages of the same key shown before and after a message on its page
NEIGHBOURS = 3
#: held keys on the keys page (oldest head first), and how far the messages behind each are counted
KEYS_SHOWN = 100
WAITING_CAP = 10_000
#: seconds between two live updates of a page (overview, lists, a message, keys, dead letters)
REFRESH_SECONDS = 5
#: the dashboard's last actions shown on the overview
AUDIT_SHOWN = 20
STATUSES = tuple(s.value for s in Status)


class BadQuery(ValueError):
    """A URL's query names something that is not there (an unknown status, a page size of zero)."""


@dataclass(frozen=True)
class ListQuery:
    """The ``/messages`` URL's query: which messages, and which page of them (keyset: after a seq)."""

    statuses: tuple[str, ...] = ()
    topic: str | None = None
    key: str | None = None
    #: created at or after / before (naive UTC)
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    after: int | None = None
    limit: int = PAGE_SIZE

    @classmethod
    def parse(cls, params: Mapping[str, str], statuses: Sequence[str]) -> ListQuery:
        """From the query string (``statuses``: every ``status=`` value); :class:`BadQuery` if invalid."""
        chosen = tuple(dict.fromkeys(s for s in statuses if s))
        unknown = [s for s in chosen if s not in STATUSES]
        if unknown:
            raise BadQuery(f"unknown status {unknown[0]!r}: use one of {', '.join(STATUSES)}")
        return cls(
            statuses=chosen,
            topic=params.get("topic") or None,
            key=params.get("key") or None,
            since=utc_time(params.get("since"), "since"),
            until=utc_time(params.get("until"), "until"),
            after=whole(params.get("after"), "after", minimum=0),
            limit=min(whole(params.get("limit"), "limit", minimum=1) or PAGE_SIZE, MAX_PAGE_SIZE),
        )

    def filter(self) -> MessageFilter:
        return MessageFilter(
            tuple(Status(s) for s in self.statuses), self.topic, self.key, self.since, self.until
        )

    def params(self, **changes: object) -> dict[str, str | list[str]]:
        """This query as URL parameters (for the next page's link), with ``changes``."""
        values: dict[str, object] = {
            "status": list(self.statuses),
            "topic": self.topic,
            "key": self.key,
            "since": None if self.since is None else time_field(self.since),
            "until": None if self.until is None else time_field(self.until),
            "limit": self.limit if self.limit != PAGE_SIZE else None,
            "after": self.after,
            **changes,
        }
        out: dict[str, str | list[str]] = {}
        for name, value in values.items():
            if isinstance(value, list):
                if value:
                    out[name] = [str(v) for v in value]
            elif value is not None:
                out[name] = str(value)
        return out


def whole(text: str | None, name: str, *, minimum: int) -> int | None:
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > SEQ_DIGITS or int(text) < minimum:
        raise BadQuery(f"{name} must be a whole number of at least {minimum}, got {text!r}")
    return int(text)


def utc_time(text: str | None, name: str) -> dt.datetime | None:
    """A time from a URL (``2026-05-01T12:00``, as a datetime-local field sends it: UTC; or ISO 8601
    with an offset) as naive UTC; :class:`BadQuery` if it is not one."""
    if not text:
        return None
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadQuery(f"{name} must be a time like 2026-05-01T12:00 (UTC), got {text!r}") from None
    return value if value.tzinfo is None else value.astimezone(dt.UTC).replace(tzinfo=None)


def time_field(value: dt.datetime) -> str:
    """A naive UTC time as a datetime-local field's value (seconds kept when there are some)."""
    return value.strftime("%Y-%m-%dT%H:%M:%S" if value.second or value.microsecond else "%Y-%m-%dT%H:%M")


def trace_link(template: str | None, headers: Mapping[str, str]) -> str | None:
    """``template`` (``https://tempo.example/trace/{trace_id}``) filled with the trace id of a valid
    W3C ``traceparent`` header; None without either."""
    parent = headers.get("traceparent", "")
    parts = parent.split("-")
    if not template or len(parts) != 4 or len(parts[1]) != 32 or parts[1] == "0" * 32:
        return None
    if not all(c in "0123456789abcdef" for c in parts[1]):
        return None
    return template.replace("{trace_id}", parts[1])


def iso(value: dt.datetime | None) -> str:
    """A stored time (naive UTC) as ISO 8601 with its offset: what a ``<time datetime>`` holds."""
    return "" if value is None else utc_iso(value)


def shown_time(value: dt.datetime | None) -> str:
    """A time as people read it on the page: ``2026-05-01 12:00:03 UTC``."""
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class PayloadView:
    """A payload as the message page shows it: pretty JSON, or its size and a hex preview of bytes."""

    size: int
    json: str | None = None
    hex_preview: str | None = None
    truncated: bool = False

    @classmethod
    def of(cls, record: MessageRecord) -> PayloadView:
        value = record.decoded_payload()
        if isinstance(value, bytes):
            return cls(
                size=len(value),
                hex_preview=value[:HEX_PREVIEW].hex(" "),
                truncated=len(value) > HEX_PREVIEW,
            )
        return cls(size=record.payload_size, json=json.dumps(value, indent=2, ensure_ascii=False))


def due_label(status: str) -> str:
    """What ``due_at`` means for a message in ``status`` (as ``outbox show`` labels it)."""
    return {
        Status.PENDING.value: "due at",
        Status.FAILED.value: "next attempt at",
        Status.INFLIGHT.value: "lease expires at",
    }.get(status, "due at")


#: the overview's charts: the last hour by minute, the last day by quarter of an hour
HOUR = (dt.timedelta(hours=1), dt.timedelta(minutes=1))
DAY = (dt.timedelta(days=1), dt.timedelta(minutes=15))
#: latency percentiles shown
PERCENTILES = (0.5, 0.9, 0.99)


@dataclass(frozen=True)
class Bar:
    """One step of a chart: its stacked rectangles (``(css class, y, height)``) and its tooltip."""

    x: float
    width: float
    parts: tuple[tuple[str, float, float], ...]
    title: str


@dataclass(frozen=True)
class ChartView:
    """A bar chart of delivered, failed and dead per step, drawn by the template as inline SVG (no
    script, no style attribute: the CSP allows neither)."""

    width: int
    height: int
    bars: tuple[Bar, ...]
    peak: int
    first: str
    last: str
    activity: Activity

    @classmethod
    def of(cls, activity: Activity, *, width: int = 720, height: int = 120) -> ChartView:
        peak = max((d + f + x for _, d, f, x in activity.buckets), default=0)
        slot = width / max(1, len(activity.buckets))
        bars = []
        for index, (start, delivered, failed, dead) in enumerate(activity.buckets):
            parts: list[tuple[str, float, float]] = []
            bottom = float(height)
            for css, value in (("delivered", delivered), ("failed", failed), ("dead", dead)):
                if value and peak:
                    tall = max(1.0, value / peak * (height - 4))
                    bottom -= tall
                    parts.append((css, round(bottom, 2), round(tall, 2)))
            title = f"{start:%b %d %H:%M} UTC: {delivered} delivered, {failed} failed, {dead} dead"
            bars.append(Bar(round(index * slot, 2), round(max(slot - 1, 0.5), 2), tuple(parts), title))
        last = activity.buckets[-1][0] if activity.buckets else activity.since
        shown = "%H:%M" if len(activity.buckets) * activity.step <= dt.timedelta(hours=1) else "%b %d %H:%M"
        return cls(
            width, height, tuple(bars), peak, activity.since.strftime(shown), last.strftime(shown), activity
        )


def latency_text(milliseconds: float | None) -> str:
    """A latency percentile as the overview shows it: the upper bound of its bucket."""
    if milliseconds is None:
        return "-"
    if milliseconds == float("inf"):
        return "over 5 min"
    return f"under {milliseconds:g} ms" if milliseconds < 1000 else f"under {milliseconds / 1000:g} s"
