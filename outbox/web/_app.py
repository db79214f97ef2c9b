"""``create_app``: the dashboard as a Starlette application, its routes and the headers on every answer.

What the app promises, each kept by a test in ``tests/test_web.py``:

- **Read-only**: every route answers GET and HEAD only; anything else is 405 before any code runs.
  -- ``test_every_route_refuses_state_changing_methods``
- **Every answer carries the security headers** (:data:`SECURITY_HEADERS`: a Content-Security-Policy
  that allows no inline script and nothing from elsewhere, nosniff, no framing, no referrer to other
  sites), 404s and 405s included. -- ``test_security_headers_on_every_answer``
- **Everything shown is escaped** (Jinja2 autoescape): a payload or a topic can never become markup.
  -- ``test_a_script_in_a_payload_is_shown_not_run``
- **Links follow the mount**: each one is built from the route's name and the request's ``root_path``,
  so the app works under any prefix a host application mounts it at. -- ``test_mounted_under_a_prefix``
- **Every query is bounded**: the overview is ``Operations.status`` (as ``outbox status``), a list page
  is at most :data:`~outbox.web._pages.MAX_PAGE_SIZE` rows by keyset (``seq``), a message page one row.
- ``hide_payloads`` hides payloads and headers on every page. -- ``test_hide_payloads_hides_them``
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlencode

import jinja2
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from outbox._dialects import create_engine
from outbox._errors import MessageNotFound
from outbox._schema import DEFAULT_TABLE
from outbox.admin import Operations
from outbox.admin._reports import message_ref, span
from outbox.web import _pages as pages

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
) -> Starlette:
    """The dashboard of the outbox ``table`` on ``engine_or_url``, as an ASGI application.

    Mount it under any prefix (``app.mount("/outbox", create_app(engine))``) or serve it alone
    (``outbox web``). An engine given is used, not disposed; a URL gets an engine of the app's own,
    disposed at the application's shutdown. ``hide_payloads``: never show payloads or headers (where
    they hold personal data). ``title`` names the dashboard in its pages (default: the table's name).
    The app has no authentication of its own: mounted, it sits behind the host application's.
    """
    owned = isinstance(engine_or_url, str)
    engine = create_engine(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url
    ops = Operations(engine, table)
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
        "shown_time": pages.shown_time,
    }

    def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        html = templates.get_template(template).render(**shared, url=_linker(request), **context)
        return HTMLResponse(html, status_code=status_code)

    def overview(request: Request) -> Response:
        report = ops.status()
        age = report.oldest_waiting_age
        return render(
            request,
            "overview.html",
            report=report,
            statuses=pages.STATUSES,
            oldest_age=None if age is None else span(age),
        )

    def messages(request: Request) -> Response:
        try:
            query = pages.ListQuery.parse(request.query_params, request.query_params.getlist("status"))
        except pages.BadQuery as exc:
            return render(request, "error.html", 400, heading="Bad request", detail=str(exc))
        # one more than a page: whether a next page exists, without a count
        records = ops.list_messages(query.filter(), limit=query.limit + 1, after=query.after)
        more = len(records) > query.limit
        records = records[: query.limit]
        next_params = query.params(after=records[-1].seq) if more else None
        return render(
            request,
            "messages.html",
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
            return render(request, "error.html", 404, heading="No such message", detail=str(exc))
        return render(
            request,
            "message.html",
            record=record,
            payload=None if hide_payloads else pages.PayloadView.of(record),
            due_label=pages.due_label(record.status),
        )

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
            Mount("/static", app=static, name="static"),
        ],
        middleware=[Middleware(SecurityHeaders)],
        lifespan=lifespan,
    )


def _linker(request: Request) -> Callable[..., str]:
    """``url(name, query=None, **path_params)``: the path of one of this app's routes, under the prefix
    the app is mounted at (``root_path``), so links work wherever the host application mounts it."""
    router = request.app.router
    prefix = str(request.scope.get("root_path", "")).rstrip("/")

    def url(name: str, query: dict[str, Any] | None = None, **path_params: Any) -> str:
        path = prefix + str(router.url_path_for(name, **path_params))
        return f"{path}?{urlencode(query, doseq=True)}" if query else path

    return url
