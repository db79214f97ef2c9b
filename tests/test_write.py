"""The write side: add() is atomic with the caller's transaction, and bad input never gets written."""

from __future__ import annotations

import asyncio
import collections
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
from outbox._dialects import normalise_url
from outbox._schema import tables_for
from outbox._wakeup import NOTIFY_GAP
from outbox.writer import DEFAULT_MAX_PAYLOAD_BYTES, MAX_HEADERS_BYTES


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
        ({"payload": {"x": float("nan")}}, outbox.PayloadError, 'payload["x"] is NaN'),
        ({"payload": {1: "a"}}, outbox.PayloadError, "payload has the key 1 of type int"),
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


@dataclasses.dataclass
class Priced:
    sku: str
    extras: Any


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            {"price": float("nan")},
            'payload["price"] is NaN: JSON has no NaN or Infinity; send None, or a string, in its place',
        ),
        ({"lines": [{"sku": "A", "price": float("inf")}]}, 'payload["lines"][0]["price"] is Infinity'),
        ([1, -float("inf")], "payload[1] is -Infinity"),
        ({"total": decimal.Decimal("NaN")}, "payload[\"total\"] is Decimal('NaN')"),
        ({"lines": (Priced("A", float("nan")),)}, 'payload["lines"][0].extras is NaN'),
        ({"when": NotSerialisable()}, 'payload["when"] is of type NotSerialisable, which is not JSON'),
    ],
)
def test_payload_error_names_where_the_bad_value_is(payload: Any, message: str) -> None:
    """Issue 17: "payload cannot be serialised: Out of range float values are not JSON compliant" did not
    say which value; the error names its path, so a large payload's culprit is found at once."""
    with pytest.raises(outbox.PayloadError) as info:
        outbox.Outbox().build_row("t", payload)
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({1: "a"}, "payload has the key 1 of type int: JSON object keys are strings"),
        ({"a": {"b": [{2.5: "x"}]}}, 'payload["a"]["b"][0] has the key 2.5 of type float'),
        ({"ok": True, "flags": {None: 1}}, 'payload["flags"] has the key None of type NoneType'),
        ({"t": {True: 1}}, 'payload["t"] has the key True of type bool'),
        ({"k": {("a", 1): 1}}, "payload[\"k\"] has the key ('a', 1) of type tuple"),
        ([Priced("A", {"ok": 1, 3: "c"})], "payload[0].extras has the key 3 of type int"),
        ({"rows": [*range(20), collections.OrderedDict({5: "x"})]}, 'payload["rows"][20] has the key 5'),
    ],
)
def test_non_string_keys_are_refused_not_converted(engine: sa.Engine, payload: Any, message: str) -> None:
    """``json`` stores ``{1: "a"}`` as ``{"1": "a"}``, and the handler then reads another value than was
    written: the key is refused instead, with its path and type, and nothing is written."""
    with orm.Session(engine) as session, session.begin():
        with pytest.raises(outbox.PayloadError) as info:
            outbox.add(session, "t", payload)
        assert str(info.value).startswith(message), str(info.value)
        assert "convert the keys yourself" in str(info.value)
    assert messages(engine) == []
    with engine.begin() as conn:  # string keys everywhere, dataclasses and tuples included: written as is
        outbox.add(conn, "t", {"a": [{"b": (Priced("A", {"c": None}),)}]})
    assert json.loads(messages(engine)[0].payload) == {"a": [{"b": [{"sku": "A", "extras": {"c": None}}]}]}


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"topic": "abc\n"}, outbox.TopicError, "invalid topic 'abc\\n'"),
        ({"key": "a\x00b"}, outbox.MessageKeyError, "NUL"),
        ({"key": "a\ud800"}, outbox.MessageKeyError, "lone surrogate"),
        ({"headers": {"h": "\udcff"}}, outbox.HeaderError, "its value contains '\\udcff'"),
        ({"headers": {"h\ud800": "v"}}, outbox.HeaderError, "its name contains '\\ud800'"),
        ({"delay": 1e12}, outbox.DelayError, "too long"),
        ({"delay": dt.timedelta.max}, outbox.DelayError, "too long"),
        ({"delay": float("inf")}, outbox.DelayError, "too long"),
        ({"delay": dt.timedelta(days=36_526)}, outbox.DelayError, "at most 36525 days"),
    ],
    ids=[
        "topic-trailing-newline",
        "key-nul",
        "key-lone-surrogate",
        "header-value-lone-surrogate",
        "header-name-lone-surrogate",
        "delay-1e12",
        "delay-timedelta-max",
        "delay-inf",
        "delay-past-100-years",
    ],
)
def test_input_a_database_would_reject_or_mangle_is_refused_before_anything_is_written(
    engine: sa.Engine, kwargs: dict[str, Any], error: type[Exception], fragment: str
) -> None:
    """Each of these reached the database before: a DataError that aborted the caller's transaction
    (PostgreSQL), a key stored with its NUL (MariaDB, SQLite), a UnicodeEncodeError from the driver, an
    OverflowError computing the due time. Now each is the documented error, on every database, and the
    same transaction goes on."""
    args = dict(kwargs)  # the parameters are shared by the backends' runs
    topic = args.pop("topic", "order.created")
    with orm.Session(engine) as session, session.begin():
        session.execute(sa.text("SELECT 1"))  # a transaction with work in it, like the caller's
        with pytest.raises(error) as info:
            outbox.add(session, topic, {"bad": True}, **args)
        assert fragment in str(info.value)
        assert isinstance(info.value, outbox.MessageError)
        assert len(str(info.value).splitlines()) == 1
        good = outbox.add(session, "order.created", {"still": "usable"}, key="k")
    assert [r.id for r in messages(engine)] == [good]


def test_a_nul_in_a_header_is_kept_on_every_database(engine: sa.Engine) -> None:
    """Headers are stored as JSON, which escapes a NUL: unlike a key's, it reaches no text column."""
    with engine.begin() as conn:
        outbox.add(conn, "t", {}, headers={"h\x00": "a\x00b"}, delay=dt.timedelta(days=36_525))
    (row,) = messages(engine)
    assert json.loads(row.headers) == {"h\x00": "a\x00b"}
    assert row.due_at - row.created_at == dt.timedelta(days=36_525)  # the longest delay fits everywhere


def test_oversized_payload_is_refused_before_anything_is_written(shop: sa.Engine) -> None:
    """A 20 MB payload got "server has gone away" from MariaDB (its max_allowed_packet is 16 MiB) and
    took the caller's transaction with it. Now outbox.add refuses it on every database, and the same
    transaction, with the business change made before it, goes on and commits."""
    twenty_mb = b"\x00" * 20_000_000
    with orm.Session(shop) as session, session.begin():
        session.add(Order(id=1, item="before"))
        session.flush()
        with pytest.raises(outbox.PayloadError) as info:
            outbox.add(session, "big", twenty_mb)
        assert str(info.value).startswith(
            f"payload of 20000000 bytes exceeds max_payload_bytes {DEFAULT_MAX_PAYLOAD_BYTES}: "
        )
        with pytest.raises(outbox.PayloadError, match="exceeds max_payload_bytes"):
            outbox.add(session, "big", {"text": "x" * DEFAULT_MAX_PAYLOAD_BYTES})  # as JSON, 11 bytes more
        session.add(Order(id=2, item="after"))
        good = outbox.add(session, "small", {"still": "usable"})
    assert [r.id for r in messages(shop)] == [good]
    assert orders(shop) == [1, 2]


def test_payload_and_headers_at_their_maximum_are_written_on_every_database(engine: sa.Engine) -> None:
    """The default maximum fits MariaDB's default packet in the worst case: PyMySQL sends bytes as hex
    (twice their size) and escapes quotes in text, here with the largest headers allowed."""
    payload = b"\x00" * DEFAULT_MAX_PAYLOAD_BYTES
    headers = {"h": "'" * (MAX_HEADERS_BYTES - len('{"h":""}'))}
    with orm.Session(engine) as session, session.begin():
        outbox.add(session, "max", payload, headers=headers)
    (row,) = messages(engine)
    assert bytes(row.payload) == payload and json.loads(row.headers) == headers
    with (
        engine.connect() as conn,
        pytest.raises(outbox.HeaderError, match=f"of {MAX_HEADERS_BYTES + 1} bytes"),
    ):
        outbox.add(conn, "max", {}, headers={"h": headers["h"] + "'"})


@pytest.mark.parametrize("backend", ["sqlite"])
def test_max_payload_bytes_is_a_setting_of_the_writer(engine: sa.Engine) -> None:
    small = outbox.Outbox(max_payload_bytes=10)
    large = outbox.Outbox(max_payload_bytes=DEFAULT_MAX_PAYLOAD_BYTES + 1)
    with engine.begin() as conn:
        small.add(conn, "t", b"0123456789")
        with pytest.raises(outbox.PayloadError, match="payload of 11 bytes exceeds max_payload_bytes 10"):
            small.add(conn, "t", b"0123456789A")
        large.add(conn, "t", b"x" * (DEFAULT_MAX_PAYLOAD_BYTES + 1))
    assert [len(r.payload) for r in messages(engine)] == [10, DEFAULT_MAX_PAYLOAD_BYTES + 1]
    for bad in (0, -1, 1.5, None):
        with pytest.raises(outbox.ConfigError, match="max_payload_bytes must be a whole number"):
            outbox.Outbox(max_payload_bytes=bad)  # type: ignore[arg-type]


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
            assert [m.version for m in outbox.upgrade(conn)] == [m.version for m in outbox._schema.MIGRATIONS]
        with engine.begin() as conn:
            assert outbox.upgrade(conn) == []
        with engine.connect() as conn:
            outbox._schema.check_version(conn)
    finally:
        engine.dispose()


def test_missing_table_is_a_schema_error(db_url: str) -> None:
    engine = outbox.create_engine(db_url)
    try:
        with engine.connect() as conn, pytest.raises(outbox.SchemaError, match="outbox db upgrade"):
            outbox._schema.check_version(conn)
    finally:
        engine.dispose()


# --- the PostgreSQL wake-up ------------------------------------------------------------------------------


@contextlib.contextmanager
def _notifications(db_url: str) -> Iterator[tuple[list[float], list[int]]]:
    """LISTEN on the default outbox's channel meanwhile: yields the arrival times of its notifications
    and the pids of the backends that sent them."""
    from outbox._wakeup import notify_channel

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
        # at least 0.3 s and 20 commits (a slow moment of a shared machine takes longer to make 20)
        while (time.monotonic() - started < 0.3 or commits < 20) and time.monotonic() - started < 10:
            with sessions() as session, session.begin():
                outbox.add(session, "burst", {"i": commits})
            commits += 1
        time.sleep(0.3)  # the last gap's NOTIFY
        burst = time.monotonic() - started
    assert commits >= 20, f"only {commits} commits in {burst:.1f} s: nothing to merge"
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
