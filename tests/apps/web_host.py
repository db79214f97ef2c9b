"""A small FastAPI application with the dashboard mounted under /ops/outbox (tests/test_browser.py).

``uvicorn tests.apps.web_host:app``; the database is ``OUTBOX_DATABASE_URL``.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from outbox import create_engine
from outbox.web import create_app

engine = create_engine(os.environ["OUTBOX_DATABASE_URL"])
app = FastAPI()


@app.get("/")
def home() -> dict[str, str]:
    """The host application's own route, beside the mount."""
    return {"service": "shop"}


app.mount("/ops/outbox", create_app(engine, title="shop outbox"))
