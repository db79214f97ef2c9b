"""A relay that cannot work says so and exits: it never lives on as a zombie that claims nothing.

The fetcher (claims), the dispatcher (hands claimed rows to the publishers) and the completer (writes
outcomes, renews leases) are threads the relay cannot work without. When one dies (a claim's
``MemoryError`` after the server committed it, a bug), ``/healthz`` answers 503, the relay stops and
``outbox relay`` exits with ``RET_CRASHED``; the rows it held come back after their lease, to the next relay.
"""

from __future__ import annotations

import http.client
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import outbox
from consumers import Registry
from outbox._message import Message
from outbox.cli import RET_CRASHED
from relay import Relay
from relay._claim import ClaimQueries
from relay._completer import Completer
from relay._dispatch import Dispatcher
from relay.health import serve
from relay.metrics import RelayMetrics
from tests.apps import RelayLauncher
from tests.apps.recording import commit_messages, read_record
from tests.conftest import status_counts, wait_until
from tests.test_metrics import Scraper

#: tests.apps.failing_claim's setting (not imported from it: importing it patches the claim in this process)
FAIL_AFTER_ENV = "OUTBOX_TEST_FAIL_CLAIM_AFTER"
BROKEN = {
    "fetcher": (ClaimQueries, "claim_batch"),
    "dispatcher": (Dispatcher, "dispatch"),
    "completer": (Completer, "_write"),
}


@pytest.fixture
def break_once(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``break_once(thread)``: that thread's next step with work raises ``MemoryError``: a claim after it
    ran (its rows are in flight, as if its result could not be read), a dispatch or a write of outcomes
    before doing anything (their rows stay in flight, left to their lease)."""

    def install(thread: str) -> None:
        owner, name = BROKEN[thread]
        original = getattr(owner, name)
        fired = False

        def failing(self: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal fired
            if thread != "fetcher" and not fired:
                fired = True
                raise MemoryError(f"test: the {thread} ran out of memory")
            result = original(self, *args, **kwargs)
            if thread == "fetcher" and result and not fired:
                fired = True
                raise MemoryError(f"test: the {thread} ran out of memory")
            return result

        monkeypatch.setattr(owner, name, failing)

    yield install


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"], indirect=True)
@pytest.mark.parametrize("thread", sorted(BROKEN))
def test_healthz_fails_and_the_relay_stops_when_a_thread_it_needs_dies(
    engine: sa.Engine, break_once: Any, thread: str
) -> None:
    registry = Registry()
    handled: list[Message] = []
    registry.add("liveness.work", handled.append)
    break_once(thread)
    with engine.begin() as conn:
        for i in range(5):
            outbox.add(conn, "liveness.work", {"i": i})
    relay = Relay(engine, registry, poll_interval=0.05, lease_seconds=5, stop_timeout=2, maintenance=False)
    metrics = RelayMetrics(interval=60, process=False)
    server = serve(relay, metrics, host="127.0.0.1", port=0)
    try:
        scrape = Scraper(server.port)
        assert scrape.get("/healthz")[0] == 200  # not started yet: alive, not ready
        relay.start()
        wait_until(lambda: relay.wait(0), timeout=30, what=f"the relay to stop after its {thread} died")
        status, body = scrape.get("/healthz")
        assert status == 503, body
        assert f"{thread} thread died: MemoryError: test: the {thread} ran out of memory" in body.decode()
        ready, report = scrape.get("/readyz")
        assert ready == 503 and f"{thread} thread died" in report.decode()
    finally:
        relay.stop()
        server.stop()
    assert relay.failure is not None and f"the relay's {thread} thread died" in relay.failure


def explain(relay_log: Path, engine: sa.Engine) -> str:
    return f"statuses: {status_counts(engine)}\nlog:\n{relay_log.read_text(errors='replace')[-4000:]}"


@pytest.mark.parametrize("backend", ["postgresql", "mariadb", "sqlite"], indirect=True)
def test_a_relay_whose_claim_thread_dies_exits_and_loses_nothing(
    engine: sa.Engine, relays: RelayLauncher, record: Path
) -> None:
    """``outbox relay`` whose second non-empty claim raises ``MemoryError`` after the server committed it
    (PostgreSQL: an autocommitted claim; MariaDB and SQLite roll it back) exits with RET_CRASHED in time,
    its ``/healthz`` never says 200 once the failure is logged, and a second relay delivers everything
    after the lease."""
    committed = commit_messages(engine, [(None, i) for i in range(30)])
    options: dict[str, Any] = {
        **{"lease_seconds": 3, "batch_size": 5, "max_batch_size": 5, "workers": 2},
        **{"poll_interval": 0.1, "stop_timeout": 5, "metrics_port": 0, "metrics_host": "127.0.0.1"},
    }
    relays.app = "tests.apps.failing_claim:registry"
    relays.env[FAIL_AFTER_ENV] = "2"
    failing = relays.start(**options)
    served = wait_until(
        lambda: re.search(r"serving /metrics.* on http://127\.0\.0\.1:(\d+)", failing.log_path.read_text()),
        timeout=30,
        what="the relay's ops server",
        explain=failing.log_tail,
    )
    scrape = Scraper(int(served[1]))  # type: ignore[index]
    after_failure: list[int] = []  # /healthz answers once the failure was logged (OSError: process gone)

    def exited() -> bool:
        if not failing.alive():
            return True
        died = "thread died" in failing.log_path.read_text(errors="replace")
        try:
            status = scrape.get("/healthz")[0]
        except (OSError, http.client.HTTPException):  # the process exiting mid-answer: IncompleteRead
            return False
        if died:
            after_failure.append(status)
        return False

    wait_until(exited, timeout=45, what="the relay to exit after its claim failed", explain=failing.log_tail)
    assert failing.popen.returncode == RET_CRASHED, failing.log_tail()
    assert 200 not in after_failure, after_failure
    last = failing.log_tail().strip().splitlines()[-1]
    assert last.startswith("outbox: error: the relay's fetcher thread died: MemoryError: test: lost a claim")
    assert last.endswith("the relay stopped; restart it")

    relays.app = "tests.apps.recording:registry"
    successor = relays.start(**{**options, "metrics_port": 0})
    wait_until(
        lambda: status_counts(engine).get("delivered", 0) == len(committed),
        timeout=60,
        what="every message delivered by the second relay after the lease",
        explain=lambda: explain(successor.log_path, engine),
    )
    successor.send(signal.SIGTERM)
    assert successor.wait_exit(timeout=30) == 0, successor.log_tail()
    handled = {h.message_id for h in read_record(record) if h.event == "done"}
    assert handled == set(committed)
