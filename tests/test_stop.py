"""A relay stopped with SIGTERM finishes what it started, gives back what it did not, and never hands
back a row whose handler is still running.

Each relay is a real ``outbox relay`` subprocess; "started" and "finished" are read from the record
its handlers append to (``tests.apps.recording``), never inferred from timing.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa

from outbox._clock import utcnow
from outbox._schema import Status
from tests.apps import RelayLauncher, outbox_rows
from tests.apps.recording import commit_messages, read_record
from tests.conftest import SERVER_BACKENDS, status_counts, wait_until


def events(record: Path, event: str, pid: int | None = None) -> list[str]:
    """Message ids of the record's ``event`` lines (of one relay process, if ``pid`` is given)."""
    return [h.message_id for h in read_record(record) if h.event == event and (pid is None or h.pid == pid)]


@pytest.mark.slow
def test_sigterm_finishes_in_flight_and_releases_the_rest(
    engine: sa.Engine, relays: RelayLauncher, record: Path
) -> None:
    # 20 handlers of 1 s each, 2 workers, one claim of 20: at any moment 2 run and the rest wait, claimed.
    committed = commit_messages(engine, [(None, i) for i in range(20)], sleep=1.0)
    stop_timeout = 10
    relay = relays.start(
        workers=2, batch_size=20, lease_seconds=10, poll_interval=0.1, stop_timeout=stop_timeout
    )
    wait_until(lambda: len(events(record, "start")) >= 2, timeout=30, what="two handlers to start")
    assert status_counts(engine).get(Status.INFLIGHT.value) == 20, "all 20 should be claimed in one batch"

    relay.send(signal.SIGTERM)
    sent = time.monotonic()
    assert relay.wait_exit(timeout=stop_timeout + 5) == 0, relay.log_tail()
    elapsed = time.monotonic() - sent
    # The running handlers had at most 1 s left: the relay waits for them, not for the stop timeout.
    assert elapsed < stop_timeout, f"stop took {elapsed:.1f}s"

    started = events(record, "start")
    finished = events(record, "done")
    assert 2 <= len(started) < 20
    assert sorted(finished) == sorted(started), "every handler that started must have run to its end"

    rows = outbox_rows(engine)
    now = utcnow()
    for message_id in started:
        assert (rows[message_id].status, rows[message_id].attempts) == (Status.DELIVERED.value, 1)
    released = [rows[m] for m in committed if m not in started]
    for row in released:
        # Given back: claimable at once, no lease, and the attempt that never happened is not counted.
        assert (row.status, row.lease_token, row.attempts, row.last_error) == (
            Status.PENDING.value,
            None,
            0,
            None,
        )
        assert row.due_at is not None and row.due_at <= now

    successor = relays.start(workers=10, poll_interval=0.1)
    wait_until(
        lambda: status_counts(engine).get(Status.DELIVERED.value) == 20, timeout=30, what="the rest delivered"
    )
    successor.send(signal.SIGTERM)
    assert successor.wait_exit(timeout=15) == 0, successor.log_tail()
    assert sorted(events(record, "start", successor.pid)) == sorted(str(r.id) for r in released)
    # A graceful stop causes no duplicates: every message was started exactly once, by one relay or the other.
    assert Counter(events(record, "start")) == Counter(list(committed))


@pytest.mark.slow
@pytest.mark.parametrize("backend", SERVER_BACKENDS, indirect=True)
def test_stop_timeout_never_hands_back_a_running_handler(
    engine: sa.Engine, relays: RelayLauncher, record: Path
) -> None:
    # SQLite is left out: a new SQLite relay takes every in-flight row back at start (it is the only
    # relay), so the lease of a stopped relay's handler is not what decides there.
    (message_id,) = commit_messages(engine, [(None, 0)], sleep=5.0)
    options = {"workers": 1, "lease_seconds": 3, "poll_interval": 0.1, "stop_timeout": 1}
    relay = relays.start(**options)
    wait_until(lambda: events(record, "start"), timeout=30, what="the handler to start")
    token = outbox_rows(engine)[message_id].lease_token
    assert token is not None

    relay.send(signal.SIGTERM)
    sent = time.monotonic()
    assert relay.wait_exit(timeout=10) == 0, relay.log_tail()
    elapsed = time.monotonic() - sent
    # The handler had ~5 s left; the relay gives it the stop timeout (1 s) and goes.
    assert elapsed < 3.5, f"stop took {elapsed:.1f}s with a 1 s stop timeout"
    assert events(record, "done") == []

    # Not handed back: the row is still in flight under the same lease, which now simply runs out.
    row = outbox_rows(engine)[message_id]
    # (no outcome: no attempt counted yet; relay._claim, invariant 10)
    assert (row.status, row.lease_token, row.attempts) == (Status.INFLIGHT.value, token, 0)
    lease_expiry = row.due_at

    successor = relays.start(**{**options, "stop_timeout": 10})
    wait_until(
        lambda: events(record, "done", successor.pid), timeout=30, what="the next relay to handle the message"
    )
    wait_until(
        lambda: status_counts(engine) == {Status.DELIVERED.value: 1}, timeout=10, what="the delivered mark"
    )
    successor.send(signal.SIGTERM)
    assert successor.wait_exit(timeout=15) == 0, successor.log_tail()
    row = outbox_rows(engine)[message_id]
    assert row.delivered_at >= lease_expiry, "taken over before the stopped relay's lease had expired"
    # the successor took it back from an expired lease: counted before it started, once
    assert (row.attempts, row.last_error) == (1, None)
