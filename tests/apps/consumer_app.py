"""Handlers for the consumer tests: ``outbox consume --app tests.apps.consumer_app:registry``.

Configured by the environment of the ``outbox consume`` subprocess (read at import):

- ``OUTBOX_TEST_TOPIC``: the topic of the session handler, which inserts one row into :data:`EFFECTS`
  per handling (no unique constraint: an effect committed twice shows as two rows). The handler without
  a session takes ``<topic>.plain`` and appends ``<message id> <pid>`` to the file named by
  ``OUTBOX_TEST_RECORD``.
- ``OUTBOX_TEST_KILL_AFTER=N``: the process kills itself with SIGKILL right after the N-th handler
  transaction committed (SQLAlchemy's ``after_commit`` session event): after the database commit,
  before the Kafka offset commit, the window the inbox exists for.

The in-process tests build their own registries with :func:`effect_handler`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm

from consumers import Registry
from outbox import Message

TOPIC = os.environ.get("OUTBOX_TEST_TOPIC", "test.consumed")
PLAIN_TOPIC = f"{TOPIC}.plain"

effects_metadata = sa.MetaData()
EFFECTS = sa.Table(
    "consumer_effects",
    effects_metadata,
    sa.Column("n", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("who", sa.String(64), nullable=False),
    sa.Column("message_id", sa.String(36), nullable=False),
    sa.Column("idx", sa.Integer, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
)


def create_effects_table(engine: sa.Engine) -> None:
    effects_metadata.create_all(engine)


def effect_rows(engine: sa.Engine, who: str | None = None) -> list[sa.Row[Any]]:
    query = sa.select(EFFECTS).order_by(EFFECTS.c.n)
    if who is not None:
        query = query.where(EFFECTS.c.who == who)
    with engine.connect() as conn:
        return list(conn.execute(query).all())


def effect_handler(who: str, *, poisoned: Callable[[], bool] = lambda: False) -> Callable[..., None]:
    """A session handler recording its effect as ``who``; raises on a poison payload while ``poisoned()``."""

    def handle(message: Message, session: orm.Session) -> None:
        if message.payload.get("poison") and poisoned():
            raise ValueError(f"poison payload {message.payload['i']}")
        session.execute(
            sa.insert(EFFECTS).values(
                who=who, message_id=str(message.id), idx=message.payload["i"], pid=os.getpid()
            )
        )

    return handle


registry = Registry()
registry.add(TOPIC, effect_handler("app"))


@registry.handler(PLAIN_TOPIC)
def record_plain(message: Message) -> None:
    path = os.environ.get("OUTBOX_TEST_RECORD")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{message.id} {os.getpid()}\n".encode())
        finally:
            os.close(fd)


_kill_after = int(os.environ.get("OUTBOX_TEST_KILL_AFTER") or 0)
_commits = 0


def _die_after_commits(_session: orm.Session) -> None:
    global _commits
    _commits += 1
    if _commits >= _kill_after:
        os.kill(os.getpid(), signal.SIGKILL)


if _kill_after:
    sa.event.listen(orm.Session, "after_commit", _die_after_commits)
