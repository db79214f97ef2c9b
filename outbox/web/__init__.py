"""The web dashboard: ``outbox.web.create_app(engine)``, an ASGI application of server-rendered pages.

Built only on the operator layer (:mod:`outbox.admin`), like the CLI, so that a page and the matching
``outbox`` command can never tell different stories. Importing it needs the ``web`` extra (Starlette,
Jinja2; uvicorn for ``outbox web``); nothing else in the project imports it.

- :mod:`outbox.web._app`: :func:`create_app`, the routes and the security headers;
- :mod:`outbox.web._pages`: what each page shows, as plain values the templates render;
- :mod:`outbox.web._actions`: replay and purge: rights, the dry run, CSRF and the audit line;
- :mod:`outbox.web._auth`: HTTP basic auth, which ``outbox web`` puts in front of the app.

Read-only unless actions are allowed (see ``docs/web.md``).
"""

from __future__ import annotations

from outbox.web._app import create_app

__all__ = ["create_app"]
