"""The write side: add() is atomic with the caller's transaction, and bad input never gets written."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import decimal
import enum
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import outbox
from outbox.dialects import normalise_url
from outbox.schema import tables_for
from outbox.wakeup import NOTIFY_GAP


class Base(orm.DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    item: orm.Mapped[str] = orm.mapped_column(sa.String(50))


@pytest.fixture
def shop(engine: sa.Engine) -> sa.Engine:
    Base.metadata.create_all(engine)
    return engine


def messages(engine: sa.Engine) -> list[Any]:
    t = tables_for().messages
    with engine.connect() as conn:
        return list(conn.execute(sa.select(t).order_by(t.c.seq)).all())


def orders(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(Order.id).order_by(Order.id)).scalars())


# --- atomicity, per session type --------------------------------------------------------------------------


def test_session_commit_writes_message_and_rollback_writes_none(shop: sa.Engine) -> None:
    with orm.Session(shop) as session, session.begin():
        session.add(Order(id=1, item="book"))
        committed_id = outbox.add(session, "order.created", {"order_id": 1}, key="order-1")

    with orm.Session(shop) as session:
        session.begin()
        session.add(Order(id=2, item="pen"))
        outbox.add(session, "order.created", {"order_id": 2}, key="order-2")
        session.rollback()

    rows = messages(shop)
    assert [r.id for r in rows] == [committed_id]
    assert rows[0].status == "pending" and rows[0].msg_key == "order-1" and rows[0].attempts == 0
    assert json.loads(rows[0].payload) == {"order_id": 1}
    assert orders(shop) == [1]


def test_exception_inside_session_block_writes_nothing(shop: sa.Engine) -> None:
    with pytest.raises(RuntimeError), orm.Session(shop) as session, session.begin():
        session.add(Order(id=3, item="cup"))
        outbox.add(session, "order.created", {"order_id": 3})
        raise RuntimeError("business rule failed")
    assert messages(shop) == [] and orders(shop) == []


def test_savepoint_rollback_discards_only_its_messages(shop: sa.Engine) -> None:
    with orm.Session(shop) as session, session.begin():
        kept = outbox.add(session, "order.created", {"n": 1})
        nested = session.begin_nested()
        outbox.add(session, "order.created", {"n": 2})
        nested.rollback()
        also_kept = outbox.add(session, "order.created", {"n": 3})
    assert [r.id for r in messages(shop)] == [kept, also_kept]


def test_core_connection_commit_and_rollback(shop: sa.Engine) -> None:
    with shop.begin() as conn:
        committed = outbox.add(conn, "order.created", {"n": 1}, headers={"trace": "abc"})
    with shop.connect() as conn:
        conn.begin()
        outbox.add(conn, "order.created", {"n": 2})
        conn.rollback()
    rows = messages(shop)
    assert [r.id for r in rows] == [committed]
    assert json.loads(rows[0].headers) == {"trace": "abc"}


def _async_url(db_url: str) -> sa.URL:
    url = normalise_url(db_url)
    backend = url.get_backend_name()
    driver = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+psycopg", "mysql": "mysql+asyncmy"}
    return url.set(drivername=driver["mysql" if backend == "mariadb" else backend])


def test_async_session_commit_and_rollback_without_await(shop: sa.Engine, db_url: str) -> None:
    async def scenario() -> tuple[uuid.UUID, uuid.UUID]:
        aengine = create_async_engine(_async_url(db_url))
        try:
            async with AsyncSession(aengine) as session, session.begin():
                session.add(Order(id=10, item="lamp"))
                committed = outbox.add(session, "order.created", {"order_id": 10}, key="k")  # no await
            async with AsyncSession(aengine) as session:
                await session.begin()
                session.add(Order(id=11, item="desk"))
                rolled_back = outbox.add(session, "order.created", {"order_id": 11}, key="k")
                await session.flush()  # written inside the transaction, then undone
                await session.rollback()
            return committed, rolled_back
        finally:
            await aengine.dispose()

    committed, rolled_back = asyncio.run(scenario())
    rows = messages(shop)
    assert [r.id for r in rows] == [committed]
    assert rolled_back != committed
    assert rows[0].status == "pending" and rows[0].seq is not None
    assert orders(shop) == [10]


def test_async_session_writes_queued_rows_at_the_first_flush_query_or_commit(
    shop: sa.Engine, db_url: str
) -> None:
    """An AsyncSession's rows wait for the session's next flush, query or commit (nothing can run in a
    plain ``add``): a commit with nothing else to flush writes them, a query in the transaction sees
    them, and a savepoint rolled back first drops only its own."""
    t = outbox.tables_for().messages

    async def scenario() -> tuple[list[uuid.UUID], int]:
        aengine = create_async_engine(_async_url(db_url))
        try:
            async with AsyncSession(aengine) as session, session.begin():
                alone = outbox.add(session, "order.created", {"n": 1})  # no ORM change at all
            async with AsyncSession(aengine) as session, session.begin():
                kept = outbox.add(session, "order.created", {"n": 2})
                seen = (await session.execute(sa.select(sa.func.count()).select_from(t))).scalar_one()
                nested = await session.begin_nested()
                outbox.add(session, "order.created", {"n": 3})
                await nested.rollback()
                also_kept = outbox.add(session, "order.created", {"n": 4})
            async with AsyncSession(aengine) as session:
                outbox.add(session, "order.created", {"n": 5})  # before the session began
                await session.rollback()
                await session.commit()
            return [alone, kept, also_kept], seen
        finally:
            await aengine.dispose()

    expected, seen = asyncio.run(scenario())
    assert seen == 2, "a query in the transaction did not see the row added before it"
    assert [r.id for r in messages(shop)] == expected


# --- payloads ------------------------------------------------------------------------------------------


class Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Line:
    sku: str
    price: decimal.Decimal


def test_payload_encoding_of_extra_types(engine: sa.Engine) -> None:
    order_id = uuid.UUID("12345678-1234-5678-1234-567812345678")
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    payload = {
        "id": order_id,
        "at": when,
        "day": dt.date(2026, 1, 2),
        "total": decimal.Decimal("12.30"),
        "lines": [Line("A-1", decimal.Decimal("1.10"))],
        "colour": Colour.RED,
        "tags": ("x", "y"),
        "none": None,
        "text": "ünïcödé",
    }
    with engine.begin() as conn:
        outbox.add(conn, "t", payload)
        outbox.add(conn, "bin", b"\x00\xffraw")
    json_row, bin_row = messages(engine)
    assert json_row.content_type == "application/json"
    assert json.loads(json_row.payload) == {
        "id": "12345678-1234-5678-1234-567812345678",
        "at": "2026-01-02T03:04:05+00:00",
        "day": "2026-01-02",
        "total": "12.30",
        "lines": [{"sku": "A-1", "price": "1.10"}],
        "colour": "red",
        "tags": ["x", "y"],
        "none": None,
        "text": "ünïcödé",
    }
    assert bin_row.content_type == "application/octet-stream" and bytes(bin_row.payload) == b"\x00\xffraw"


def test_large_payload_round_trips(engine: sa.Engine) -> None:
    big = {"blob": "x" * 300_000}  # beyond MariaDB's plain BLOB (64 KiB)
    with engine.begin() as conn:
        outbox.add(conn, "big", big)
    assert json.loads(messages(engine)[0].payload) == big


# --- bad input: a clear error, before anything is written -----------------------------------------------


class NotSerialisable:
    def __repr__(self) -> str:
        return "<NotSerialisable>"


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"payload": {"x": NotSerialisable()}}, outbox.PayloadError, "NotSerialisable"),
        ({"payload": {"x": float("nan")}}, outbox.PayloadError, "payload cannot be serialised"),
        ({"payload": {1, 2}.__class__}, outbox.PayloadError, "type"),
        ({"topic": ""}, outbox.TopicError, "invalid topic ''"),
        ({"topic": "has space"}, outbox.TopicError, "'has space'"),
        ({"topic": "a" * 250}, outbox.TopicError, "1-249"),
        ({"topic": None}, outbox.TopicError, "None"),
        ({"key": 42}, outbox.MessageKeyError, "not int"),
        ({"key": "k" * 256}, outbox.MessageKeyError, "1-255"),
        ({"headers": {"retries": 3}}, outbox.HeaderError, "'retries'"),
        ({"headers": {1: "x"}}, outbox.HeaderError, "header name 1"),
        ({"headers": ["a"]}, outbox.HeaderError, "mapping"),
        ({"delay": -1}, outbox.DelayError, "-1"),
        ({"delay": dt.timedelta(seconds=-5)}, outbox.DelayError, "zero or more"),
        ({"delay": "10"}, outbox.DelayError, "str"),
        ({"delay": float("nan")}, outbox.DelayError, "nan"),
    ],
)
def test_bad_input_raises_named_error_and_writes_nothing(
    engine: sa.Engine, kwargs: dict[str, Any], error: type[Exception], fragment: str
) -> None:
    args: dict[str, Any] = {"topic": "order.created", "payload": {"ok": True}, **kwargs}
    topic, payload = args.pop("topic"), args.pop("payload")
    with orm.Session(engine) as session, session.begin():
        with pytest.raises(error) as info:
            outbox.add(session, topic, payload, **args)
        assert fragment in str(info.value)
        assert isinstance(info.value, outbox.MessageError)
        assert isinstance(info.value, outbox.OutboxError)
        good = outbox.add(session, "order.created", {"still": "usable"})  # the transaction is untouched
    assert [r.id for r in messages(engine)] == [good]


def test_add_rejects_something_that_is_not_a_session(engine: sa.Engine) -> None:
    with pytest.raises(TypeError, match="Session, AsyncSession or Connection"):
        outbox.add(engine, "t", {})


def test_delay_sets_due_time(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        outbox.add(conn, "later", {}, delay=dt.timedelta(minutes=5))
        outbox.add(conn, "now", {})
    later, now = messages(engine)
    assert (later.due_at - later.created_at) == dt.timedelta(minutes=5)
    assert now.due_at == now.created_at


def test_message_ids_are_unique_and_time_ordered(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        ids = [outbox.add(conn, "t", {"i": i}) for i in range(200)]
    assert len(set(ids)) == 200
    assert ids == sorted(ids, key=lambda u: u.bytes)
    assert all(u.version == 7 for u in ids)


def test_table_name_is_validated() -> None:
    with pytest.raises(outbox.ConfigError, match="invalid outbox table name"):
        outbox.Outbox(table="orders; DROP TABLE x")


def test_custom_table_name(db_url: str) -> None:
    engine = outbox.create_engine(db_url)
    try:
        with engine.begin() as conn:
            outbox.upgrade(conn, "shop_outbox")
        box = outbox.Outbox(table="shop_outbox")
        with engine.begin() as conn:
            box.add(conn, "t", {"x": 1})
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT COUNT(*) FROM shop_outbox")).scalar() == 1
    finally:
        engine.dispose()


def test_upgrade_is_idempotent_and_versioned(db_url: str) -> None:
    engine = outbox.create_engine(db_url)
    try:
        with engine.begin() as conn:
            assert [m.version for m in outbox.upgrade(conn)] == [m.version for m in outbox.schema.MIGRATIONS]
        with engine.begin() as conn:
            assert outbox.upgrade(conn) == []
        with engine.connect() as conn:
            outbox.schema.check_version(conn)
    finally:
        engine.dispose()


def test_missing_table_is_a_schema_error(db_url: str) -> None:
    engine = outbox.create_engine(db_url)
    try:
        with engine.connect() as conn, pytest.raises(outbox.SchemaError, match="outbox db upgrade"):
            outbox.schema.check_version(conn)
    finally:
        engine.dispose()


# --- the PostgreSQL wake-up ------------------------------------------------------------------------------


@contextlib.contextmanager
def _notifications(db_url: str) -> Iterator[tuple[list[float], list[int]]]:
    """LISTEN on the default outbox's channel meanwhile: yields the arrival times of its notifications
    and the pids of the backends that sent them."""
    from outbox.wakeup import notify_channel

    received: list[float] = []
    pids: list[int] = []
    listening = threading.Event()
    done = threading.Event()

    def listen() -> None:
        with psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as pg:
            pg.execute(f'LISTEN "{notify_channel("outbox")}"')
            listening.set()
            while not done.is_set():
                for notify in pg.notifies(timeout=0.05, stop_after=1):
                    received.append(time.monotonic())
                    pids.append(notify.pid)

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert listening.wait(10)
    try:
        yield received, pids
    finally:
        done.set()
        thread.join(5)


@pytest.mark.parametrize("backend", ["postgresql"])
def test_notifies_of_a_busy_moment_are_merged(shop: sa.Engine, db_url: str) -> None:
    """A writer committing as fast as it can sends at most one NOTIFY every NOTIFY_GAP, not one a commit."""
    sessions = orm.sessionmaker(shop)
    commits = 0
    with _notifications(db_url) as (received, _):
        started = time.monotonic()
        while time.monotonic() - started < 0.3:
            with sessions() as session, session.begin():
                outbox.add(session, "burst", {"i": commits})
            commits += 1
        time.sleep(0.3)  # the last gap's NOTIFY
        burst = time.monotonic() - started
    assert commits >= 20, f"only {commits} commits in 0.3 s: nothing to merge"
    assert 1 <= len(received) <= burst / NOTIFY_GAP + 2, f"{len(received)} NOTIFYs for {commits} commits"


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_commit_inside_the_gap_gets_a_notify_at_its_end(shop: sa.Engine, db_url: str) -> None:
    """Two commits back to back: the first is announced at once, the second by a NOTIFY a gap later."""
    sessions = orm.sessionmaker(shop)
    with _notifications(db_url) as (received, _):
        time.sleep(2 * NOTIFY_GAP)  # no gap left over from an earlier test
        for i in range(2):
            with sessions() as session, session.begin():
                outbox.add(session, "pair", {"i": i})
        time.sleep(max(0.5, 10 * NOTIFY_GAP))
    assert len(received) == 2, f"{len(received)} NOTIFYs for two commits (want one each side of the gap)"
    assert received[1] - received[0] >= 0.9 * NOTIFY_GAP


@pytest.mark.parametrize("backend", ["postgresql"])
def test_async_session_on_psycopg_notifies_after_the_commit(shop: sa.Engine, db_url: str) -> None:
    """The wake-up of an AsyncSession's commit comes from the notifier's connection, not the writer's."""

    async def write() -> int:
        aengine = create_async_engine(_async_url(db_url))
        try:
            async with AsyncSession(aengine) as session, session.begin():
                session.add(Order(id=20, item="kite"))
                outbox.add(session, "order.created", {"order_id": 20})
                writer_pid = (await session.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
            return int(writer_pid)
        finally:
            await aengine.dispose()

    with _notifications(db_url) as (_, pids):
        writer_pid = asyncio.run(write())
        deadline = time.monotonic() + 5
        while not pids and time.monotonic() < deadline:
            time.sleep(0.01)
    assert pids, "no NOTIFY after the AsyncSession's commit"
    assert writer_pid not in pids, "the writer's own transaction sent the NOTIFY"
    assert [r.id for r in messages(shop)] and orders(shop) == [20]
