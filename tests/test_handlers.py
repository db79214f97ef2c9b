"""In-process delivery: retries, poison messages, ordering per key, session handlers, timeouts."""

from __future__ import annotations

import datetime as dt
import gc
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import orm

import outbox
from consumers import Registry
from outbox._clock import utcnow
from outbox._errors import ConfigError
from outbox._message import Message
from relay import Relay
from relay._claim import ClaimedRow
from relay.observers import RelayObserver
from tests.conftest import status_counts, wait_until

FAST = {"backoff_initial": 0.05, "backoff_max": 0.1}


def row(engine: sa.Engine, message_id: object) -> sa.Row:  # type: ignore[type-arg]
    t = outbox.tables_for().messages
    with engine.connect() as conn:
        return conn.execute(sa.select(t).where(t.c.id == message_id)).one()


def test_order_per_key_with_failures(engine: sa.Engine, registry: Registry, relay: Relay) -> None:
    """Messages of one key are handled one at a time, in order, even when some fail and retry."""
    seen: dict[str, list[int]] = defaultdict(list)
    failed_once: set[int] = set()
    lock = threading.Lock()

    @registry.handler("step", **FAST)
    def step(message: Message) -> None:
        index = message.payload["i"]
        with lock:
            if index % 7 == 0 and index not in failed_once:
                failed_once.add(index)
                raise RuntimeError("try again")
            assert message.key is not None
            seen[message.key].append(index)

    with engine.begin() as conn:
        for i in range(600):
            outbox.add(conn, "step", {"i": i}, key=f"k{i % 12}")
    relay.start()
    wait_until(lambda: status_counts(engine).get("delivered") == 600, timeout=60)
    assert len(seen) == 12
    for key, indexes in seen.items():
        assert indexes == sorted(indexes), key
        assert len(indexes) == 50


def test_poison_message_holds_only_its_key(engine: sa.Engine, registry: Registry, relay: Relay) -> None:
    """A failing message blocks later messages of its key only; it goes dead, then its key goes on."""
    handled: list[str] = []

    @registry.handler("pay", max_attempts=3, **FAST)
    def pay(message: Message) -> None:
        if message.payload["poison"]:
            raise ValueError("card number is not a number")
        handled.append(message.payload["name"])

    with engine.begin() as conn:
        poison = outbox.add(conn, "pay", {"poison": True, "name": "bad"}, key="alice")
        outbox.add(conn, "pay", {"poison": False, "name": "alice-2"}, key="alice")
        for n in range(20):
            outbox.add(conn, "pay", {"poison": False, "name": f"bob-{n}"}, key="bob")
    relay.start()
    wait_until(lambda: status_counts(engine).get("delivered") == 21, timeout=30)
    assert handled.index("alice-2") > 0  # only after the poison message went dead
    dead = row(engine, poison)
    assert dead.status == "dead" and dead.attempts == 3 and dead.due_at is None
    assert dead.last_error == "ValueError: card number is not a number"
    assert [h for h in handled if h.startswith("bob")] == [f"bob-{n}" for n in range(20)]


def test_strict_order_topic_parks_the_key(engine: sa.Engine, registry: Registry, relay: Relay) -> None:
    handled: list[int] = []

    @registry.handler("ledger", max_attempts=2, strict_order=True, **FAST)
    def ledger(message: Message) -> None:
        if message.payload["i"] == 0:
            raise ValueError("unbalanced")
        handled.append(message.payload["i"])

    with engine.begin() as conn:
        first = outbox.add(conn, "ledger", {"i": 0}, key="acct-1")
        outbox.add(conn, "ledger", {"i": 1}, key="acct-1")
        outbox.add(conn, "ledger", {"i": 2}, key="acct-2")
    relay.start()
    wait_until(lambda: row(engine, first).status == "parked", timeout=20)
    wait_until(lambda: handled == [2], timeout=20)
    time.sleep(0.3)  # a few poll cycles: acct-1's second message must still be waiting
    assert handled == [2]
    assert status_counts(engine) == {"parked": 1, "pending": 1, "delivered": 1}


def test_a_relay_with_nowhere_to_deliver_refuses_to_start(engine: sa.Engine) -> None:
    """No handler, no Kafka, no publisher of one's own: the relay would claim nothing (relay._claim,
    invariant 15), so it says so instead of running idle."""
    relay = Relay(engine, Registry(), poll_interval=0.05)
    with pytest.raises(ConfigError, match="nowhere to deliver: its registry has no handler"):
        relay.start()


def test_a_topic_without_a_handler_waits_without_losing_attempts(engine: sa.Engine) -> None:
    """A relay leaves the topics it has no handler for alone: the message stays pending, attempts 0,
    no error, while the relay delivers its own topics; a relay that routes it later delivers it."""
    registry = Registry()
    registry.add("orders.placed", lambda message: None)
    with engine.begin() as conn:
        lost = outbox.add(conn, "nobody.listens", {})
        mine = outbox.add(conn, "orders.placed", {})
    with Relay(engine, registry, poll_interval=0.05):
        wait_until(lambda: row(engine, mine).status == "delivered", timeout=20)
        time.sleep(0.3)  # a few poll cycles
    waiting = row(engine, lost)
    assert (waiting.status, waiting.attempts, waiting.last_error) == ("pending", 0, None)
    registry.add("nobody.listens", lambda message: None)  # the handler arrives (a new deploy)
    with Relay(engine, registry, poll_interval=0.05):
        wait_until(lambda: row(engine, lost).status == "delivered", timeout=20)
    assert row(engine, lost).attempts == 1


class _Picky:
    """A publisher of one's own that lists no topics (so its relay claims every topic) and accepts
    only some: what it refuses reaches the dispatcher with no publisher."""

    decodes_payload = True

    def __init__(self) -> None:
        self.delivered: list[str] = []

    def accepts(self, topic: str) -> bool:
        return topic.startswith("mine.")

    def deliver(self, deliveries: Sequence[Any], done: Any) -> None:
        from relay.publishers import Delivered

        for delivery in deliveries:
            self.delivered.append(delivery.message.topic)
            done(delivery, Delivered())

    def check_timeouts(self, done: Any) -> None:
        pass

    def stop(self, timeout: float, done: Any) -> None:
        pass


def test_a_claimed_message_nobody_here_routes_is_given_back_without_an_attempt(engine: sa.Engine) -> None:
    """Invariant 15's fallback: a row claimed by a relay with no publisher for it (its publisher lists
    no topics) is released, attempt not counted, due again only after UNROUTABLE_PAUSE: never dead."""
    from relay._dispatch import UNROUTABLE_PAUSE

    picky = _Picky()
    with engine.begin() as conn:
        lost = outbox.add(conn, "nobody.listens", {})
        mine = outbox.add(conn, "mine.one", {})
    started = utcnow()
    with Relay(engine, Registry(), publishers=[picky], poll_interval=0.05):
        wait_until(lambda: row(engine, mine).status == "delivered", timeout=20)
        wait_until(lambda: row(engine, lost).last_attempt_at is not None, timeout=20)
        time.sleep(0.3)
    waiting = row(engine, lost)
    assert (waiting.status, waiting.attempts, waiting.last_error) == ("pending", 0, None)
    assert waiting.due_at >= started + dt.timedelta(seconds=UNROUTABLE_PAUSE - 1), "not claimed in a loop"
    assert picky.delivered == ["mine.one"]


class Base(orm.DeclarativeBase):
    pass


class Effect(Base):
    __tablename__ = "effects"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True, autoincrement=True)
    message_id: orm.Mapped[str] = orm.mapped_column(sa.String(36))


def test_session_handler_work_and_mark_commit_together(
    engine: sa.Engine, registry: Registry, relay: Relay
) -> None:
    Base.metadata.create_all(engine)
    attempts: dict[str, int] = defaultdict(int)

    @registry.handler("order.paid", max_attempts=5, **FAST)
    def record(message: Message, session: orm.Session) -> None:
        attempts[str(message.id)] += 1
        session.add(Effect(message_id=str(message.id)))
        outbox.add(session, "receipt.sent", {"for": str(message.id)})  # nested message, same transaction
        if message.payload["flaky"] and attempts[str(message.id)] < 3:
            raise RuntimeError("after the writes: everything above must roll back")

    receipts: list[str] = []
    registry.add("receipt.sent", lambda m: receipts.append(m.payload["for"]))

    with engine.begin() as conn:
        steady = outbox.add(conn, "order.paid", {"flaky": False})
        flaky = outbox.add(conn, "order.paid", {"flaky": True})
    relay.start()
    wait_until(lambda: status_counts(engine).get("delivered") == 4, timeout=30)
    with engine.connect() as conn:
        effects = list(conn.execute(sa.select(Effect.message_id).order_by(Effect.id)).scalars())
    assert sorted(effects) == sorted(
        [str(steady), str(flaky)]
    )  # one effect each, failed attempts rolled back
    assert sorted(receipts) == sorted([str(steady), str(flaky)])
    assert attempts[str(flaky)] == 3 and row(engine, flaky).attempts == 3
    assert row(engine, flaky).last_error is not None  # the history of the failed attempts stays visible


def test_handler_timeout_counts_as_failed_attempt(
    engine: sa.Engine, registry: Registry, relay: Relay
) -> None:
    release = threading.Event()

    @registry.handler("slow", max_attempts=1, timeout=0.2)
    def slow(message: Message) -> None:
        release.wait(5)

    with engine.begin() as conn:
        stuck = outbox.add(conn, "slow", {})
    relay.start()
    wait_until(lambda: row(engine, stuck).status == "dead", timeout=10)
    release.set()
    assert "HandlerTimeout" in (row(engine, stuck).last_error or "")


def test_delayed_message_waits(engine: sa.Engine, registry: Registry, relay: Relay) -> None:
    """The handler starts no sooner than ``delay`` after the message was built (its ``created_at``).

    Both sides are read on the wall clock the relay claims by, so a slow commit of the writer (which
    delays the test's own start, not the message's due time) cannot make the check pass or fail.
    """
    seen: list[tuple[dt.datetime, dt.datetime]] = []
    registry.add("later", lambda m: seen.append((utcnow(), m.created_at)))
    with engine.begin() as conn:
        outbox.add(conn, "later", {}, delay=0.8)
    relay.start()
    wait_until(lambda: seen, timeout=10)
    started, created = seen[0]
    assert started - created >= dt.timedelta(seconds=0.8)


def test_commit_in_same_process_wakes_the_relay(engine: sa.Engine, registry: Registry) -> None:
    """With a long poll interval, delivery still follows the commit at once (in-process wake-up)."""
    done = threading.Event()
    registry.add("ping", lambda m: done.set())
    with Relay(engine, registry, poll_interval=30):
        time.sleep(0.2)  # the relay is now asleep for up to 30 s
        with orm.Session(engine) as session, session.begin():
            outbox.add(session, "ping", {})
        assert done.wait(5), "the commit did not wake the relay"


def test_next_message_of_a_key_follows_at_once(engine: sa.Engine, registry: Registry) -> None:
    """A key's next message is claimed as soon as the previous one is marked, not at the next poll."""
    handled: list[int] = []
    registry.add("chain", lambda m: handled.append(m.payload["i"]))
    with engine.begin() as conn:
        for i in range(20):
            outbox.add(conn, "chain", {"i": i}, key="one-key")
    with Relay(engine, registry, poll_interval=30):
        wait_until(lambda: len(handled) == 20, timeout=10, what="20 messages of one key within 10 s")
    assert handled == list(range(20))


def test_commit_on_a_core_connection_wakes_the_relay(engine: sa.Engine, registry: Registry) -> None:
    done = threading.Event()
    registry.add("ping", lambda m: done.set())
    with Relay(engine, registry, poll_interval=30):
        time.sleep(0.2)
        with engine.begin() as conn:
            outbox.add(conn, "ping", {})
        assert done.wait(5), "the commit did not wake the relay"


def test_freeze_gc_moves_start_up_objects_out_of_the_collectors_way(
    engine: sa.Engine, registry: Registry
) -> None:
    """``freeze_gc`` freezes at start (``outbox relay``'s setting); by default the relay leaves gc alone."""
    done = threading.Event()
    registry.add("ping", lambda m: done.set())
    gc.unfreeze()
    try:
        with Relay(engine, registry):
            assert gc.get_freeze_count() == 0
        with Relay(engine, registry, freeze_gc=True):
            assert gc.get_freeze_count() > 10_000  # this process's modules, SQLAlchemy's, pytest's
            with engine.begin() as conn:
                outbox.add(conn, "ping", {})
            assert done.wait(10), "a relay with a frozen heap did not deliver"
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual


class ClaimLog(RelayObserver):
    """The size of each claim that found any rows."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_claimed(self, rows: Sequence[ClaimedRow], seconds: float) -> None:
        if rows:
            self.sizes.append(len(rows))


def test_claims_grow_only_while_the_handlers_keep_up(engine: sa.Engine, registry: Registry) -> None:
    """Invariants of "Claim size" (relay._runner): a backlog that fast handlers keep up with is claimed in
    claims that double up to max_batch_size, and the size is back at batch_size when the backlog ends;
    slow handlers keep the claims at batch_size and what the relay holds within twice that."""
    registry.add("fast", lambda m: None)
    with engine.begin() as conn:
        for i in range(6000):
            outbox.add(conn, "fast", {"i": i})
    claims = ClaimLog()
    relay = Relay(engine, registry, batch_size=50, max_batch_size=800, observers=[claims], poll_interval=0.05)
    with relay:
        wait_until(lambda: status_counts(engine) == {"delivered": 6000}, what="the fast backlog delivered")
        wait_until(lambda: relay.claim_size == 50, timeout=5, what="the claim size back at batch_size")
    print("fast claims:", claims.sizes)
    assert claims.sizes[0] == 50 and max(claims.sizes) == 800, claims.sizes

    running: list[int] = []
    held: list[int] = []

    def slow(message: Message) -> None:
        held.append(slow_relay.in_flight())
        time.sleep(0.05)
        running.append(1)

    registry.add("slow", slow)
    with engine.begin() as conn:
        for i in range(300):
            outbox.add(conn, "slow", {"i": i})
    claims = ClaimLog()
    slow_relay = Relay(engine, registry, batch_size=20, max_batch_size=800, workers=2, observers=[claims])
    with slow_relay:
        wait_until(lambda: len(running) >= 60, what="60 slow messages handled")
        assert slow_relay.claim_size == 20
    print("slow claims:", claims.sizes)
    assert claims.sizes and max(claims.sizes) <= 20, claims.sizes
    assert max(held) <= 40, f"a relay with slow handlers held {max(held)} messages"


def test_max_batch_size_below_batch_size_is_refused(engine: sa.Engine, registry: Registry) -> None:
    with pytest.raises(ConfigError, match=r"max_batch_size \(100\) must be at least batch_size \(200\)"):
        Relay(engine, registry, batch_size=200, max_batch_size=100)
    fixed = Relay(engine, registry, batch_size=300, max_batch_size=300)
    assert (fixed.claim_size, fixed.max_batch_size, fixed.max_in_flight) == (300, 300, 600)


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize(
    "setting",
    [
        {"lease_seconds": float("inf")},
        {"lease_seconds": 1e12},
        {"poll_interval": float("nan")},
        {"stop_timeout": float("inf")},
        {"handler_timeout": float("inf")},
        {"maintenance_interval": float("inf")},
    ],
    ids=lambda setting: ",".join(f"{k}={v}" for k, v in setting.items()),
)
def test_a_relay_refuses_seconds_that_are_not_finite(
    engine: sa.Engine, registry: Registry, setting: dict[str, float]
) -> None:
    """An infinite lease passed the check, then adding it to a time killed the fetcher thread."""
    with pytest.raises(ConfigError, match="finite"):
        Relay(engine, registry, **setting)  # type: ignore[arg-type]
    for backoff in ({"backoff_max": float("inf")}, {"backoff_initial": float("nan")}, {"jitter": 1e300}):
        with pytest.raises(ConfigError, match="finite"):
            outbox.RetryPolicy(**backoff)


def test_a_payload_over_the_relays_maximum_goes_dead_without_reaching_a_handler(
    engine: sa.Engine, registry: Registry
) -> None:
    """A row written by a writer allowed more than the relay is never decoded nor handed out: it fails
    permanently, saying why, and the rest is delivered."""
    handled: list[object] = []
    registry.add("sized", lambda message: handled.append(message.id))
    generous = outbox.Outbox(max_payload_bytes=10_000)
    with engine.begin() as conn:
        big = generous.add(conn, "sized", b"x" * 2_000, key="k")
        small = outbox.add(conn, "sized", {"ok": True}, key="k")  # its key goes on once the big one is dead
    with Relay(engine, registry, poll_interval=0.05, max_payload_bytes=1_000):
        wait_until(
            lambda: status_counts(engine) == {"dead": 1, "delivered": 1}, what="one dead, one delivered"
        )
    assert handled == [small]
    dead = row(engine, big)
    assert (dead.status, dead.last_error) == ("dead", "payload of 2000 bytes exceeds max_payload_bytes 1000")
    with pytest.raises(ConfigError, match="max_payload_bytes must be a whole number of bytes"):
        Relay(engine, registry, max_payload_bytes=0)


def write_from_another_process(db_url: str, code: str) -> None:
    """Run ``code`` in a new Python process, with ``outbox`` imported and ``engine`` on ``db_url``."""
    import subprocess
    import sys

    script = f"import sys, outbox\nengine = outbox.create_engine(sys.argv[1])\n{code}"
    subprocess.run([sys.executable, "-c", script, db_url], check=True, timeout=30)


@pytest.mark.parametrize("backend", ["postgresql"])
def test_commit_in_another_process_wakes_the_relay_via_notify(
    engine: sa.Engine, registry: Registry, db_url: str
) -> None:
    done = threading.Event()
    registry.add("ping", lambda m: done.set())
    with Relay(engine, registry, poll_interval=30):
        time.sleep(0.3)  # listening, and asleep for up to 30 s
        write_from_another_process(db_url, "with engine.begin() as conn:\n    outbox.add(conn, 'ping', {})\n")
        assert done.wait(5), "NOTIFY did not wake the relay"


@pytest.mark.parametrize("backend", ["postgresql"])
def test_burst_from_another_process_is_delivered_without_waiting_for_a_poll(
    engine: sa.Engine, registry: Registry, db_url: str
) -> None:
    """The writer merges the NOTIFYs of a burst (one per NOTIFY_GAP); the relay still finds every message."""
    handled: list[int] = []
    registry.add("burst", lambda m: handled.append(m.payload["i"]))
    burst = "for i in range(200):\n    with engine.begin() as c:\n        outbox.add(c, 'burst', {'i': i})\n"
    with Relay(engine, registry, poll_interval=30):
        time.sleep(0.3)  # listening, and asleep for up to 30 s
        write_from_another_process(db_url, burst)
        wait_until(lambda: len(handled) == 200, timeout=10, what="200 messages within 10 s")
    assert sorted(handled) == list(range(200))


def test_message_that_keeps_killing_relays_goes_dead(engine: sa.Engine, registry: Registry) -> None:
    """Attempts are counted at claim; past max_attempts + CRASH_ALLOWANCE without outcomes it is dead."""
    from relay._dispatch import CRASH_ALLOWANCE

    calls: list[int] = []
    registry.add("crashy", lambda m: calls.append(m.attempt))
    with engine.begin() as conn:
        survivor = outbox.add(conn, "crashy", {}, key="a")
        killer = outbox.add(conn, "crashy", {}, key="b")
        t = outbox.tables_for().messages
        # as if relays had been killed while handling them: attempts started, no outcome recorded
        conn.execute(sa.update(t).where(t.c.id == survivor).values(attempts=10 + CRASH_ALLOWANCE - 1))
        conn.execute(sa.update(t).where(t.c.id == killer).values(attempts=10 + CRASH_ALLOWANCE))
    with Relay(engine, registry, poll_interval=0.05, retry=outbox.RetryPolicy(max_attempts=10)):
        wait_until(lambda: status_counts(engine) == {"delivered": 1, "dead": 1}, timeout=10)
    assert calls == [10 + CRASH_ALLOWANCE]
    assert "without any outcome" in (row(engine, killer).last_error or "")
