"""A message that kills its relay (``os._exit``, a segfault, the OOM killer) is stopped, and only it:
attempts are counted for messages that started (``relay._claim``, invariant 10). Real relay processes,
restarted by a supervisor loop as an orchestrator would."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

import outbox
from outbox._schema import tables_for
from relay._dispatch import CRASH_ALLOWANCE
from tests.apps import RelayLauncher, RelayProcess
from tests.apps.recording import TOPIC, read_record
from tests.conftest import SERVER_BACKENDS, status_counts, wait_until

LEASE = 2.0


def supervise(
    relays: RelayLauncher, until: object, *, timeout: float, **options: object
) -> list[RelayProcess]:
    """Keep one relay running (start a new one whenever the last has died) until ``until()``."""
    started: list[RelayProcess] = []
    deadline = time.monotonic() + timeout
    while not until():  # type: ignore[operator]
        if time.monotonic() > deadline:
            logs = "\n".join(p.log_tail() for p in started[-2:])
            pytest.fail(f"not done after {timeout}s and {len(started)} relay(s); last logs:\n{logs}")
        if not started or not started[-1].alive():
            started.append(relays.start(**options))
        time.sleep(0.1)
    return started


@pytest.mark.slow
@pytest.mark.parametrize("backend", SERVER_BACKENDS)
def test_a_message_that_kills_its_relay_goes_dead_and_no_innocent_one_does(
    engine: sa.Engine, relays: RelayLauncher, record: Path
) -> None:
    t = tables_for().messages
    with engine.begin() as conn:
        for i in range(25):
            outbox.add(conn, TOPIC, {"i": i}, key=None if i % 2 else f"k{i % 5}")
        poison = outbox.add(conn, TOPIC, {"i": 99, "exit": True})
        for i in range(25, 50):
            outbox.add(conn, TOPIC, {"i": i}, key=None if i % 2 else f"k{i % 5}")
    options = {"lease_seconds": LEASE, "workers": 1, "poll_interval": 0.1, "max_attempts": 1}
    started = supervise(
        relays, lambda: status_counts(engine) == {"delivered": 50, "dead": 1}, timeout=120, **options
    )
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(sa.select(t.c.id, t.c.attempts, t.c.last_error, t.c.status))}
    assert rows[poison].status == "dead"
    assert "kills or hangs relays" in (rows[poison].last_error or "")
    # it killed a relay once uncounted, then once per counted attempt up to the bound
    assert len(started) - 1 == 1 + 1 + CRASH_ALLOWANCE
    innocents = {i: r for i, r in rows.items() if i != poison}
    assert {r.status for r in innocents.values()} == {"delivered"}
    assert {r.attempts for r in innocents.values()} == {1}  # each counted once: its own delivery
    done = [h for h in read_record(record) if h.event == "done"]
    assert {h.message_id for h in done} == {str(i) for i in innocents}
    for relay in started:
        if relay.alive():
            relay.send(signal.SIGTERM)
            assert relay.wait_exit(timeout=20) == 0, relay.log_tail()


@pytest.mark.slow
@pytest.mark.parametrize("backend", SERVER_BACKENDS)
def test_relays_killed_again_and_again_declare_nothing_dead(
    engine: sa.Engine, relays: RelayLauncher, record: Path
) -> None:
    """Three relays, one of them SIGKILLed every 2 s, with --max-attempts 1: every message delivered,
    none dead (a message claimed by a killed relay never loses an attempt for it)."""
    total = 2000
    with engine.begin() as conn:
        for i in range(total):
            outbox.add(conn, TOPIC, {"i": i, "sleep": 0.03}, key=None if i % 3 else f"k{i % 40}")
    options = {"lease_seconds": LEASE, "workers": 2, "poll_interval": 0.1, "max_attempts": 1}
    running = [relays.start(**options) for _ in range(3)]
    kills = 0
    deadline = time.monotonic() + 240
    victim = 0
    next_kill = time.monotonic() + 2
    while status_counts(engine).get("delivered", 0) + status_counts(engine).get("dead", 0) < total:
        assert time.monotonic() < deadline, f"not done after {kills} kills: {status_counts(engine)}"
        if time.monotonic() >= next_kill:
            running[victim].kill()
            running[victim] = relays.start(**options)
            victim = (victim + 1) % 3
            kills += 1
            next_kill = time.monotonic() + 2
        time.sleep(0.1)
    assert status_counts(engine) == {"delivered": total}
    assert kills >= 4
    for relay in running:  # a relay started a moment ago handles SIGTERM once it has started
        wait_until(lambda r=relay: "started on" in r.log_tail(), timeout=30, what="the relay to start")  # type: ignore[misc]
        relay.send(signal.SIGTERM)
        assert relay.wait_exit(timeout=30) == 0, relay.log_tail()
    assert len({h.message_id for h in read_record(record) if h.event == "done"}) == total
