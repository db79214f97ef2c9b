"""The handlers of the consume benchmark: ``outbox consume --app bench.consume_app:registry``.

Configured by the environment of the ``outbox consume`` process (read at import):
``BENCH_CONSUME_TOPIC`` is the topic, ``BENCH_CONSUME_KIND`` the handler:

- ``session``: takes a session and adds one :class:`Effect` row (``session.add``), committed with the
  record's inbox row;
- ``plain``: no session, does nothing (its inbox row is still written in the batch's transaction);
- ``latency``: no session; appends ``time.time()`` minus the payload's ``t`` (the send time) to the file
  ``BENCH_LATENCY_FILE``, one line a record, at the handler's start.
"""

from __future__ import annotations

import os
import time

import sqlalchemy as sa
from sqlalchemy import orm

from consumers import Registry
from outbox import Message

TOPIC = os.environ.get("BENCH_CONSUME_TOPIC", "bench.consume")
KIND = os.environ.get("BENCH_CONSUME_KIND", "session")


class Base(orm.DeclarativeBase):
    pass


class Effect(Base):
    """One row per handled record: the session handler's database work."""

    __tablename__ = "bench_consume_effects"
    n: orm.Mapped[int] = orm.mapped_column(primary_key=True, autoincrement=True)
    message_id: orm.Mapped[str] = orm.mapped_column(sa.String(36))


def with_session(message: Message, session: orm.Session) -> None:
    session.add(Effect(message_id=str(message.id)))


def plain(message: Message) -> None:
    pass


_latency_file = None
if KIND == "latency":
    _latency_file = open(os.environ["BENCH_LATENCY_FILE"], "a", buffering=1)  # noqa: SIM115 (for the process)


def latency(message: Message) -> None:
    seconds = time.time() - float(message.payload["t"])
    assert _latency_file is not None
    _latency_file.write(f"{seconds:.6f}\n")


registry = Registry()
registry.add(TOPIC, {"session": with_session, "plain": plain, "latency": latency}[KIND])
