"""Shared fixtures: a fresh real database per test, on PostgreSQL, MariaDB and SQLite.

The servers come from the environment (defaults: the machine's local servers):
``OUTBOX_TEST_POSTGRES_URL`` (postgresql://postgres@127.0.0.1:5432/test) and
``OUTBOX_TEST_MARIADB_URL`` (mysql://root@127.0.0.1:3306/test). Each test that asks for ``db_url`` gets
a new database created on that server from this admin URL and dropped afterwards. An unreachable server
fails the tests loudly: they are never skipped.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import outbox
from consumers import Registry
from outbox._dialects import create_engine
from relay import Relay
from tests.apps import RelayLauncher

POSTGRES_ADMIN = os.environ.get("OUTBOX_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
MARIADB_ADMIN = os.environ.get("OUTBOX_TEST_MARIADB_URL", "mysql://root@127.0.0.1:3306/test")
BACKENDS = ("sqlite", "postgresql", "mariadb")
SERVER_BACKENDS = ("postgresql", "mariadb")
ROOT = Path(__file__).resolve().parent.parent


def _admin_engine(url: str) -> sa.Engine:
    return create_engine(url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")


def make_database(backend: str, tmp_path: Path) -> tuple[str, Callable[[], None]]:
    """Create an empty database on ``backend``; return its URL and a function that drops it."""
    if backend == "sqlite":
        path = tmp_path / f"outbox-{secrets.token_hex(4)}.db"
        return f"sqlite:///{path}", lambda: None
    name = f"outbox_t_{secrets.token_hex(6)}"
    admin_url = POSTGRES_ADMIN if backend == "postgresql" else MARIADB_ADMIN
    admin = _admin_engine(admin_url)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
    except sa.exc.OperationalError as exc:
        pytest.fail(f"{backend} is unreachable at {admin_url}: {exc.orig}", pytrace=False)
    url = sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        with admin.connect() as conn:
            if backend == "postgresql":
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            else:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()

    return url, drop


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh, empty database (no outbox tables yet)."""
    url, drop = make_database(backend, tmp_path)
    try:
        yield url
    finally:
        drop()


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    """An engine on a fresh database with the outbox schema installed."""
    eng = create_engine(db_url)
    with eng.begin() as conn:
        outbox.upgrade(conn)
    try:
        yield eng
    finally:
        eng.dispose()


def wait_until(
    condition: Callable[[], object],
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "",
    explain: Callable[[], str] | None = None,
) -> object:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout`` seconds.

    ``explain`` adds what it returns (the state worth seeing: rows, a relay's log) to the failure.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            message = f"timed out after {timeout}s waiting for {what or condition}"
            if explain is not None:
                message += "\n" + explain()
            pytest.fail(message, pytrace=False)
        time.sleep(interval)


def status_counts(engine: sa.Engine, table: str = "outbox") -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT status, COUNT(*) FROM {table} GROUP BY status")).all()
    return {str(s): int(n) for s, n in rows}


PYTHON = sys.executable


@pytest.fixture
def record(tmp_path: Path) -> Path:
    """The file the recording app (``tests.apps.recording``) appends each handled message to."""
    return tmp_path / "handled.log"


@pytest.fixture
def relays(tmp_path: Path, db_url: str, record: Path) -> Iterator[RelayLauncher]:
    """Starts ``outbox relay`` subprocesses running the recording app; kills what is left at the end."""
    launcher = RelayLauncher(
        tmp_path, db_url, "tests.apps.recording:registry", env={"OUTBOX_TEST_RECORD": str(record)}
    )
    try:
        yield launcher
    finally:
        launcher.cleanup()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of a Kafka-protocol broker shared by the test session."""
    external = os.environ.get("OUTBOX_TEST_KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    from tests.kafka_broker import Broker

    broker = Broker(tmp_path_factory.mktemp("kafka")).start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[object]:
    """A broker of this test's own, for tests that freeze, cut off or kill it."""
    from tests.kafka_broker import Broker

    broker = Broker(tmp_path).start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def spans() -> Iterator[Any]:
    """The OpenTelemetry SDK as the global tracer provider for this test; its in-memory span exporter.

    Taken away again afterwards, so that every other test runs as a user without an SDK.
    """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.util._once import Once

    def install(provider: TracerProvider | None) -> None:
        # OpenTelemetry lets a process set its provider once; its own test utilities reset it like this.
        trace._TRACER_PROVIDER_SET_ONCE = Once()
        trace._TRACER_PROVIDER = None
        if provider is not None:
            trace.set_tracer_provider(provider)

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    install(provider)
    try:
        yield exporter
    finally:
        install(None)
        provider.shutdown()


@pytest.fixture
def registry() -> Registry:
    """A fresh handler registry (not the default one), for the ``relay`` fixture."""
    return Registry()


@pytest.fixture
def relay(engine: sa.Engine, registry: Registry) -> Iterator[Relay]:
    """An in-process relay on ``engine`` with the handlers of ``registry``, quick to poll; started by the
    test (after it registered its handlers), stopped afterwards."""
    r = Relay(engine, registry, poll_interval=0.05, batch_size=50, workers=4)
    yield r
    r.stop()
