"""A relay claims only the topics it can route (``relay._claim``, invariant 15), as real ``outbox relay``
processes whose ``--app`` register different topics: a message no relay here routes loses no attempt
and waits, a relay that routes it delivers it, and per-key order holds across topics and relays."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import outbox
from outbox._schema import tables_for
from tests.apps import RelayLauncher
from tests.apps.recording import MAIL_TOPIC, ORDERS_TOPIC, first_handling_order, read_record
from tests.conftest import SERVER_BACKENDS, wait_until

ORDERS_APP = "tests.apps.recording:orders_registry"
MAIL_APP = "tests.apps.recording:mail_registry"
NOBODY = "test.nobody.listens"
KEYS = 20
PER_KEY = 30
OPTIONS = {"batch_size": 50, "poll_interval": 0.05, "stop_timeout": 10}

t = tables_for().messages


def commit_mixed(
    engine: sa.Engine, seed: int
) -> tuple[dict[str, tuple[str | None, int, str]], dict[str, int]]:
    """``KEYS`` keys of ``PER_KEY`` messages each, every message's topic drawn at random (orders or mail),
    plus 100 unkeyed messages of each topic and 5 of a topic nobody routes. Returns ``{id: (key, index,
    topic)}`` (index: the position within its key) and how many messages each key has."""
    rng = random.Random(seed)
    plan: list[tuple[str | None, int, str]] = [
        (f"key-{k}", i, rng.choice((ORDERS_TOPIC, MAIL_TOPIC))) for i in range(PER_KEY) for k in range(KEYS)
    ]
    plan += [(None, 1000 + n, ORDERS_TOPIC if n % 2 else MAIL_TOPIC) for n in range(200)]
    plan += [(None, 2000 + n, NOBODY) for n in range(5)]
    rng.shuffle(plan)  # unkeyed messages among keyed ones; a key's own messages keep their order below
    plan.sort(key=lambda item: item[1] if item[0] else rng.random() * PER_KEY)
    committed: dict[str, tuple[str | None, int, str]] = {}
    with engine.begin() as conn:
        for key, index, topic in plan:
            committed[str(outbox.add(conn, topic, {"i": index}, key=key))] = (key, index, topic)
    return committed, {f"key-{k}": PER_KEY for k in range(KEYS)}


def rows_by_topic(engine: sa.Engine) -> dict[str, list[Any]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.topic, t.c.attempts, t.c.status, t.c.last_error, t.c.due_at)).all()
    found: dict[str, list[Any]] = {}
    for row in rows:
        found.setdefault(row.topic, []).append(row)
    return found


def test_a_relay_leaves_the_topics_it_does_not_route_untouched(
    engine: sa.Engine, relays: RelayLauncher, record: Path
) -> None:
    """A relay whose --app routes only the orders topic (a rolling deploy's old relay, say) delivers the
    orders messages up to each key's first mail message, and leaves every mail message and the
    messages nobody routes pending, attempts 0, no error: it neither spends nor delays them."""
    committed, _ = commit_mixed(engine, seed=7)
    relays.app = ORDERS_APP
    relay = relays.start(**OPTIONS)
    # what it can deliver: each key's orders messages before the key's first mail message, and unkeyed
    first_mail: dict[str, int] = {}
    for key, index, topic in committed.values():
        if key is not None and topic == MAIL_TOPIC:
            first_mail[key] = min(index, first_mail.get(key, PER_KEY))
    deliverable = {
        mid
        for mid, (key, index, topic) in committed.items()
        if topic == ORDERS_TOPIC and (key is None or index < first_mail.get(key, PER_KEY))
    }

    def delivered() -> int:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).where(t.c.status == "delivered")).scalar_one())

    wait_until(lambda: delivered() == len(deliverable), timeout=60, what="the routable messages delivered")
    time.sleep(1.0)  # twenty poll intervals more: nothing else may move
    relay.send(signal.SIGTERM)
    assert relay.wait_exit(timeout=15) == 0, relay.log_tail()

    done = {h.message_id for h in read_record(record) if h.event == "done"}
    assert done == deliverable
    found = rows_by_topic(engine)
    for topic in (MAIL_TOPIC, NOBODY):
        assert {(r.status, r.attempts, r.last_error) for r in found[topic]} == {("pending", 0, None)}, topic
    assert {r.attempts for r in found[ORDERS_TOPIC] if r.status == "delivered"} == {1}
    assert {r.status for r in found[ORDERS_TOPIC]} <= {"delivered", "pending"}
    with engine.connect() as conn:  # the unkeyed messages nobody routes are still due: any relay may come
        due = conn.execute(sa.select(t.c.due_at).where(t.c.topic == NOBODY)).scalars().all()
    assert None not in due


@pytest.mark.parametrize("backend", SERVER_BACKENDS)  # SQLite: one relay at a time (the test above)
def test_two_relays_with_different_apps_deliver_every_topic_in_key_order(
    engine: sa.Engine, relays: RelayLauncher, record: Path
) -> None:
    """Two relays side by side, one routing orders and one mail, on keys that mix both topics: every
    message is delivered once, by the relay that routes it, with one attempt; each key's messages are
    handled in the order they were written, across the two topics and relays; the topic nobody routes
    waits, attempts 0."""
    committed, per_key = commit_mixed(engine, seed=11)
    relays.env["OUTBOX_TEST_SLEEP"] = "0.001"
    relays.app = ORDERS_APP
    orders = relays.start(**OPTIONS)
    relays.app = MAIL_APP
    mail = relays.start(**OPTIONS)
    routable = {mid for mid, (_, _, topic) in committed.items() if topic != NOBODY}

    def delivered() -> int:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).where(t.c.status == "delivered")).scalar_one())

    wait_until(lambda: delivered() == len(routable), timeout=90, what="every routable message delivered")
    for relay in (orders, mail):
        relay.send(signal.SIGTERM)
        assert relay.wait_exit(timeout=15) == 0, relay.log_tail()

    done = [h for h in read_record(record) if h.event == "done"]
    assert {h.message_id for h in done} == routable
    by_pid = {orders.pid: ORDERS_TOPIC, mail.pid: MAIL_TOPIC}
    for h in done:  # each message went to the relay that routes its topic
        assert by_pid[h.pid] == committed[h.message_id][2]
    starts = [h for h in read_record(record) if h.event == "start"]
    order = first_handling_order((h.key, h.index, h.message_id) for h in starts)
    for key, indexes in order.items():
        assert indexes == list(range(per_key[key])), f"{key} handled out of order: {indexes}"
    found = rows_by_topic(engine)
    assert {(r.status, r.attempts) for topic in (ORDERS_TOPIC, MAIL_TOPIC) for r in found[topic]} == {
        ("delivered", 1)
    }, "an attempt was spent on a message its relay could not route"
    assert {(r.status, r.attempts, r.last_error) for r in found[NOBODY]} == {("pending", 0, None)}
