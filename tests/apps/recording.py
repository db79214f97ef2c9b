"""Handlers that leave a trace of every handling, for relays the tests run as subprocesses.

Two registries handle the same topic, :data:`TOPIC`:

- ``tests.apps.recording:registry``: a plain handler (no session);
- ``tests.apps.recording:session_registry``: a handler with a session, which inserts a row into the
  :data:`HANDLED` table in the transaction that also writes the message's delivered mark.

Both append lines to the file named by ``OUTBOX_TEST_RECORD``::

    start <message id> <key or -> <payload index> <pid>
    done <message id> <key or -> <payload index> <pid>

``start`` before the work, ``done`` after it (for the session handler: after its insert, before the
commit, so ``done`` means "the handler returned", not "committed"). Each line is one ``os.write`` on an
``O_APPEND`` descriptor: the kernel appends it whole, so a ``kill -9`` loses no line that was written
and several relays can share the file.

The payload is ``{"i": index}`` plus, optionally, ``"sleep": seconds`` (how long the handler works
between ``start`` and ``done``; default ``OUTBOX_TEST_SLEEP``, else 0), or ``"exit": true`` (the handler
kills its relay with ``os._exit`` after ``start``: a poison message).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm

import outbox
from consumers import Registry
from outbox._message import Message

TOPIC = "test.recorded"
RECORD_ENV = "OUTBOX_TEST_RECORD"
SLEEP_ENV = "OUTBOX_TEST_SLEEP"

registry = Registry()
session_registry = Registry()

handled_metadata = sa.MetaData()
#: one row per committed handling by the session handler; no unique constraint on purpose, so a handling
#: committed twice would show up as two rows instead of failing the second attempt
HANDLED = sa.Table(
    "handled",
    handled_metadata,
    sa.Column("n", sa.Integer, primary_key=True, autoincrement=True),  # insertion order
    sa.Column("message_id", sa.String(36), nullable=False),
    sa.Column("msg_key", sa.String(255), nullable=True),
    sa.Column("idx", sa.Integer, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
)

_record_fd: int | None = None


def _record(event: str, message: Message) -> None:
    global _record_fd
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    if _record_fd is None:
        _record_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    line = f"{event} {message.id} {message.key or '-'} {message.payload['i']} {os.getpid()}\n"
    os.write(_record_fd, line.encode())


def _work(message: Message) -> None:
    if message.payload.get("exit"):  # a poison message that kills its relay (as a segfault or OOM would)
        os._exit(70)
    seconds = message.payload.get("sleep", float(os.environ.get(SLEEP_ENV) or 0))
    if seconds:
        time.sleep(seconds)


@registry.handler(TOPIC)
def record(message: Message) -> None:
    _record("start", message)
    _work(message)
    _record("done", message)


@session_registry.handler(TOPIC)
def record_in_transaction(message: Message, session: orm.Session) -> None:
    _record("start", message)
    # The insert comes first so that the transaction is open (and can be cut by an outage or fenced off)
    # while the handler works.
    session.execute(
        sa.insert(HANDLED).values(
            message_id=str(message.id), msg_key=message.key, idx=message.payload["i"], pid=os.getpid()
        )
    )
    _work(message)
    _record("done", message)


#: two apps that route different topics (tests/test_routing.py): ``orders_registry`` a pattern, and
#: ``mail_registry`` an exact name; each records its handlings like ``registry``
ORDERS_TOPIC = "test.orders.placed"
MAIL_TOPIC = "test.mail.sent"
orders_registry = Registry()
mail_registry = Registry()
#: registers nothing: what `--app` names by mistake (a package instead of its handlers module)
empty_registry = Registry()


@orders_registry.handler("test.orders.*")
def record_order(message: Message) -> None:
    _record("start", message)
    _work(message)
    _record("done", message)


@mail_registry.handler(MAIL_TOPIC)
def record_mail(message: Message) -> None:
    _record("start", message)
    _work(message)
    _record("done", message)


# --- the test side ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Handling:
    """One line of the record file."""

    event: str
    message_id: str
    key: str | None
    index: int
    pid: int


def read_record(path: Path) -> list[Handling]:
    """The record file's lines, in the order they were appended (an absent file is an empty record)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    handlings = []
    for line in text.splitlines():
        event, message_id, key, index, pid = line.split()
        handlings.append(Handling(event, message_id, None if key == "-" else key, int(index), int(pid)))
    return handlings


def count_done(path: Path) -> int:
    """How many handlings finished so far (cheap enough to poll)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    return data.count(b"\ndone ") + data.startswith(b"done ")


def commit_messages(
    engine: sa.Engine,
    plan: Iterable[tuple[str | None, int]],
    *,
    sleep: float | None = None,
    per_transaction: int = 200,
) -> dict[str, tuple[str | None, int]]:
    """Commit one :data:`TOPIC` message per ``(key, index)`` of ``plan``; return ``{id: (key, index)}``."""
    committed: dict[str, tuple[str | None, int]] = {}
    items = list(plan)
    for start in range(0, len(items), per_transaction):
        with engine.begin() as conn:
            for key, index in items[start : start + per_transaction]:
                payload: dict[str, Any] = {"i": index}
                if sleep is not None:
                    payload["sleep"] = sleep
                committed[str(outbox.add(conn, TOPIC, payload, key=key))] = (key, index)
    return committed


def create_handled_table(engine: sa.Engine) -> None:
    handled_metadata.create_all(engine)


def handled_rows(engine: sa.Engine) -> list[sa.Row[Any]]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(HANDLED).order_by(HANDLED.c.n)).all())


def first_handling_order(handlings: Iterable[tuple[str | None, int, str]]) -> dict[str, list[int]]:
    """Per key, the payload indexes in the order of their first handling; the caller checks they increase.

    ``handlings`` are ``(key, index, message id)`` in handling order; unkeyed ones are skipped.
    """
    seen: set[str] = set()
    order: dict[str, list[int]] = {}
    for key, index, message_id in handlings:
        if key is None or message_id in seen:
            continue
        seen.add(message_id)
        order.setdefault(key, []).append(index)
    return order
