"""``create_app``: the dashboard as a Starlette application, its routes and the headers on every answer.

What the app promises, each kept by a test in ``tests/test_web.py``:

- **Read-only by default**: every page answers GET and HEAD only (anything else is 405 before any code
  runs); the action routes answer 403 unless ``allow_actions`` grants the action to the request's
  sender, and run only a POST carrying a CSRF token from this site (:mod:`outbox.web._actions`).
  -- ``test_every_route_refuses_state_changing_methods``, ``test_an_action_needs_a_fresh_token_...``
- **Every answer carries the security headers** (:data:`SECURITY_HEADERS`: a Content-Security-Policy
  that allows no inline script and nothing from elsewhere, nosniff, no framing, no referrer to other
  sites), 404s and 405s included. -- ``test_security_headers_on_every_answer``
- **Everything shown is escaped** (Jinja2 autoescape): a payload or a topic can never become markup.
  -- ``test_a_script_in_a_payload_is_shown_not_run``
- **Links follow the mount**: each one is built from the route's name and the request's ``root_path``,
  so the app works under any prefix a host application mounts it at. -- ``test_mounted_under_a_prefix``
- **Every query is bounded**, whatever the table holds: the overview is ``Operations.status(exact=False)``
  (delivered messages estimated past 100,000, other counts capped) plus at most a day of the relays'
  per-minute rows, a list page is at most :data:`~outbox.web._pages.MAX_PAGE_SIZE` rows by keyset
  (``seq``) through its filter's index, a message page one row and
  :data:`~outbox.web._pages.NEIGHBOURS` of its key each side, the keys page
  :data:`~outbox.web._pages.KEYS_SHOWN` heads, each with a count capped at ``WAITING_CAP``, a dry run
  a count capped at ``COUNT_CAP``. -- ``make bench-web`` (BENCHMARKS.md)
- ``outbox doctor``'s checks never hold a request: :class:`DoctorCache` runs them on a thread.
- ``hide_payloads`` hides payloads and headers on every page. -- ``test_hide_payloads_hides_them``
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlencode

import jinja2
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from outbox._clock import utcnow
from outbox._dialects import create_engine
from outbox._errors import BrokerError, MessageNotFound
from outbox._runtime.kafka_settings import KafkaConnection
from outbox._schema import DEFAULT_TABLE, Status
from outbox.admin import DoctorReport, MessageFilter, Operations, diagnose
from outbox.admin._operations import COUNT_CAP
from outbox.admin._reports import message_ref, span
from outbox.web import _pages as pages
from outbox.web._actions import (
    ACTION_STATUSES,
    MAX_SELECTION,
    ActionQuery,
    AllowActions,
    Csrf,
    Fields,
    FormData,
    audit_line,
    client_of,
    read_form,
    rights_of,
    same_site,
    user_of,
)

#: seconds a health report (``outbox doctor``'s checks) is shown before it is checked again
DOCTOR_MAX_AGE = 60.0

log = logging.getLogger("outbox.web")

#: on every answer. ``default-src 'self'``: scripts, styles and images only from this app's own
#: /static (no inline script or style, nothing from a CDN); ``frame-ancestors 'none'`` with
#: X-Frame-Options for older browsers: no page of the dashboard can be framed (clickjacking).
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    (
        "content-security-policy",
        "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "same-origin"),
    ("x-frame-options", "DENY"),
)


class SecurityHeaders:
    """ASGI middleware adding :data:`SECURITY_HEADERS` to every HTTP answer (replacing any of the same
    name)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name.encode() for name, _ in SECURITY_HEADERS}
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(
    engine_or_url: sa.Engine | str,
    *,
    table: str = DEFAULT_TABLE,
    hide_payloads: bool = False,
    title: str | None = None,
    allow_actions: AllowActions = False,
    secret: bytes | None = None,
    kafka: KafkaConnection | None = None,
    refresh: float = pages.REFRESH_SECONDS,
    trace_url: str | None = None,
) -> Starlette:
    """The dashboard of the outbox ``table`` on ``engine_or_url``, as an ASGI application.

    Mount it under any prefix (``app.mount("/outbox", create_app(engine))``) or serve it alone
    (``outbox web``). An engine given is used, not disposed; a URL gets an engine of the app's own,
    disposed at the application's shutdown. ``hide_payloads``: never show payloads or headers (where
    they hold personal data). ``title`` names the dashboard in its pages (default: the table's name).
    The app has no authentication of its own: mounted, it sits behind the host application's.

    ``allow_actions``: read-only by default; ``True`` offers replay and purge to everyone who reaches
    the app; a callable gets each request and returns ``True``, ``False`` or the actions allowed
    (``{"replay"}``), e.g. from ``request.user``. ``secret`` signs the CSRF tokens (random per process
    unless given: give every process of a multi-worker app the same one). ``kafka`` (e.g. a
    ``relay.publishers.kafka.KafkaSettings``): where replayed dead letters of ``outbox consume`` go;
    without it the dead letters are shown, not replayed. ``refresh``: seconds between two live updates
    of a page in the browser (pausable there; 0: none). ``trace_url``: a link to a message's trace,
    ``{trace_id}`` replaced by the trace id of its ``traceparent`` header
    (``https://grafana.example/explore?...{trace_id}``, ``https://jaeger.example/trace/{trace_id}``).
    """
    owned = isinstance(engine_or_url, str)
    engine = create_engine(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url
    ops = Operations(engine, table)
    csrf = Csrf(secret)
    doctor = DoctorCache(engine, table)
    templates = jinja2.Environment(
        loader=jinja2.PackageLoader("outbox.web", "templates"),
        autoescape=True,  # every value, whatever the template's name: payloads and topics are user data
        undefined=jinja2.StrictUndefined,
    )
    shared = {
        "title": title or ("outbox" if table == DEFAULT_TABLE else f"outbox {table}"),
        "table": table,
        "hide_payloads": hide_payloads,
        "iso": pages.iso,
        "refresh": None,
        "shown_time": pages.shown_time,
    }

    def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("rights", rights_of(allow_actions, request))
        html = templates.get_template(template).render({**shared, "url": _linker(request), **context})
        return HTMLResponse(html, status_code=status_code)

    def refuse(request: Request, status_code: int, heading: str, detail: str) -> HTMLResponse:
        return render(request, "error.html", status_code, heading=heading, detail=detail)

    async def confirmed_form(request: Request, action: str, what: str) -> FormData | Response:
        """The fields of an action's confirmation, or the refusal: no right to ``action`` (403), not
        a form (400), no valid CSRF token of this user or not from this site (403)."""
        if action not in rights_of(allow_actions, request):
            return refuse(request, 403, "Not allowed", f"this dashboard does not let you {action} {what}")
        form = await read_form(request)
        if form is None:
            return refuse(request, 400, "Bad request", "expected a form (application/x-www-form-urlencoded)")
        fields = FormData(form)
        if not same_site(request) or not csrf.valid(fields.get("csrf"), user_of(request)):
            return refuse(
                request, 403, "Refused", "this form did not come from this dashboard: open the action again"
            )
        return fields

    def audited(request: Request, action: str, what: str, count: int) -> None:
        """An action run: its audit line, and its row in the audit table."""
        audit_line(request, action, what, count)
        ops.record_audit(
            who=user_of(request), client=client_of(request), action=action, target=what, count=count
        )

    def overview(request: Request) -> Response:
        report = ops.status(exact=False)  # bounded: estimates past EXACT_DELIVERED delivered messages
        doctor_report, doctor_age = doctor.get()
        age = report.oldest_waiting_age
        hour = ops.activity(window=pages.HOUR[0], step=pages.HOUR[1], now=report.now)
        day = ops.activity(window=pages.DAY[0], step=pages.DAY[1], now=report.now)
        return render(
            request,
            "overview.html",
            refresh=refresh or None,
            report=report,
            statuses=pages.STATUSES,
            oldest_age=None if age is None else span(age),
            capped=lambda n: (
                f"more than {report.count_cap}" if report.count_cap and n > report.count_cap else n
            ),
            ago=lambda t: "never" if t is None else f"{span(max(report.now - t, dt.timedelta(0)))} ago",
            charts=(
                ("Last hour, per minute", pages.ChartView.of(hour)),
                ("Last day, per 15 minutes", pages.ChartView.of(day)),
            ),
            percentiles=[
                (
                    f"p{round(p * 100)}",
                    pages.latency_text(hour.percentile(p)),
                    pages.latency_text(day.percentile(p)),
                )
                for p in pages.PERCENTILES
            ],
            audit_log=ops.audit_log(limit=pages.AUDIT_SHOWN),
            doctor=doctor_report,
            doctor_age=span(dt.timedelta(seconds=doctor_age)),
        )

    def messages(request: Request) -> Response:
        wanted = request.query_params.get("ref", "").strip()
        if wanted:  # "go to message": an id or a SEQ
            if message_ref(wanted) is None:
                return refuse(request, 400, "Bad request", f"{wanted!r} is neither a SEQ nor a message id")
            return RedirectResponse(_linker(request)("message", ref=wanted), status_code=303)
        try:
            query = pages.ListQuery.parse(request.query_params, request.query_params.getlist("status"))
        except pages.BadQuery as exc:
            return refuse(request, 400, "Bad request", str(exc))
        # one more than a page: whether a next page exists, without a count
        records = ops.list_messages(query.filter(), limit=query.limit + 1, after=query.after)
        more = len(records) > query.limit
        records = records[: query.limit]
        next_params = query.params(after=records[-1].seq) if more else None
        return render(
            request,
            "messages.html",
            refresh=refresh or None,
            query=query,
            records=records,
            statuses=pages.STATUSES,
            next_params=next_params,
            max_page_size=pages.MAX_PAGE_SIZE,
        )

    def message(request: Request) -> Response:
        text = request.path_params["ref"]
        ref = message_ref(text)
        try:
            if ref is None:
                raise MessageNotFound(f"{text!r} is neither a SEQ nor a message id")
            record = ops.get(ref)
        except MessageNotFound as exc:
            return refuse(request, 404, "No such message", str(exc))
        around: list[Any] = []
        if record.key is not None:
            # the messages of its key around it: a few before and after, by seq (the key's index)
            of_key = MessageFilter(key=record.key)
            before = ops.list_messages(of_key, limit=pages.NEIGHBOURS, after=record.seq, order="desc")
            after = ops.list_messages(of_key, limit=pages.NEIGHBOURS, after=record.seq, order="asc")
            around = [*reversed(before), record, *after]
        return render(
            request,
            "message.html",
            refresh=refresh or None,
            record=record,
            around=around,
            payload=None if hide_payloads else pages.PayloadView.of(record),
            due_label=pages.due_label(record.status),
            trace=pages.trace_link(trace_url, record.headers),
            replayable=record.status in [s.value for s in ACTION_STATUSES["replay"]],
            purgeable=record.status in [s.value for s in ACTION_STATUSES["purge"]],
        )

    def keys(request: Request) -> Response:
        now = utcnow()
        held = ops.held_keys(limit=pages.KEYS_SHOWN, waiting_cap=pages.WAITING_CAP)
        return render(
            request,
            "keys.html",
            refresh=refresh or None,
            held=held,
            ages={k.key: span(max(now - k.head.created_at, dt.timedelta(0))) for k in held},
            keys_shown=pages.KEYS_SHOWN,
        )

    def dry_run(query: ActionQuery) -> tuple[ActionQuery, int, list[tuple[Any, str]]]:
        """What ``query``'s action would change: the query bounded by the newest seq it may touch, the
        count, and the selected messages it would leave alone (with their status)."""
        if query.is_selection:
            if query.action == "replay":
                result = ops.replay_ids(query.refs, dry_run=True)
                return query, len(result.replayed), list(result.skipped)
            selected = MessageFilter((Status.DELIVERED, Status.DEAD))
            count = ops.purge_matching(selected, refs=query.refs, dry_run=True).count
            return query, count, []
        if query.up_to is None:  # the newest message now: one written later is never touched
            query = dataclasses.replace(query, up_to=ops.max_seq())
        return query, ops.count(query.filter(), cap=COUNT_CAP), []

    def run(query: ActionQuery) -> int:
        """Run ``query``'s action; how many messages it changed."""
        if query.is_selection:
            if query.action == "replay":
                return len(ops.replay_ids(query.refs).replayed)
            selected = MessageFilter((Status.DELIVERED, Status.DEAD))
            return ops.purge_matching(selected, refs=query.refs).count
        if query.action == "replay":
            return len(ops.replay_matching(query.filter()).replayed)
        return ops.purge_matching(query.filter()).count

    def dead_letters(request: Request) -> Response:
        params = request.query_params
        try:
            after = pages.whole(params.get("after"), "after", minimum=0)
            limit = min(
                pages.whole(params.get("limit"), "limit", minimum=1) or pages.PAGE_SIZE, pages.MAX_PAGE_SIZE
            )
        except pages.BadQuery as exc:
            return refuse(request, 400, "Bad request", str(exc))
        group = params.get("group") or None
        pending = params.get("pending") == "1"
        letters = ops.dead_letters(group=group, pending=pending, limit=limit + 1, after=after)
        more = len(letters) > limit
        letters = letters[:limit]
        query = {"group": group, "pending": "1" if pending else None}
        return render(
            request,
            "dead_letters.html",
            refresh=refresh or None,
            groups=ops.dead_letter_groups(),
            letters=letters,
            group=group,
            pending=pending,
            query={k: v for k, v in query.items() if v},
            next_after=letters[-1].seq if more else None,
            can_replay=kafka is not None,
        )

    def dead_letter(request: Request) -> Response:
        try:
            letter = ops.dead_letter(int(request.path_params["seq"]))
        except MessageNotFound as exc:
            return refuse(request, 404, "No such dead letter", str(exc))
        return render(
            request,
            "dead_letter.html",
            letter=letter,
            shown=None if hide_payloads else letter.to_dict(with_value=True),
            can_replay=kafka is not None,
        )

    def dead_letter_choice(fields: Fields) -> tuple[list[int], str | None, bool, int | None]:
        """(seqs, group, every group, up_to) from a query string or a form: :class:`pages.BadQuery`."""
        seqs = [pages.whole(v, "seq", minimum=1) or 0 for v in fields.getlist("seq")]
        group = fields.get("group") or None
        everything = fields.get("all") == "1"
        if bool(seqs) == bool(group or everything):
            raise pages.BadQuery("say which dead letters: seq=..., or group=GROUP, or all=1")
        if len(seqs) > MAX_SELECTION:
            raise pages.BadQuery(f"{len(seqs)} dead letters selected: at most {MAX_SELECTION} at once")
        return seqs, group, everything, pages.whole(fields.get("up_to"), "up_to", minimum=0)

    def dlq_preview(request: Request) -> Response:
        if "replay" not in rights_of(allow_actions, request):
            return refuse(request, 403, "Not allowed", "this dashboard does not let you replay dead letters")
        try:
            seqs, group, everything, up_to = dead_letter_choice(request.query_params)
            if not seqs and up_to is None:
                # at most MAX_SELECTION at once, oldest first: the confirmation stops at the last of them
                oldest = ops.dead_letters(group=group, pending=True, limit=MAX_SELECTION)
                up_to = oldest[-1].seq if oldest else 0
            found = ops.replay_dead_letters(
                None, seqs=seqs, group=group, everything=everything, up_to=up_to, dry_run=True
            )
        except pages.BadQuery as exc:
            return refuse(request, 400, "Bad request", str(exc))
        except MessageNotFound as exc:
            return refuse(request, 404, "No such dead letter", str(exc))
        fields = [("seq", str(s)) for s in seqs] + [
            (k, str(v))
            for k, v in (("group", group), ("all", "1" if everything else None), ("up_to", up_to))
            if v is not None
        ]
        return render(
            request,
            "confirm_dlq.html",
            letters=found.replayed,
            fields=fields,
            can_replay=kafka is not None,
            token=csrf.token(user_of(request)),
        )

    async def dlq_run(request: Request) -> Response:
        fields = await confirmed_form(request, "replay", "dead letters")
        if isinstance(fields, Response):
            return fields
        if kafka is None:
            return refuse(request, 409, "No Kafka", "this dashboard has no Kafka connection to replay to")
        try:
            seqs, group, everything, up_to = dead_letter_choice(fields)
            if not seqs and up_to is None:
                raise pages.BadQuery("a group replay needs up_to: confirm it from its dry-run page")
            result = ops.replay_dead_letters(
                kafka, seqs=seqs, group=group, everything=everything, up_to=up_to
            )
        except pages.BadQuery as exc:
            return refuse(request, 400, "Bad request", str(exc))
        except MessageNotFound as exc:
            return refuse(request, 404, "No such dead letter", str(exc))
        except BrokerError as exc:
            return refuse(request, 502, "Kafka refused", str(exc))
        what = (
            f"dead letters {', '.join(map(str, seqs))}"
            if seqs
            else f"dead letters of {'every group' if everything else 'group ' + str(group)} up to seq {up_to}"
        )
        audited(request, "replay", what, len(result.replayed))
        return render(request, "done_dlq.html", result=result)

    def action_preview(request: Request) -> Response:
        action = request.path_params["action"]
        if action not in rights_of(allow_actions, request):
            return refuse(request, 403, "Not allowed", f"this dashboard does not let you {action} messages")
        try:
            params = request.query_params
            query = ActionQuery.parse(action, params, params.getlist("ref"), params.getlist("status"))
            query, count, skipped = dry_run(query)
        except pages.BadQuery as exc:
            return refuse(request, 400, "Bad request", str(exc))
        except MessageNotFound as exc:
            return refuse(request, 404, "No such message", str(exc))
        return render(
            request,
            "confirm.html",
            query=query,
            count=count,
            cap=COUNT_CAP,
            skipped=skipped,
            token=csrf.token(user_of(request)),
        )

    async def action_run(request: Request) -> Response:
        action = request.path_params["action"]
        fields = await confirmed_form(request, action, "messages")
        if isinstance(fields, Response):
            return fields
        try:
            query = ActionQuery.parse(action, fields, fields.getlist("ref"), fields.getlist("status"))
            if not query.is_selection and query.up_to is None:
                raise pages.BadQuery("a filter action needs up_to: confirm it from its dry-run page")
            expected = pages.whole(fields.get("expected"), "expected", minimum=0)
            count = run(query)
        except pages.BadQuery as exc:
            return refuse(request, 400, "Bad request", str(exc))
        except MessageNotFound as exc:
            return refuse(request, 404, "No such message", str(exc))
        audited(request, query.action, query.describe(), count)
        return render(request, "done.html", query=query, count=count, expected=expected)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        if owned:
            engine.dispose()

    static = StaticFiles(packages=[("outbox.web", "static")])
    return Starlette(
        routes=[
            Route("/", overview, methods=["GET"], name="overview"),
            Route("/messages", messages, methods=["GET"], name="messages"),
            Route("/messages/{ref}", message, methods=["GET"], name="message"),
            Route("/keys", keys, methods=["GET"], name="keys"),
            Route("/dead-letters", dead_letters, methods=["GET"], name="dead_letters"),
            Route("/dead-letters/replay", dlq_preview, methods=["GET"], name="dlq_replay"),
            Route("/dead-letters/replay", dlq_run, methods=["POST"], name="dlq_replay_run"),
            Route("/dead-letters/{seq:int}", dead_letter, methods=["GET"], name="dead_letter"),
            Route("/actions/{action}", action_preview, methods=["GET"], name="action"),
            Route("/actions/{action}", action_run, methods=["POST"], name="action_run"),
            Mount("/static", app=static, name="static"),
        ],
        middleware=[Middleware(SecurityHeaders)],
        lifespan=lifespan,
    )


class DoctorCache:
    """``outbox doctor``'s findings for the overview, computed on a thread of their own at most every
    ``max_age`` seconds: its checks take 0.1-0.3 s (a LISTEN round trip, the catalog), which no page
    request waits for. The first overview says they are being checked; live updates bring them."""

    def __init__(self, engine: sa.Engine, table: str, max_age: float = DOCTOR_MAX_AGE) -> None:
        self.engine = engine
        self.table = table
        self.max_age = max_age
        self.report: DoctorReport | None = None
        self.at = 0.0
        self._running = False
        self._lock = threading.Lock()

    def get(self) -> tuple[DoctorReport | None, float]:
        """The last report and its age in seconds (starting a new check when it is too old)."""
        with self._lock:
            stale = self.report is None or time.monotonic() - self.at > self.max_age
            if stale and not self._running:
                self._running = True
                threading.Thread(target=self._check, name="outbox-web-doctor", daemon=True).start()
            return self.report, time.monotonic() - self.at

    def _check(self) -> None:
        try:
            report = diagnose(self.engine, self.table)
        except Exception:  # never takes the dashboard down: the overview keeps its last report
            log.exception("the dashboard's health checks failed")
            report = None
        with self._lock:
            if report is not None:
                self.report, self.at = report, time.monotonic()
            self._running = False


def _linker(request: Request) -> Callable[..., str]:
    """``url(name, query=None, **path_params)``: the path of one of this app's routes, under the prefix
    the app is mounted at (``root_path``), so links work wherever the host application mounts it."""
    router = request.app.router
    prefix = str(request.scope.get("root_path", "")).rstrip("/")

    def url(name: str, query: dict[str, Any] | None = None, **path_params: Any) -> str:
        path = prefix + str(router.url_path_for(name, **path_params))
        return f"{path}?{urlencode(query, doseq=True)}" if query else path

    return url
