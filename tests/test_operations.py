"""The operator's queries (outbox.admin._operations) on each database: what status/list/show report, and that
replay and purge change exactly what they promise and nothing else."""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import outbox
from consumers import Registry
from outbox._clock import utcnow
from outbox._message import Message
from outbox._schema import Status, tables_for
from outbox.admin._operations import MessageFilter, Operations
from outbox.cli import outbox as outbox_cli
from tests.conftest import status_counts, wait_until

T = tables_for().messages
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)


def add(engine: sa.Engine, topic: str = "orders.created", payload: Any = None, **kwargs: Any) -> uuid.UUID:
    with engine.begin() as conn:
        return outbox.add(conn, topic, {"n": 1} if payload is None else payload, **kwargs)


def set_row(engine: sa.Engine, message_id: uuid.UUID, **values: Any) -> None:
    with engine.begin() as conn:
        assert conn.execute(sa.update(T).where(T.c.id == message_id).values(**values)).rowcount == 1


def put(engine: sa.Engine, status: Status, message_id: uuid.UUID, now: dt.datetime, **extra: Any) -> None:
    """Give a message the columns a relay would have left for ``status``."""
    by_status: dict[Status, dict[str, Any]] = {
        Status.PENDING: {"due_at": now},
        Status.INFLIGHT: {"due_at": now + dt.timedelta(seconds=30), "lease_token": "a" * 32, "attempts": 1},
        Status.FAILED: {
            "due_at": now + HOUR,
            "attempts": 2,
            "last_error": "Timeout: try later",
            "last_attempt_at": now,
        },
        Status.DELIVERED: {"due_at": None, "attempts": 1, "delivered_at": now, "last_attempt_at": now},
        Status.DEAD: {
            "due_at": None,
            "attempts": 3,
            "last_error": "ValueError: bad\nline 2",
            "last_attempt_at": now,
        },
        Status.PARKED: {
            "due_at": None,
            "attempts": 3,
            "last_error": "ValueError: parked",
            "last_attempt_at": now,
        },
    }
    values = {**by_status[status], **extra}
    set_row(engine, message_id, status=status.value, **values)


def seed(engine: sa.Engine, now: dt.datetime, statuses: list[Status], **kwargs: Any) -> list[uuid.UUID]:
    ids = []
    for status in statuses:
        message_id = add(engine, **kwargs)
        put(engine, status, message_id, now)
        ids.append(message_id)
    return ids


def table_rows(engine: sa.Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(T).order_by(T.c.seq))]


def row(engine: sa.Engine, message_id: uuid.UUID) -> sa.Row[Any]:
    with engine.connect() as conn:
        return conn.execute(sa.select(T).where(T.c.id == message_id)).one()


# --- status, list, show -------------------------------------------------------------------------------------


def test_status_counts_every_status_and_topic_and_the_backlog(engine: sa.Engine) -> None:
    now = utcnow()
    pending = seed(engine, now, [Status.PENDING, Status.PENDING], topic="a")
    seed(engine, now, [Status.DELIVERED, Status.DELIVERED, Status.DELIVERED], topic="a")
    seed(engine, now, [Status.FAILED, Status.DEAD], topic="b")
    seed(engine, now, [Status.PARKED, Status.PARKED], topic="c", key="k1")
    seed(engine, now, [Status.PARKED], topic="c", key="k2")
    expired = seed(engine, now, [Status.INFLIGHT, Status.INFLIGHT], topic="b")
    put(engine, Status.INFLIGHT, expired[0], now, due_at=now - dt.timedelta(seconds=5))
    set_row(engine, pending[1], created_at=now - 2 * HOUR, due_at=now - 2 * HOUR)
    add(engine, topic="a", delay=3600)  # pending but not due yet

    report = Operations(engine).status(now=now)

    assert report.counts == {"pending": 3, "inflight": 2, "failed": 1, "delivered": 3, "dead": 1, "parked": 3}
    assert report.total == 13
    assert report.topics == {
        "a": {"pending": 3, "delivered": 3},
        "b": {"failed": 1, "dead": 1, "inflight": 2},
        "c": {"parked": 3},
    }
    assert report.oldest_waiting_at == now - 2 * HOUR
    assert report.oldest_waiting_age == 2 * HOUR
    assert report.parked_keys == 2
    assert report.due_now == 2  # the two pending due now; the delayed one and the failed one are later
    assert report.expired_leases == 1
    assert report.to_dict()["oldest_waiting_age_seconds"] == 7200.0


def test_status_of_an_empty_outbox(engine: sa.Engine) -> None:
    report = Operations(engine).status()
    assert report.total == 0 and report.oldest_waiting_at is None and report.oldest_waiting_age is None
    assert report.counts == {s.value: 0 for s in Status}


def test_list_filters_by_status_topic_key_and_time(engine: sa.Engine) -> None:
    now = utcnow()
    ops = Operations(engine)
    dead = seed(engine, now, [Status.DEAD], topic="pay_ment.failed", key="k1")[0]
    parked = seed(engine, now, [Status.PARKED], topic="pay_ment.failed", key="k2")[0]
    failed = seed(engine, now, [Status.FAILED], topic="payXment.failed", key="k1")[0]
    old = seed(engine, now, [Status.DELIVERED], topic="orders.created")[0]
    set_row(engine, old, created_at=now - 3 * DAY)

    def ids(**kwargs: Any) -> set[uuid.UUID]:
        return {r.id for r in ops.list_messages(MessageFilter(**kwargs))}

    assert ids() == {dead, parked, failed, old}
    assert ids(statuses=(Status.DEAD,)) == {dead, parked}  # dead includes parked
    assert ids(statuses=(Status.PARKED,)) == {parked}
    assert ids(statuses=(Status.FAILED, Status.DELIVERED)) == {failed, old}
    assert ids(topic="pay_ment.failed") == {dead, parked}
    assert ids(topic="pay_ment.*") == {dead, parked}  # "_" is literal, not LIKE's any-character
    assert ids(topic="pay*") == {dead, parked, failed}
    assert ids(key="k1") == {dead, failed}
    assert ids(since=now - DAY) == {dead, parked, failed}
    assert ids(until=now - DAY) == {old}
    assert ids(statuses=(Status.DEAD,), key="k1", since=now - DAY) == {dead}


def test_list_pages_by_seq_without_gaps_or_repeats(engine: sa.Engine) -> None:
    ops = Operations(engine)
    added = [add(engine, payload={"i": i}) for i in range(7)]

    def all_pages(order: Any) -> list[uuid.UUID]:
        seen: list[uuid.UUID] = []
        after = None
        while True:
            page = ops.list_messages(limit=3, after=after, order=order)
            seen.extend(r.id for r in page)
            if len(page) < 3:
                return seen
            after = page[-1].seq

    assert all_pages("asc") == added
    assert all_pages("desc") == added[::-1]
    newest = ops.list_messages(limit=2)
    assert [r.id for r in newest] == added[:-3:-1]
    assert newest[0].payload is None and newest[0].payload_size == len(b'{"i":6}')


def test_show_gives_everything_about_one_message(engine: sa.Engine) -> None:
    now = utcnow()
    ops = Operations(engine)
    message_id = add(
        engine, "orders.created", {"order": 42, "items": ["a"]}, key="o-42", headers={"trace": "t1"}
    )
    put(engine, Status.FAILED, message_id, now)
    binary = add(engine, "blobs", b"\x00\x01binary")

    record = ops.get(message_id)
    assert (record.topic, record.key, record.status, record.attempts) == (
        "orders.created",
        "o-42",
        "failed",
        2,
    )
    assert record.decoded_payload() == {"order": 42, "items": ["a"]}
    assert record.headers == {"trace": "t1"}
    assert record.last_error == "Timeout: try later"
    assert record.due_at == now + HOUR  # the next attempt
    data = record.to_dict()
    assert data["payload"] == {"order": 42, "items": ["a"]} and data["id"] == str(message_id)

    blob = ops.get(binary)
    assert blob.decoded_payload() == b"\x00\x01binary"
    assert blob.to_dict()["payload_hex"] == "0001" + b"binary".hex()
    assert blob.payload_size == 8

    with pytest.raises(outbox.MessageNotFound):
        ops.get(uuid.uuid4())
    # by the seq `outbox list` shows, too
    assert ops.get(record.seq) == record
    with pytest.raises(outbox.MessageNotFound, match="no message with seq 9999"):
        ops.get(9999)


# --- replay -------------------------------------------------------------------------------------------------


def test_replay_never_touches_pending_or_inflight(engine: sa.Engine) -> None:
    now = utcnow()
    ops = Operations(engine)
    dead, parked, failed, delivered, inflight, pending = seed(
        engine,
        now,
        [Status.DEAD, Status.PARKED, Status.FAILED, Status.DELIVERED, Status.INFLIGHT, Status.PENDING],
        key="k",
    )
    before = {i: tuple(row(engine, i)) for i in (delivered, inflight, pending)}

    result = ops.replay_ids([dead, parked, failed, delivered, inflight, pending], now=now)

    assert set(result.replayed) == {dead, parked, failed}
    assert dict(result.skipped) == {delivered: "delivered", inflight: "inflight", pending: "pending"}
    for message_id in (dead, parked, failed):
        r = row(engine, message_id)
        assert (r.status, r.attempts, r.due_at, r.lease_token, r.last_error) == (
            "pending",
            0,
            now,
            None,
            None,
        )
    assert {i: tuple(row(engine, i)) for i in before} == before

    again = ops.replay_ids([delivered, inflight], include_delivered=True, now=now)
    assert again.replayed == (delivered,) and dict(again.skipped) == {inflight: "inflight"}
    assert row(engine, delivered).status == "pending" and row(engine, delivered).delivered_at is None
    assert tuple(row(engine, inflight)) == before[inflight]


def test_replay_of_an_unknown_id_changes_nothing(engine: sa.Engine) -> None:
    dead = seed(engine, utcnow(), [Status.DEAD])[0]
    before = table_rows(engine)
    with pytest.raises(outbox.MessageNotFound, match="no message with id"):
        Operations(engine).replay_ids([dead, uuid.uuid4()])
    with pytest.raises(outbox.MessageNotFound, match="no message with seq 9999 in"):
        Operations(engine).replay_ids([dead, 9999])
    assert table_rows(engine) == before
    seq = Operations(engine).get(dead).seq
    assert Operations(engine).replay_ids([seq, dead], dry_run=True).replayed == (dead,)


def test_replay_dry_run_changes_nothing(engine: sa.Engine) -> None:
    now = utcnow()
    ops = Operations(engine)
    dead = seed(engine, now, [Status.DEAD, Status.DEAD, Status.PARKED, Status.FAILED])
    before = table_rows(engine)

    by_filter = ops.replay_matching(MessageFilter(), dry_run=True, batch_size=2)
    by_id = ops.replay_ids(dead, dry_run=True)

    assert set(by_filter.replayed) == set(dead[:3]) and by_filter.dry_run
    assert set(by_id.replayed) == set(dead)
    assert table_rows(engine) == before


def test_replay_by_filter_takes_dead_and_parked_by_default_in_batches(engine: sa.Engine) -> None:
    now = utcnow()
    ops = Operations(engine)
    dead = seed(engine, now, [Status.DEAD] * 9 + [Status.PARKED], topic="a")
    other_topic = seed(engine, now, [Status.DEAD], topic="b")
    untouched = seed(engine, now, [Status.FAILED, Status.DELIVERED, Status.INFLIGHT], topic="a")
    before = [tuple(row(engine, i)) for i in untouched + other_topic]

    result = ops.replay_matching(MessageFilter(topic="a"), batch_size=4, now=now)

    assert list(result.replayed) == dead  # in seq order, across three batches
    assert status_counts(engine)["pending"] == 10
    assert [tuple(row(engine, i)) for i in untouched + other_topic] == before

    failed = ops.replay_matching(MessageFilter(statuses=(Status.FAILED,)), now=now)
    assert failed.replayed == (untouched[0],)
    with pytest.raises(ValueError, match="cannot replay pending"):
        ops.replay_matching(MessageFilter(statuses=(Status.PENDING,)))
    with pytest.raises(ValueError, match="cannot replay delivered"):
        ops.replay_matching(MessageFilter(statuses=(Status.DELIVERED,)))


def test_replayed_message_is_delivered_by_the_relay(engine: sa.Engine) -> None:
    from relay import Relay

    handled: list[uuid.UUID] = []
    ready = threading.Event()
    registry = Registry()

    @registry.handler("orders.created")
    def handle(message: Message) -> None:
        handled.append(message.id)
        ready.set()

    dead = seed(engine, utcnow(), [Status.DEAD], key="k")[0]
    Operations(engine).replay_ids([dead])
    with Relay(engine, registry, poll_interval=0.1):
        wait_until(ready.is_set, timeout=20, what="the replayed message to be handled")
        wait_until(lambda: row(engine, dead).status == "delivered", timeout=20, what="the delivered mark")
    assert handled == [dead]


# --- purge --------------------------------------------------------------------------------------------------


def test_purge_deletes_only_old_delivered(engine: sa.Engine) -> None:
    now = utcnow()
    ops = Operations(engine)
    old_delivered = seed(engine, now, [Status.DELIVERED] * 5)
    for message_id in old_delivered:
        set_row(engine, message_id, delivered_at=now - 2 * DAY)
    recent = seed(engine, now, [Status.DELIVERED])
    # old but unfinished, or dead: never purged as "delivered"
    others = seed(engine, now, [Status.PENDING, Status.INFLIGHT, Status.FAILED, Status.DEAD, Status.PARKED])
    for message_id in others:
        set_row(engine, message_id, created_at=now - 9 * DAY)
    before = table_rows(engine)

    dry = ops.purge(older_than=DAY, dry_run=True, now=now)
    assert (dry.count, dry.dry_run) == (5, True)
    assert table_rows(engine) == before

    result = ops.purge(older_than=DAY, batch_size=2, now=now)
    assert (result.count, result.batches) == (5, 3)
    with engine.connect() as conn:
        left = set(conn.execute(sa.select(T.c.id)).scalars())
    assert left == set(recent + others)
    assert ops.purge(older_than=DAY, now=now).count == 0


def test_purge_dead_takes_parked_too_by_age_since_creation(engine: sa.Engine) -> None:
    now = utcnow()
    ops = Operations(engine)
    old = seed(engine, now, [Status.DEAD, Status.PARKED, Status.DELIVERED, Status.FAILED, Status.PENDING])
    for message_id in old:
        set_row(engine, message_id, created_at=now - 30 * DAY)
    young_dead = seed(engine, now, [Status.DEAD])

    parked_only = ops.purge(older_than=7 * DAY, status=Status.PARKED, dry_run=True, now=now)
    assert parked_only.count == 1
    result = ops.purge(older_than=7 * DAY, status=Status.DEAD, now=now)
    assert result.count == 2 and result.statuses == (Status.DEAD, Status.PARKED)
    with engine.connect() as conn:
        left = set(conn.execute(sa.select(T.c.id)).scalars())
    assert left == set(old[2:] + young_dead)
    for status in (Status.PENDING, Status.INFLIGHT, Status.FAILED):
        with pytest.raises(ValueError, match="cannot purge"):
            ops.purge(older_than=DAY, status=status)


def test_purge_inbox_deletes_only_old_rows_of_every_group(engine: sa.Engine) -> None:
    """``outbox purge --inbox`` (for consumers that run without relays): the rows of every consumer group
    processed before the cutoff, in batches; the younger ones stay; the outbox itself is not touched."""
    now = utcnow()
    inbox = tables_for().inbox
    message = add(engine)

    def processed(group: str, age: dt.timedelta) -> uuid.UUID:
        message_id = uuid.uuid4()
        with engine.begin() as conn:
            conn.execute(
                sa.insert(inbox).values(
                    consumer_group=group, message_id=message_id, topic="t", processed_at=now - age
                )
            )
        return message_id

    old = {(g, processed(g, 40 * DAY)) for g in ("billing", "shipping", "billing")}
    young = {(g, processed(g, age)) for g, age in (("billing", 29 * DAY), ("shipping", HOUR))}

    def left() -> set[tuple[str, uuid.UUID]]:
        with engine.connect() as conn:
            return {(r.consumer_group, r.message_id) for r in conn.execute(sa.select(inbox))}

    ops = Operations(engine)
    dry = ops.purge_inbox(older_than=30 * DAY, dry_run=True, now=now)
    assert (dry.count, dry.dry_run, dry.inbox) == (3, True, True)
    assert left() == old | young
    result = ops.purge_inbox(older_than=30 * DAY, batch_size=2, now=now)
    assert (result.count, result.batches) == (3, 2)
    assert left() == young
    assert status_counts(engine) == {"pending": 1} and row(engine, message).status == "pending"

    url = engine.url.render_as_string(hide_password=False)
    cli = CliRunner()
    shown = cli.invoke(
        outbox_cli, ["purge", "--inbox", "--older-than", "2h", "--dry-run", "--database-url", url]
    )
    assert shown.exit_code == 0 and "would delete 1 inbox row(s) older than 2h" in shown.output, shown.output
    as_json = cli.invoke(
        outbox_cli, ["purge", "--inbox", "--older-than", "2h", "--json", "--database-url", url]
    )
    assert json.loads(as_json.output)["count"] == 1 and json.loads(as_json.output)["inbox"] is True
    assert left() == {g for g in young if g[0] == "shipping"}, "the hour-old row stays"
    both = cli.invoke(
        outbox_cli, ["purge", "--inbox", "--status", "dead", "--older-than", "1d", "--database-url", url]
    )
    assert both.exit_code == 2 and "takes no --status" in both.output


def test_held_keys_are_the_failed_and_parked_heads_with_what_waits_behind(engine: sa.Engine) -> None:
    now = utcnow()
    failed = seed(engine, now, [Status.FAILED, Status.PENDING, Status.PENDING], key="retrying")
    parked = seed(engine, now, [Status.PARKED] + [Status.PENDING] * 5, key="stuck")
    seed(engine, now, [Status.DEAD, Status.PENDING], key="moved-on")  # dead lets its key go on: not held
    seed(engine, now, [Status.FAILED, Status.PARKED])  # no key: nothing is held
    ops = Operations(engine)
    held = ops.held_keys()
    assert [(k.key, k.head.id, k.head.status, k.waiting, k.waiting_capped) for k in held] == [
        ("retrying", failed[0], "failed", 2, False),
        ("stuck", parked[0], "parked", 5, False),
    ]
    assert [(k.key, k.waiting, k.waiting_capped) for k in ops.held_keys(limit=1, waiting_cap=1)] == [
        ("retrying", 1, True)
    ]
    assert held[1].to_dict()["head"]["status"] == "parked"


def test_purge_matching_deletes_only_finished_rows_up_to_the_seq_given(engine: sa.Engine) -> None:
    now = utcnow()
    ids = seed(
        engine, now, [Status.DEAD, Status.PARKED, Status.FAILED, Status.DELIVERED, Status.DEAD], key="k"
    )
    ops = Operations(engine)
    up_to = ops.list_messages(limit=1, order="desc")[0].seq - 1  # the last dead one is written "later"
    bounded = MessageFilter(up_to_seq=up_to)
    assert ops.count(MessageFilter((Status.DEAD,), up_to_seq=up_to)) == 2
    assert ops.purge_matching(bounded, dry_run=True).count == 2
    with pytest.raises(ValueError, match="cannot purge failed messages"):
        ops.purge_matching(MessageFilter((Status.FAILED,)))
    assert ops.purge_matching(bounded).count == 2  # dead and parked, not the later dead one
    assert (
        ops.purge_matching(MessageFilter((Status.DELIVERED, Status.DEAD)), refs=[ids[2], ids[3]]).count == 1
    )
    with engine.connect() as conn:
        left = dict(conn.execute(sa.select(T.c.id, T.c.status)).all())
    assert left == {ids[2]: "failed", ids[4]: "dead"}
    assert ops.count(cap=0) == 1 and ops.count() == 2


def test_a_bounded_status_estimates_delivered_messages_past_its_limit(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """status(exact=False), the dashboard's: past EXACT_DELIVERED delivered messages their count is the
    database's estimate (SQLite: counted), per topic they are left out, due and expired work is capped."""
    from outbox.admin import _operations

    monkeypatch.setattr(_operations, "EXACT_DELIVERED", 5)
    monkeypatch.setattr(_operations, "COUNT_CAP", 3)
    now = utcnow()
    seed(engine, now, [Status.DELIVERED] * 40 + [Status.DEAD, Status.PARKED])
    seed(engine, now - HOUR, [Status.PENDING] * 6 + [Status.FAILED])  # due now, all seven
    with engine.begin() as conn:  # the statistics a live database keeps
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("ANALYZE outbox"))
        elif engine.dialect.name in ("mysql", "mariadb"):
            conn.execute(sa.text("ANALYZE TABLE outbox"))
    ops = Operations(engine)
    exact = ops.status(now=now)
    bounded = ops.status(now=now, exact=False)
    assert exact.counts["delivered"] == 40 and not exact.estimated and exact.count_cap is None
    assert {s: n for s, n in bounded.counts.items() if s != "delivered"} == {
        s: n for s, n in exact.counts.items() if s != "delivered"
    }
    if engine.dialect.name == "sqlite":
        assert (bounded.estimated, bounded.counts["delivered"]) == (False, 40)
    else:
        assert bounded.estimated and 30 <= bounded.counts["delivered"] <= 50, bounded.counts
        assert "delivered" not in bounded.topics["orders.created"]
    assert exact.due_now == 7 and bounded.due_now == 4 and bounded.count_cap == 3  # 4: more than 3
    assert bounded.oldest_waiting_at == exact.oldest_waiting_at


def test_a_keys_messages_in_every_status_page_by_page(engine: sa.Engine) -> None:
    """Listing one key (on PostgreSQL from two partial indexes, merged) gives every status, in order."""
    now = utcnow()
    statuses = [Status.DELIVERED, Status.DEAD, Status.DELIVERED, Status.PARKED, Status.PENDING, Status.FAILED]
    ids = seed(engine, now, statuses * 2, key="k")
    seed(engine, now, statuses, key="other")
    ops = Operations(engine)
    newest = [r.id for r in ops.list_messages(MessageFilter(key="k"), limit=100)]
    assert newest == ids[::-1]
    pages, after = [], None
    while True:
        page = ops.list_messages(MessageFilter(key="k"), limit=5, after=after, order="asc")
        if not page:
            break
        pages.append([r.id for r in page])
        after = page[-1].seq
    assert [len(p) for p in pages] == [5, 5, 2] and [i for p in pages for i in p] == ids
    dead = ops.list_messages(MessageFilter((Status.DEAD,), key="k"), limit=100)  # dead includes parked
    assert [r.status for r in dead] == ["parked", "dead", "parked", "dead"]
    done = ops.list_messages(MessageFilter((Status.DELIVERED,), key="k"), limit=3)
    assert [r.id for r in done] == [ids[8], ids[6], ids[2]]
