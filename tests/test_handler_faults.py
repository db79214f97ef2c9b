"""No handler can take a worker away: whatever a handler raises, however it hangs, the relay (and
``outbox consume``) keeps delivering everything else, fails the bad message with its error, and says
the truth in ``/readyz``. The invariants are stated in ``consumers/attempt.py`` and
``relay/publishers/_handlers.py``.
"""

from __future__ import annotations

import logging
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import orm

import outbox
from consumers import Registry
from outbox._errors import ConfigError
from outbox._message import Message
from outbox._policy import PolicyOverrides
from relay import Relay
from relay.health import RelayReadiness
from relay.metrics import RelayMetrics
from tests.apps import RelayLauncher, outbox_rows
from tests.apps.faulty import ERRORS
from tests.conftest import SERVER_BACKENDS, status_counts, wait_until

FAST = {"backoff_initial": 0.05, "backoff_max": 0.1, "jitter": 0.0}


def handler_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("outbox-handler-")}


def add(engine: sa.Engine, topic: str, payload: Any = None, *, count: int = 1) -> list[str]:
    with engine.begin() as conn:
        return [str(outbox.add(conn, topic, payload or {"n": n})) for n in range(count)]


def rows(engine: sa.Engine) -> dict[str, sa.Row[Any]]:
    return outbox_rows(engine)


class Silent:
    """Sockets nobody writes to: a read on one blocks in C until :meth:`release`."""

    def __init__(self) -> None:
        self._writers: list[socket.socket] = []
        self._lock = threading.Lock()

    def block(self) -> None:
        reader, writer = socket.socketpair()
        with self._lock:
            self._writers.append(writer)
        reader.recv(1)

    def release(self) -> None:
        with self._lock:
            writers, self._writers = self._writers, []
        for writer in writers:
            writer.send(b"x")


@pytest.fixture
def silent() -> Iterator[Silent]:
    sockets = Silent()
    yield sockets
    sockets.release()  # no thread left blocked after the test


# --- anything a handler raises -------------------------------------------------------------------------


def _raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


def _raise_base_exception() -> None:
    raise BaseException("a bare BaseException")


RAISES: dict[str, Callable[[], None]] = {
    "exit": sys.exit,
    "keyboard_interrupt": _raise_keyboard_interrupt,
    "base_exception": _raise_base_exception,
}


def _raising(kind: str) -> Callable[[Message], None]:
    """A plain handler (one parameter) that raises as ``RAISES[kind]`` does."""
    return lambda message: RAISES[kind]()


@pytest.mark.parametrize("kind", list(RAISES))
def test_handler_that_raises_a_base_exception_fails_its_attempt_and_the_worker_lives_on(
    engine: sa.Engine, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """sys.exit(), KeyboardInterrupt, BaseException: each a failed attempt with its error, the worker
    threads the same ones throughout (three bad messages for two workers, two attempts each)."""
    caplog.set_level(logging.WARNING, logger="outbox.handler")
    registry = Registry()
    registry.add("bad", _raising(kind), overrides=PolicyOverrides(max_attempts=2, **FAST))
    handled: list[str] = []
    registry.add("good", lambda m: handled.append(str(m.id)))
    before = handler_threads()
    with Relay(engine, registry, workers=2, poll_interval=0.05) as relay:
        workers = handler_threads() - before
        assert len(workers) == 2
        bad = add(engine, "bad", count=3)
        good = add(engine, "good", count=20)
        wait_until(
            lambda: status_counts(engine) == {"delivered": 20, "dead": 3},
            timeout=30,
            what="the good ones delivered, the bad ones dead",
            explain=lambda: str(status_counts(engine)),
        )
        assert handler_threads() - before == workers, "the same two workers, alive"
        assert relay.running and relay.handlers.stuck_count() == 0
    assert sorted(handled) == sorted(good)
    for message_id in bad:
        row = rows(engine)[message_id]
        assert (row.attempts, row.last_error) == (2, ERRORS[kind]), row
    logged = [r.getMessage() for r in caplog.records if r.name == "outbox.handler"]
    assert len(logged) == 6 and all("not a stop signal" in line for line in logged), logged


# --- a handler past its timeout ----------------------------------------------------------------------------


def test_handler_busy_in_python_past_its_timeout_is_interrupted_and_its_worker_freed(
    engine: sa.Engine,
) -> None:
    """One worker, a handler looping in Python past its timeout: interrupted each attempt (its
    ``finally`` runs), dead after its attempts, and the same worker delivers everything else."""
    registry = Registry()
    ended: list[int] = []

    def busy(message: Message) -> None:
        try:
            while True:
                pass
        finally:
            ended.append(message.attempt)

    registry.add("busy", busy, overrides=PolicyOverrides(max_attempts=2, timeout=0.3, **FAST))
    handled: list[str] = []
    registry.add("good", lambda m: handled.append(str(m.id)))
    before = handler_threads()
    with Relay(engine, registry, workers=1, poll_interval=0.05, stop_timeout=1) as relay:
        (worker,) = handler_threads() - before
        (stuck,) = add(engine, "busy")
        good = add(engine, "good", count=10)
        wait_until(
            lambda: status_counts(engine) == {"delivered": 10, "dead": 1},
            timeout=30,
            what="the busy one dead, the rest delivered",
            explain=lambda: str(status_counts(engine)),
        )
        wait_until(lambda: ended == [1, 2], timeout=10, what="both attempts interrupted")
        assert handler_threads() - before == {worker} and relay.handlers.stuck_count() == 0
    assert sorted(handled) == sorted(good)
    row = rows(engine)[stuck]
    assert row.attempts == 2 and row.last_error == "HandlerTimeout: handler ran longer than 0.3s"


def test_handler_blocked_in_c_past_its_timeout_is_handed_off_and_the_pool_keeps_its_workers(
    engine: sa.Engine, silent: Silent
) -> None:
    """A long time.sleep and a read on a silent socket cannot be interrupted: each timed-out attempt's
    thread is handed off and replaced, the next attempt starts, both messages end dead, and two
    workers go on delivering; four stuck threads are within the bound (2 x workers): still ready."""
    registry = Registry()
    policy = PolicyOverrides(max_attempts=2, timeout=0.3, **FAST)
    registry.add("sleep", lambda m: time.sleep(30), overrides=policy)
    registry.add("socket", lambda m: silent.block(), overrides=policy)
    handled: list[str] = []
    registry.add("good", lambda m: handled.append(str(m.id)))
    before = handler_threads()
    with Relay(engine, registry, workers=2, poll_interval=0.05, stop_timeout=1) as relay:
        readiness = RelayReadiness(relay)
        sleeper, reader = add(engine, "sleep") + add(engine, "socket")
        good = add(engine, "good", count=10)
        wait_until(
            lambda: status_counts(engine) == {"delivered": 10, "dead": 2},
            timeout=30,
            what="the hanging ones dead, the rest delivered",
            explain=lambda: str(status_counts(engine)),
        )
        wait_until(lambda: relay.handlers.stuck_count() == 4, timeout=10, what="four threads handed off")
        good += add(engine, "good", count=10)  # still claiming, on two fresh workers
        wait_until(lambda: len(handled) == 20, timeout=30, what="ten more delivered")
        assert len(handler_threads() - before) == 6  # two working, four handed off
        assert readiness()["handlers"]() is None and relay.max_in_flight
        silent.release()
        wait_until(lambda: relay.handlers.stuck_count() == 2, timeout=10, what="the socket readers back")
        wait_until(lambda: len(handler_threads() - before) == 4, timeout=10, what="and gone")
    assert sorted(handled) == sorted(good)
    for message_id in (sleeper, reader):
        row = rows(engine)[message_id]
        assert row.attempts == 2 and row.last_error == "HandlerTimeout: handler ran longer than 0.3s"


def test_a_timed_out_handler_inside_a_keyed_run_lets_its_key_go_on_in_order(engine: sa.Engine) -> None:
    """A run's message that hangs past its timeout: the timeout check reports it, and its run hears of
    it (not only the completer): the rest of the run is released, and the key goes on in order after
    the retry instead of staying in flight behind a run that waits for an answer."""
    registry = Registry()
    handled: list[int] = []
    hung = threading.Event()

    def handler(message: Message) -> None:
        if message.payload["n"] == 1 and not hung.is_set():
            hung.set()
            time.sleep(3)  # past the timeout: handed off
            return
        handled.append(message.payload["n"])

    registry.add("k", handler, overrides=PolicyOverrides(max_attempts=3, timeout=0.3, **FAST))
    with engine.begin() as conn:
        for n in range(6):
            outbox.add(conn, "k", {"n": n}, key="one")
    with Relay(engine, registry, workers=2, poll_interval=0.05, stop_timeout=1):
        wait_until(
            lambda: status_counts(engine) == {"delivered": 6},
            timeout=30,
            what="the key drained after its timed-out message's retry",
            explain=lambda: str(status_counts(engine)),
        )
    assert handled == [0, 1, 2, 3, 4, 5]


def test_relay_with_more_stuck_handlers_than_its_bound_stops_claiming_and_says_why(
    engine: sa.Engine, silent: Silent, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="outbox.relay")
    registry = Registry()
    registry.add("socket", lambda m: silent.block(), overrides=PolicyOverrides(max_attempts=1, timeout=0.3))
    released = threading.Event()
    handled_after_release: list[bool] = []
    registry.add("good", lambda m: handled_after_release.append(released.is_set()))
    metrics = RelayMetrics(interval=60, process=False)
    relay = Relay(engine, registry, workers=1, max_stuck_handlers=1, poll_interval=0.05, stop_timeout=1)
    relay.observers.observers.append(metrics)
    with relay:
        readiness = RelayReadiness(relay)
        add(engine, "socket", count=2)
        wait_until(lambda: status_counts(engine) == {"dead": 2}, timeout=30, what="both timed out")
        wait_until(lambda: relay.handlers.stuck_count() == 2, timeout=10, what="two stuck threads")
        problem = readiness()["handlers"]()
        assert problem == "2 handler threads are stuck past their timeout (at most 1: max_stuck_handlers)"
        assert _sample(metrics, "outbox_relay_stuck_handlers") == 2
        assert _sample(metrics, "outbox_relay_claiming_stopped") == 1
        wait_until(
            lambda: any("stops claiming" in r.getMessage() for r in caplog.records),
            timeout=10,
            what="the log saying why",
        )
        add(engine, "good")  # not claimed while the relay is stuck: handled only after the release
        released.set()
        silent.release()
        wait_until(lambda: handled_after_release, timeout=30, what="claiming again")
        assert readiness()["handlers"]() is None and _sample(metrics, "outbox_relay_claiming_stopped") == 0
    assert handled_after_release == [True]


def test_max_stuck_handlers_below_zero_is_refused(engine: sa.Engine) -> None:
    with pytest.raises(ConfigError, match="max_stuck_handlers"):
        Relay(engine, Registry(), max_stuck_handlers=-1)


def _sample(metrics: RelayMetrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None, name
    return float(value)


class _Base(orm.DeclarativeBase):
    pass


class _Effect(_Base):
    __tablename__ = "fault_effects"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True, autoincrement=True)
    message_id: orm.Mapped[str] = orm.mapped_column(sa.String(36))
    attempt: orm.Mapped[int] = orm.mapped_column()


@pytest.mark.parametrize("backend", SERVER_BACKENDS, indirect=True)
@pytest.mark.parametrize("hang", ["python", "c"])
def test_timed_out_session_handler_never_commits(engine: sa.Engine, hang: str) -> None:
    """The first attempt writes, then hangs past its timeout (in Python: interrupted; in C: handed off,
    and it returns later): its transaction is rolled back either way; the second attempt's commits."""
    _Base.metadata.create_all(engine)
    registry = Registry()
    returned = threading.Event()

    def write_then_hang(message: Message, session: orm.Session) -> None:
        session.add(_Effect(message_id=str(message.id), attempt=message.attempt))
        session.flush()
        if message.attempt == 1:
            try:
                if hang == "python":
                    while True:
                        pass
                time.sleep(2)  # past the timeout and the hand-off grace; then back, wanting to commit
            finally:
                returned.set()

    registry.add("effect", write_then_hang, overrides=PolicyOverrides(max_attempts=3, timeout=0.3, **FAST))
    with Relay(engine, registry, workers=1, poll_interval=0.05, stop_timeout=5) as relay:
        (message_id,) = add(engine, "effect")
        wait_until(lambda: status_counts(engine) == {"delivered": 1}, timeout=30, what="delivered")
        # generous: a busy-looping thread is interrupted at its next bytecode with the GIL, which a
        # loaded machine can delay; the limit is not what the test proves
        wait_until(returned.is_set, timeout=60, what="the first attempt back")
        wait_until(lambda: relay.handlers.running_count() == 0, timeout=30, what="its thread done")
    with engine.connect() as conn:
        effects = conn.execute(sa.select(_Effect.message_id, _Effect.attempt)).all()
    assert [tuple(e) for e in effects] == [(message_id, 2)]
    assert rows(engine)[message_id].attempts == 2


# --- outbox relay as a process, with its ops server ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", SERVER_BACKENDS, indirect=True)
def test_relay_process_survives_every_faulty_handler_and_readyz_tells_the_truth(
    engine: sa.Engine, db_url: str, tmp_path: Path
) -> None:
    """``outbox relay --workers 2 --handler-timeout 0.5``: handlers that exit, raise KeyboardInterrupt
    or BaseException, loop in Python, sleep in C and read a silent socket; every other message is
    delivered, each bad one dead with its error, ``/readyz`` 200 with four stuck threads (the bound),
    then 503 naming them once a fifth gets stuck, with the metric and a log line saying why."""
    from tests.test_metrics import Scraper

    record = tmp_path / "ok.log"
    launcher = RelayLauncher(
        tmp_path, db_url, "tests.apps.faulty:registry", env={"OUTBOX_TEST_RECORD": str(record)}
    )
    try:
        relay = launcher.start(
            workers=2,
            handler_timeout=0.5,
            max_attempts=2,
            backoff_initial=0.05,
            backoff_max=0.1,
            max_stuck_handlers=4,
            poll_interval=0.1,
            stop_timeout=1,
            metrics_port=0,
            metrics_host="127.0.0.1",
        )
        wait_until(
            lambda: re.search(r"serving /metrics.* on http://127\.0\.0\.1:(\d+)", relay_log(relay)),
            timeout=30,
            what="the ops server",
            explain=relay.log_tail,
        )
        match = re.search(r"serving /metrics.* on http://127\.0\.0\.1:(\d+)", relay_log(relay))
        assert match is not None
        scrape = Scraper(int(match[1]))
        wait_until(lambda: scrape.ready()[0] == 200, timeout=30, what="ready", explain=relay.log_tail)

        bad = {kind: add(engine, f"fault.{kind}")[0] for kind in ERRORS}
        good = add(engine, "fault.ok", count=20)

        def all_finished_and_ready_meanwhile() -> bool:
            # never more than four stuck threads on the way (two hanging kinds, two attempts each):
            # ready at every look, while handlers exit, raise, loop and block
            status, body = scrape.ready()
            assert status == 200, body
            return status_counts(engine) == {"delivered": 20, "dead": len(ERRORS)}

        wait_until(
            all_finished_and_ready_meanwhile,
            timeout=60,
            what="every good one delivered, every bad one dead",
            explain=lambda: f"{status_counts(engine)}\n{relay.log_tail()}",
        )
        assert sorted(record.read_text().split()) == sorted(good)
        for kind, message_id in bad.items():
            row = rows(engine)[message_id]
            assert row.attempts == 2 and (row.last_error or "").startswith(ERRORS[kind]), (kind, row)
        wait_until(lambda: scrape.value("outbox_relay_stuck_handlers") == 4, timeout=10, what="4 stuck")
        status, body = scrape.ready()
        assert status == 200 and body["checks"]["handlers"] == {"ok": True}, body
        assert scrape.value("outbox_relay_claiming_stopped") == 0
        assert relay.alive()

        more = add(engine, "fault.ok", count=5)  # still claiming and delivering
        wait_until(lambda: len(record.read_text().split()) == 25, timeout=30, what="five more delivered")

        add(engine, "fault.sleep")  # a fifth stuck thread (a sixth if its retry starts first): past the bound
        wait_until(lambda: scrape.ready()[0] == 503, timeout=30, what="unready", explain=relay.log_tail)
        status, body = scrape.ready()
        detail = body["checks"]["handlers"]["detail"]
        assert re.fullmatch(
            r"[56] handler threads are stuck past their timeout \(at most 4: max_stuck_handlers\)", detail
        )
        assert scrape.value("outbox_relay_claiming_stopped") == 1
        wait_until(
            lambda: "this relay stops claiming; restart it" in relay_log(relay), timeout=10, what="why"
        )
        assert "not a stop signal" in relay_log(relay) and relay.alive()

        relay.send(signal.SIGTERM)
        assert relay.wait_exit(30) == 0, relay.log_tail()
    finally:
        launcher.cleanup()
    assert sorted(record.read_text().split()) == sorted(good + more)


def relay_log(relay: Any) -> str:
    return str(relay.log_path.read_text(errors="replace"))


# --- outbox consume runs the same attempts ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_consumer_handler_that_calls_sys_exit_fails_and_the_consumer_lives_on(
    engine: sa.Engine, kafka_bootstrap: str
) -> None:
    """sys.exit(), KeyboardInterrupt and BaseException from plain handlers, SystemExit from a session
    handler (after its write): each record dead-lettered with its error after its attempts, the session
    handler's write rolled back, and the consumer goes on with the next records."""
    from tests.test_consumer import dead_letters, publish, runner, unique

    _Base.metadata.create_all(engine)
    registry = Registry()
    topics = {kind: unique(f"fault.{kind}") for kind in RAISES}
    for kind, topic in topics.items():
        registry.add(topic, _raising(kind))

    def write_then_exit(message: Message, session: orm.Session) -> None:
        session.add(_Effect(message_id=str(message.id), attempt=message.attempt))
        session.flush()
        sys.exit(3)

    session_topic, ok_topic = unique("fault.session"), unique("fault.ok")
    registry.add(session_topic, write_then_exit)
    handled: list[str] = []
    registry.add(ok_topic, lambda m: handled.append(str(m.id)))
    items: list[tuple[str, Any, str | None]] = [(t, {"i": 0}, None) for t in topics.values()]
    items += [(session_topic, {"i": 0}, None)] + [(ok_topic, {"i": i}, None) for i in range(5)]
    ids = publish(engine, kafka_bootstrap, items)
    with runner(engine, registry, kafka_bootstrap, unique("g")) as consumer:
        wait_until(
            lambda: len(dead_letters(engine)) == 4 and len(handled) == 5,
            timeout=60,
            what="four dead letters, five handled",
            explain=lambda: str(consumer.stats()),
        )
        assert consumer.running and consumer.error is None
    errors = {str(d.message_id): (d.error, d.attempts) for d in dead_letters(engine)}
    expected = [ERRORS[kind] for kind in topics] + ["SystemExit: 3"]
    assert [errors[i] for i in ids[:4]] == [(e, 3) for e in expected]
    assert sorted(handled) == sorted(ids[4:])
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(_Effect)).scalar() == 0


@pytest.mark.parametrize("backend", ["mariadb"], indirect=True)
def test_consumer_handler_past_its_timeout_is_interrupted_or_abandoned_and_the_consumer_lives_on(
    engine: sa.Engine, kafka_bootstrap: str
) -> None:
    """A handler looping in Python is interrupted; one asleep in C is abandoned (its thread counted
    as stuck): both dead-lettered with HandlerTimeout after their attempts; the records after them
    are handled."""
    from tests.test_consumer import dead_letters, publish, runner, unique

    registry = Registry()
    ended: list[int] = []

    def busy(message: Message) -> None:
        try:
            while True:
                pass
        finally:
            ended.append(message.attempt)

    busy_topic, sleep_topic, ok_topic = unique("fault.busy"), unique("fault.sleep"), unique("fault.ok")
    registry.add(busy_topic, busy, overrides=PolicyOverrides(timeout=0.3))
    registry.add(sleep_topic, lambda m: time.sleep(30), overrides=PolicyOverrides(timeout=0.3))
    handled: list[str] = []
    registry.add(ok_topic, lambda m: handled.append(str(m.id)))
    ids = publish(
        engine,
        kafka_bootstrap,
        [(busy_topic, {"i": 0}, "k"), (sleep_topic, {"i": 1}, "k"), (ok_topic, {"i": 2}, "k")],
    )
    with runner(engine, registry, kafka_bootstrap, unique("g")) as consumer:
        wait_until(
            lambda: len(dead_letters(engine)) == 2 and len(handled) == 1,
            timeout=60,
            what="two dead letters, one handled",
            explain=lambda: str(consumer.stats()),
        )
        assert consumer.running and consumer.error is None
        assert ended == [1, 2, 3], "every attempt of the busy handler interrupted"
        assert consumer.processor.stuck_count() == 3, "every attempt of the sleeping one abandoned"
    letters = {str(d.message_id): (d.error, d.attempts) for d in dead_letters(engine)}
    assert letters == {
        ids[0]: ("HandlerTimeout: handler ran longer than 0.3s", 3),
        ids[1]: ("HandlerTimeout: handler ran longer than 0.3s", 3),
    }
    assert handled == [ids[2]]
