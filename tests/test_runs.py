"""Key runs: a key's consecutive messages claimed together and delivered in order (relay/_claim.py, runs;
relay/_dispatch.py), and the queued rows of busy or held keys (outbox/_key_queue.py)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

import pytest
import sqlalchemy as sa

import outbox
from consumers import Registry
from outbox._message import Message
from outbox._policy import TopicPolicy
from outbox._schema import Status
from outbox.admin._operations import Operations
from relay import Relay
from relay._claim import ClaimedRow
from relay._dispatch import Dispatcher
from relay.maintenance import Maintenance
from relay.publishers import Delivered, Delivery, Failed, Outcome, Released
from relay.publishers._handlers import HandlerPublisher
from tests.conftest import SERVER_BACKENDS, status_counts, wait_until

FAST = {"backoff_initial": 0.05, "backoff_max": 0.1}


def attempts_by_index(engine: sa.Engine) -> dict[int, int]:
    t = outbox.tables_for().messages
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.payload, t.c.attempts)).all()
    import json

    return {json.loads(payload)["i"]: attempts for payload, attempts in rows}


def test_hot_key_many_keys_and_unkeyed_each_delivered_once_in_order(
    engine: sa.Engine, registry: Registry, relay: Relay
) -> None:
    """Order per key holds with runs: every message once, each key's messages in seq order."""
    seen: dict[str | None, list[int]] = defaultdict(list)
    lock = threading.Lock()

    @registry.handler("step")
    def step(message: Message) -> None:
        with lock:
            seen[message.key].append(message.payload["i"])

    with engine.begin() as conn:
        for i in range(2400):
            key = "hot" if i % 2 == 0 else (None if i % 5 == 0 else f"k{i % 30}")
            outbox.add(conn, "step", {"i": i}, key=key)
    relay.start()
    wait_until(lambda: status_counts(engine).get("delivered") == 2400, timeout=90)
    assert sum(len(v) for v in seen.values()) == 2400
    for key, indexes in seen.items():
        if key is not None:
            assert indexes == sorted(indexes), key
    assert len(seen["hot"]) == 1200


def test_failure_inside_a_run_releases_the_rest_without_an_attempt(
    engine: sa.Engine, registry: Registry, relay: Relay
) -> None:
    """The failed message is retried first; the messages after it were given back, never attempted."""
    firsts: list[int] = []
    failed = threading.Event()

    @registry.handler("step", **FAST)
    def step(message: Message) -> None:
        index = message.payload["i"]
        if index == 10 and not failed.is_set():
            failed.set()
            raise RuntimeError("once")
        if message.attempt == 1 or index == 10:
            firsts.append(index)

    with engine.begin() as conn:
        for i in range(40):
            outbox.add(conn, "step", {"i": i}, key="k")
    relay.start()
    wait_until(lambda: status_counts(engine).get("delivered") == 40, timeout=30)
    assert firsts == list(range(40))
    attempts = attempts_by_index(engine)
    assert attempts[10] == 2
    assert all(attempts[i] == 1 for i in range(40) if i != 10)


def test_unkeyed_messages_flow_while_a_hot_key_drains(
    engine: sa.Engine, registry: Registry, relay: Relay
) -> None:
    """A hot key holds one worker at a time: messages of other keys and without a key go past it."""
    hot_done = 0

    @registry.handler("hot")
    def hot(message: Message) -> None:
        nonlocal hot_done
        time.sleep(0.002)
        hot_done += 1

    @registry.handler("cold")
    def cold(message: Message) -> None:
        pass

    with engine.begin() as conn:
        for i in range(1500):
            outbox.add(conn, "hot", {"i": i}, key="hot")
    relay.start()
    wait_until(lambda: hot_done > 0, timeout=30)
    with engine.begin() as conn:
        for i in range(100):
            outbox.add(conn, "cold", {"i": i}, key=None if i % 2 else f"c{i}")
    t = outbox.tables_for().messages

    def cold_delivered() -> bool:
        with engine.connect() as conn:
            n = conn.execute(
                sa.select(sa.func.count()).where(t.c.topic == "cold", t.c.status == Status.DELIVERED.value)
            ).scalar()
        return n == 100

    wait_until(cold_delivered, timeout=30)
    assert hot_done < 1500  # the cold messages did not wait for the hot key's backlog


def test_purging_a_parked_message_lets_its_queued_key_go_on(
    engine: sa.Engine, registry: Registry, relay: Relay
) -> None:
    handled: list[int] = []

    @registry.handler("ledger", max_attempts=1, strict_order=True)
    def ledger(message: Message) -> None:
        if message.payload["i"] == 0:
            raise ValueError("unbalanced")
        handled.append(message.payload["i"])

    with engine.begin() as conn:
        for i in range(6):
            outbox.add(conn, "ledger", {"i": i}, key="acct")
    relay.start()
    wait_until(lambda: status_counts(engine).get("parked") == 1, timeout=20)
    t = outbox.tables_for().messages

    def queued() -> int:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).where(t.c.status == "pending", t.c.due_at.is_(None))
                ).scalar()
                or 0
            )

    wait_until(lambda: queued() == 5, timeout=20)  # out of the claim's scan while the key is parked
    assert handled == []
    Operations(engine).purge(older_than=dt.timedelta(0), status=Status.PARKED)
    wait_until(lambda: handled == [1, 2, 3, 4, 5], timeout=20)


def test_maintenance_sweep_promotes_a_key_whose_promotion_was_lost(engine: sa.Engine) -> None:
    """The safety net: queued rows whose key nothing holds (a crash came between the mark and the
    promotion) come back within one maintenance interval."""
    with engine.begin() as conn:
        for i in range(3):
            outbox.add(conn, "t", {"i": i}, key="k")
    t = outbox.tables_for().messages
    with engine.begin() as conn:
        conn.execute(sa.update(t).values(due_at=None))  # queued, as if the promotion never ran
    maintenance = Maintenance(engine, outbox.tables_for(), holder="test")
    assert maintenance.sweep_queued_keys() == 3
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).where(t.c.due_at.is_(None))).scalar() == 0


# --- groups: a run handed to a publisher that keeps a key's order in flight (Kafka), without a database ---


class GroupPublisher:
    """Records each group it is handed; the test answers for the broker."""

    decodes_payload = False
    keeps_order_in_flight = True

    def __init__(self) -> None:
        self.groups: list[tuple[list[Delivery], Callable[[Delivery, Outcome], None]]] = []

    def accepts(self, topic: str) -> bool:
        return True

    def deliver(self, deliveries: list[Delivery], done: Callable[[Delivery, Outcome], None]) -> None:
        self.groups.append((list(deliveries), done))

    def seqs(self) -> list[list[int]]:
        return [[d.seq for d in group] for group, _ in self.groups]

    def answer(self, outcomes: dict[int, Outcome]) -> None:
        """Answer the latest group, in the order of ``outcomes`` (a broker's answers may come in any)."""
        group, done = self.groups[-1]
        by_seq = {d.seq: d for d in group}
        for seq, outcome in outcomes.items():
            done(by_seq[seq], outcome)


class OneAtATimePublisher(GroupPublisher):
    keeps_order_in_flight = False  # as the in-process handlers: no attribute at all


def run_rows(topics: str, *, big: tuple[int, ...] = ()) -> list[ClaimedRow]:
    """One key's run, seq 1, 2, ...: one row per letter of ``topics`` (its topic); ``big`` seqs are
    larger than the dispatcher below allows."""
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    return [
        ClaimedRow(
            seq=seq,
            id=seq,
            topic=topic,
            key="k",
            payload=b"x" * 200 if seq in big else b"{}",
            content_type="application/json",
            headers=None,
            attempts=1,
            created_at=now,
            token="t",
        )
        for seq, topic in enumerate(topics, start=1)
    ]


def dispatcher_with(publisher: GroupPublisher) -> tuple[Dispatcher, list[tuple[int, Outcome, bool]]]:
    reports: list[tuple[int, Outcome, bool]] = []
    dispatcher = Dispatcher(
        Registry(),
        [publisher],
        default_policy=TopicPolicy(),
        report=lambda d, o: reports.append((d.seq, o, d.run_end)),
        max_payload_bytes=100,
    )
    return dispatcher, reports


def test_a_run_goes_to_a_publisher_that_keeps_order_in_flight_a_topic_at_a_time() -> None:
    publisher = GroupPublisher()
    dispatcher, reports = dispatcher_with(publisher)
    dispatcher.dispatch(run_rows("AAABBA"))
    assert publisher.seqs() == [[1, 2, 3]]
    publisher.answer({3: Delivered(), 1: Delivered()})
    assert reports == [], "a group's outcomes are reported together"
    publisher.answer({2: Delivered()})
    assert [seq for seq, _, _ in reports] == [1, 2, 3], "in seq order"
    assert publisher.seqs() == [[1, 2, 3], [4, 5]], "the next group only once the one before was delivered"
    publisher.answer({5: Delivered(), 4: Delivered()})
    publisher.answer({6: Delivered()})
    assert [(seq, run_end) for seq, _, run_end in reports] == [(s, s == 6) for s in range(1, 7)]
    assert all(isinstance(outcome, Delivered) for _, outcome, _ in reports)


def test_a_failure_inside_a_group_keeps_the_delivered_prefix_and_releases_the_rest() -> None:
    publisher = GroupPublisher()
    dispatcher, reports = dispatcher_with(publisher)
    dispatcher.dispatch(run_rows("AAAAABB"))
    failed = Failed("broker said no")
    publisher.answer({4: Delivered(), 3: failed, 1: Delivered(), 5: Failed("too", True), 2: Delivered()})
    assert [(seq, outcome) for seq, outcome, _ in reports] == [
        (1, Delivered()),
        (2, Delivered()),
        (3, failed),
        # delivered or not, what follows a message that did not go through is given back, in order
        (4, Released("an earlier message of its key did not finish")),
        (5, Released("an earlier message of its key did not finish")),
        (6, Released("an earlier message of its key did not finish")),
        (7, Released("an earlier message of its key did not finish")),
    ]
    assert publisher.seqs() == [[1, 2, 3, 4, 5]], "nothing after the failure was handed out"


def test_a_message_refused_inside_a_group_waits_for_the_messages_before_it() -> None:
    publisher = GroupPublisher()
    dispatcher, reports = dispatcher_with(publisher)
    dispatcher.dispatch(run_rows("AAAAA", big=(3,)))
    assert publisher.seqs() == [[1, 2]], "the group ends before the message that cannot be handed out"
    assert reports == []
    publisher.answer({1: Delivered(), 2: Delivered()})
    assert [seq for seq, _, _ in reports] == [1, 2, 3, 4, 5]
    assert isinstance(reports[2][1], Failed) and reports[2][1].permanent, (
        "refused once 1 and 2 were delivered"
    )
    assert all(isinstance(outcome, Released) for _, outcome, _ in reports[3:])


def test_a_publisher_without_order_in_flight_gets_a_run_one_message_at_a_time() -> None:
    publisher = OneAtATimePublisher()
    dispatcher, reports = dispatcher_with(publisher)
    dispatcher.dispatch(run_rows("AAA"))
    for seq in (1, 2, 3):
        assert publisher.seqs()[-1] == [seq]
        publisher.answer({seq: Delivered()})
    assert publisher.seqs() == [[1], [2], [3]]
    assert [seq for seq, _, _ in reports] == [1, 2, 3]
    assert HandlerPublisher.__dict__.get("keeps_order_in_flight") is None, "handlers take one at a time"


# --- chained runs (relay/_claim.py, invariant 12): a key's next run handed out behind the one before ---


def chain_rows(first: int, count: int, *, after: int = 0, token: str = "t") -> list[ClaimedRow]:
    rows = run_rows("A" * (first + count - 1))[first - 1 :]
    for row in rows:
        row.token = token
    rows[0].after = after
    return rows


def test_a_chained_run_goes_out_after_the_run_it_follows_and_the_next_is_pulled_once_it_starts() -> None:
    """A key has at most two runs in a relay: a deep lane is a pull candidate (Dispatcher.pulls) until
    a run is chained behind it, and again once that chained run has started, when the fetcher is woken."""
    publisher = OneAtATimePublisher()
    dispatcher, _ = dispatcher_with(publisher)
    reported: list[Delivery] = []
    dispatcher.report = lambda d, o: reported.append(d)
    wakes: list[int] = []
    dispatcher.wake = lambda: wakes.append(len(reported))
    head = chain_rows(1, 3)
    dispatcher.register(head, {"k"})
    dispatcher.dispatch(head)
    assert dispatcher.chainable("k", 3) and not dispatcher.chainable("k", 2)
    assert dispatcher.pulls() == [("k", 3, False)]
    chained = chain_rows(4, 3, after=3, token="u")
    dispatcher.register(chained, {"k"})
    assert dispatcher.chainable("k", 6) and not dispatcher.chainable("k", 3)
    assert dispatcher.pulls() == [], "two runs of the key in the relay: the next waits"
    dispatcher.dispatch(chained)
    assert publisher.seqs() == [[1]], "the chained run waits for the run before it"
    for seq in range(1, 7):
        assert publisher.seqs()[-1] == [seq]
        publisher.answer({seq: Delivered()})
        if seq == 3:
            assert wakes == [3] and dispatcher.pulls() == [("k", 6, False)], "the chained run has started"
    assert [d.seq for d in reported] == [1, 2, 3, 4, 5, 6]
    assert [d.token for d in reported] == ["t"] * 3 + ["u"] * 3
    # only the lane's last message ends the key's run (its delivery promotes the key's queued rows)
    assert [d.run_end for d in reported] == [False] * 5 + [True]
    assert dispatcher.pulls() == [], "the lane ended"


def test_a_contended_keys_next_runs_pull_queued_rows_until_a_pull_finds_none() -> None:
    """A key whose queued rows a promotion brought back (another relay queued them, out of this relay's
    sight) makes this relay's next runs of it pull candidates, for queued rows only (``guessed``); a
    pull that finds nothing ends that, and other keys are not candidates."""
    dispatcher, _ = dispatcher_with(OneAtATimePublisher())
    first = chain_rows(1, 3)
    dispatcher.register(first)
    assert dispatcher.pulls() == [], "a short run from the scan: nothing says the key has more"
    dispatcher.contended(["k"])  # (the completer's thread)
    later = chain_rows(4, 3)
    dispatcher.register(later)
    assert dispatcher.pulls() == [("k", 6, True)]
    dispatcher.not_deep(["k"])
    assert dispatcher.pulls() == []
    dispatcher.register(chain_rows(7, 3))
    assert dispatcher.pulls() == [], "no longer contended"


def test_a_chained_run_behind_a_failure_is_released_without_being_handed_out() -> None:
    publisher = OneAtATimePublisher()
    dispatcher, reports = dispatcher_with(publisher)
    head, chained = chain_rows(1, 3), chain_rows(4, 2, after=3, token="u")
    for rows in (head, chained):
        dispatcher.register(rows)
        dispatcher.dispatch(rows)
    publisher.answer({1: Delivered()})
    publisher.answer({2: Failed("no")})
    assert publisher.seqs() == [[1], [2]]
    assert [seq for seq, _, _ in reports] == [1, 2, 3, 4, 5]
    assert all(isinstance(outcome, Released) for _, outcome, _ in reports[2:])
    assert not dispatcher.chainable("k", 5), "a broken run is never chained behind"
    late = chain_rows(6, 2, after=5, token="v")  # claimed before the relay knew: given back unhanded
    dispatcher.register(late)
    dispatcher.dispatch(late)
    assert publisher.seqs() == [[1], [2]]
    assert [seq for seq, _, _ in reports[5:]] == [6, 7]
    assert all(isinstance(outcome, Released) for _, outcome, _ in reports[5:])


@pytest.mark.parametrize("head", [2, 1], ids=["run", "message alone"])
def test_a_chained_run_behind_a_run_already_delivered_goes_out_on_its_own(head: int) -> None:
    """Behind a run (or a message handed out alone) delivered, its mark not yet written."""
    publisher = OneAtATimePublisher()
    dispatcher, reports = dispatcher_with(publisher)
    rows = chain_rows(1, head)
    dispatcher.register(rows)
    dispatcher.dispatch(rows)
    for seq in range(1, head + 1):
        publisher.answer({seq: Delivered()})
    assert dispatcher.chainable("k", head), "delivered, its mark not yet written: still chainable"
    chained = chain_rows(head + 1, 2, after=head, token="u")
    dispatcher.register(chained)
    dispatcher.dispatch(chained)
    assert publisher.seqs()[-1] == [head + 1], "handed out at once"
    publisher.answer({head + 1: Delivered()})
    publisher.answer({head + 2: Delivered()})
    assert [seq for seq, _, _ in reports] == list(range(1, head + 3))
    assert all(isinstance(outcome, Delivered) for _, outcome, _ in reports)


# --- chained behind a message handed out alone (a run of one: no lane) ---


def test_a_run_chained_behind_a_message_handed_out_alone_goes_out_after_it() -> None:
    """A key's next message, committed while its one message in the relay is still in flight, is
    chained behind it (not queued): handed out once that message was delivered, with no claim between;
    only the chained run's last message ends the key's run."""
    publisher = OneAtATimePublisher()
    dispatcher, reports = dispatcher_with(publisher)
    single = chain_rows(1, 1)
    dispatcher.register(single)
    dispatcher.dispatch(single)
    assert dispatcher.chainable("k", 1) and not dispatcher.chainable("k", 2)
    chained = chain_rows(2, 2, after=1, token="u")
    dispatcher.register(chained)
    assert dispatcher.chainable("k", 3) and not dispatcher.chainable("k", 1)
    dispatcher.dispatch(chained)
    assert publisher.seqs() == [[1]], "the chained run waits for the message before it"
    for seq in (1, 2, 3):
        assert publisher.seqs()[-1] == [seq]
        publisher.answer({seq: Delivered()})
    assert [(seq, run_end) for seq, _, run_end in reports] == [(1, False), (2, False), (3, True)]
    assert all(isinstance(outcome, Delivered) for _, outcome, _ in reports)


def test_a_run_chained_behind_a_message_alone_that_fails_is_released_without_being_handed_out() -> None:
    publisher = OneAtATimePublisher()
    dispatcher, reports = dispatcher_with(publisher)
    single, chained = chain_rows(1, 1), chain_rows(2, 2, after=1, token="u")
    dispatcher.register(single)
    dispatcher.dispatch(single)
    dispatcher.register(chained)
    dispatcher.dispatch(chained)
    publisher.answer({1: Failed("no")})
    assert publisher.seqs() == [[1]]
    kinds = [(seq, type(outcome)) for seq, outcome, _ in reports]
    assert kinds == [(1, Failed), (2, Released), (3, Released)]
    assert not dispatcher.chainable("k", 1), "a message that did not go through is never chained behind"
    late = chain_rows(4, 1, after=1, token="v")  # claimed before the relay knew: given back unhanded
    dispatcher.register(late)
    dispatcher.dispatch(late)
    assert publisher.seqs() == [[1]] and [seq for seq, _, _ in reports[3:]] == [4]
    assert isinstance(reports[3][1], Released)


def test_a_run_chained_behind_a_message_alone_that_is_refused_or_stopped_is_released() -> None:
    """A message handed out alone that never reaches its publisher (too large; the relay stopping) ends
    the run chained behind it all the same: released, never left waiting."""
    for stopping in (False, True):
        publisher = OneAtATimePublisher()
        dispatcher, reports = dispatcher_with(publisher)
        single = run_rows("A", big=() if stopping else (1,))
        chained = chain_rows(2, 2, after=1, token="u")
        dispatcher.register(single)
        dispatcher.register(chained)
        dispatcher.dispatch(chained)
        dispatcher.dispatch(single, stopping=stopping)
        assert publisher.seqs() == []
        assert [seq for seq, _, _ in reports] == [1, 2, 3]
        assert isinstance(reports[0][1], Released if stopping else Failed)
        assert all(isinstance(outcome, Released) for _, outcome, _ in reports[1:])


@pytest.mark.parametrize("fails", [False, True], ids=["delivered", "failed"])
def test_a_keys_next_message_is_chained_behind_its_one_message_in_flight(
    engine: sa.Engine, registry: Registry, relay: Relay, fails: bool
) -> None:
    """A key's message committed while the key's one message in the relay is still with its handler (a
    steady key at a moderate rate) is chained behind it: taken by the next claim and handed out as soon
    as that message is delivered, not set aside for a promotion. If that message fails, the chained one
    is given back without an attempt, and goes after the retry."""
    gate = threading.Event()
    starts: list[int] = []

    @registry.handler("step", **FAST)
    def step(message: Message) -> None:
        index = message.payload["i"]
        starts.append(index)
        if index == 0 and message.attempt == 1:
            gate.wait(30)
            if fails:
                raise RuntimeError("once")

    t = outbox.tables_for().messages

    def row(index: int) -> sa.Row[tuple[str, dt.datetime | None]] | None:
        with engine.connect() as conn:
            return conn.execute(
                sa.select(t.c.status, t.c.due_at).order_by(t.c.seq).offset(index).limit(1)
            ).first()

    relay.start()
    with engine.begin() as conn:
        outbox.add(conn, "step", {"i": 0}, key="k")
    wait_until(lambda: starts == [0], what="the first message is with its handler")
    with engine.begin() as conn:
        outbox.add(conn, "step", {"i": 1}, key="k")

    def claimed_or_set_aside() -> object:
        found = row(1)
        return found if found is not None and (found.status != "pending" or found.due_at is None) else None

    try:
        second = wait_until(claimed_or_set_aside, what="the second message is claimed or set aside")
    finally:
        gate.set()
    assert isinstance(second, sa.Row) and second.status == Status.INFLIGHT.value, (
        "chained behind the first, not set aside",
        second,
    )
    wait_until(lambda: status_counts(engine).get("delivered") == 2)
    assert starts == ([0, 0, 1] if fails else [0, 1])
    assert attempts_by_index(engine) == {0: 2 if fails else 1, 1: 1}


@pytest.mark.parametrize("backend", SERVER_BACKENDS)  # SQLite: one writer at a time, no late commit
def test_one_key_written_by_concurrent_writers_never_stalls(db_url: str, engine: sa.Engine) -> None:
    """Writers of one key in four threads at once commit out of ``seq`` order now and then: a message
    becomes visible after later ones of its key were taken, behind a message inside a run in flight. It
    must wait there due, not set aside where no run's end would promote it (the key, and every message
    written after it, would then wait for the maintenance sweep, which this relay does not run): every
    message is delivered once, while the writers write."""
    registry = Registry()
    seen: dict[int, int] = defaultdict(int)
    lock = threading.Lock()

    @registry.handler("step")
    def step(message: Message) -> None:
        with lock:
            seen[message.payload["i"]] += 1

    writers = outbox.create_engine(db_url, pool_size=4)

    def write(lane: int) -> None:
        for i in range(400):
            with writers.begin() as conn:
                outbox.add(conn, "step", {"i": lane * 1000 + i}, key="k")

    relay = Relay(engine, registry, poll_interval=0.05, batch_size=50, workers=4, maintenance=False)
    relay.start()
    try:
        threads = [threading.Thread(target=write, args=(lane,)) for lane in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wait_until(
            lambda: status_counts(engine).get("delivered") == 1600,
            timeout=60,
            explain=lambda: f"{status_counts(engine)}, set aside: {set_aside(engine)}",
        )
    finally:
        relay.stop()
        writers.dispose()
    assert sorted(seen) == sorted(lane * 1000 + i for lane in range(4) for i in range(400))
    assert set(seen.values()) == {1}


def set_aside(engine: sa.Engine) -> int:
    t = outbox.tables_for().messages
    with engine.connect() as conn:
        count = conn.execute(
            sa.select(sa.func.count()).where(t.c.status == Status.PENDING.value, t.c.due_at.is_(None))
        ).scalar()
    return int(count or 0)


def test_chained_runs_keep_order_through_failures_in_a_relay(
    engine: sa.Engine, registry: Registry, relay: Relay
) -> None:
    """A hot key in short runs, so that runs chain all the time, with failures inside them: each
    message's first attempt comes in seq order, and only the failed messages count a second attempt."""
    relay.claims.run_length = relay.claims.key_queue.run_length = 7
    firsts: list[int] = []
    failed: set[int] = set()

    @registry.handler("step", **FAST)
    def step(message: Message) -> None:
        index = message.payload["i"]
        if index not in firsts:
            firsts.append(index)
        time.sleep(0.002)  # a run takes longer than a claim: the next one is claimed meanwhile
        if index % 37 == 5 and index not in failed:
            failed.add(index)
            raise RuntimeError("once")

    chained: list[int] = []
    register = relay.dispatcher.register

    def counting(rows: list[ClaimedRow], deep: Iterable[str] = ()) -> None:
        chained.extend(row.seq for row in rows if row.after)
        register(rows, deep)

    relay.dispatcher.register = counting  # type: ignore[method-assign]
    with engine.begin() as conn:
        for i in range(600):
            outbox.add(conn, "step", {"i": i}, key="hot")
    relay.start()
    wait_until(lambda: status_counts(engine).get("delivered") == 600, timeout=120)
    assert firsts == list(range(600))
    assert len(chained) > 10, "runs were chained"
    attempts = attempts_by_index(engine)
    assert all(attempts[i] == (2 if i in failed else 1) for i in range(600)), {
        i: n for i, n in attempts.items() if n != (2 if i in failed else 1)
    }
