"""``outbox doctor`` finds each problem it claims to check for: every test below creates the problem on a
real database, then asks the doctor. A healthy database passes with exit code 0.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

import outbox
from outbox import cli
from outbox._clock import utcnow
from outbox._schema import tables_for
from outbox.admin._doctor import DoctorReport, Finding, Level, Thresholds, diagnose
from tests.conftest import SERVER_BACKENDS, wait_until

TABLES = tables_for()
T = TABLES.messages
servers_only = pytest.mark.parametrize("backend", SERVER_BACKENDS, indirect=True)


@pytest.fixture(autouse=True)
def _no_outbox_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OUTBOX_"):
            monkeypatch.delenv(name)


def doctor_cli(*args: str) -> Result:
    return CliRunner().invoke(cli.outbox, ["doctor", *args], catch_exceptions=False)


def finding(report: DoctorReport, check: str) -> Finding:
    found = report.get(check)
    assert found is not None, f"no {check} finding in {[f.check for f in report.findings]}"
    return found


def problems(report: DoctorReport) -> dict[str, Level]:
    return {f.check: f.status for f in report.findings if f.status is not Level.OK}


def add_messages(engine: sa.Engine, count: int, payload_size: int = 10) -> list[uuid.UUID]:
    with engine.begin() as conn:
        return [outbox.add(conn, "doctor.test", {"pad": "x" * payload_size}) for _ in range(count)]


# --- healthy --------------------------------------------------------------------------------------------


def test_healthy_database_passes(engine: sa.Engine, db_url: str, backend: str) -> None:
    add_messages(engine, 3)
    report = diagnose(engine)
    assert report.ok, [f for f in report.findings if f.status is not Level.OK]
    checks = [f.check for f in report.findings]
    assert checks[:4] == ["database", "schema_version", "tables", "indexes"]
    assert {"bloat", "clock_skew", "stuck_leases"} <= set(checks)
    if backend == "postgresql":  # LISTEN works: a NOTIFY from one connection reached another
        assert "reached a LISTEN" in finding(report, "listen").found
    else:
        assert "listen" not in checks

    result = doctor_cli("--database-url", db_url)
    assert result.exit_code == 0, result.output
    assert "0 failed, 0 warning(s)" in result.output
    result = doctor_cli("--database-url", db_url, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["ok"] is True
    assert {f["status"] for f in document["findings"]} == {"ok"}


def test_unreachable_database_exits_4() -> None:
    result = doctor_cli("--database-url", "postgresql://postgres@127.0.0.1:1/nowhere", "--json")
    assert result.exit_code == 4, result.output
    [only] = json.loads(result.output)["findings"]
    assert only["check"] == "database" and only["status"] == "fail" and only["fix"]


# --- schema ---------------------------------------------------------------------------------------------


def test_missing_table_fails(engine: sa.Engine, db_url: str) -> None:
    TABLES.dead_letters.drop(engine)
    report = diagnose(engine)
    tables = finding(report, "tables")
    assert tables.status is Level.FAIL and TABLES.dead_letters.name in tables.found
    assert tables.fix is not None and "create_all" in tables.fix  # the version says current: no upgrade
    assert doctor_cli("--database-url", db_url).exit_code == 1

    TABLES.metadata.create_all(engine)  # the fix it gave
    assert diagnose(engine).ok


def test_missing_outbox_table_is_one_failure_not_many(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        T.drop(conn)
    report = diagnose(engine)
    assert problems(report) == {"tables": Level.FAIL}
    assert {"indexes", "bloat", "stuck_leases"}.isdisjoint(f.check for f in report.findings)


def test_missing_index_fails_with_the_statement_that_fixes_it(engine: sa.Engine) -> None:
    [due_index] = [ix for ix in T.indexes if ix.name == "ix_outbox_due"]
    with engine.begin() as conn:
        conn.execute(sa.schema.DropIndex(due_index))
    report = diagnose(engine)
    assert problems(report) == {"indexes": Level.FAIL}
    indexes = finding(report, "indexes")
    assert "ix_outbox_due" in indexes.found and "missing" in indexes.found
    assert indexes.fix is not None and indexes.fix.startswith("run: CREATE INDEX ix_outbox_due")

    with engine.begin() as conn:
        conn.execute(sa.text(indexes.fix.removeprefix("run: ")))
    assert diagnose(engine).ok


def test_old_schema_version_fails_until_upgraded(engine: sa.Engine, db_url: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(TABLES.meta).where(TABLES.meta.c.name == "schema_version").values(value="1"))
    report = diagnose(engine)
    version = finding(report, "schema_version")
    assert version.status is Level.FAIL and "version 1" in version.found
    assert version.fix is not None and "outbox db upgrade" in version.fix
    assert doctor_cli("--database-url", db_url).exit_code == 1

    with engine.begin() as conn:
        outbox.upgrade(conn)
    assert diagnose(engine).ok


# --- activity and storage -------------------------------------------------------------------------------


@pytest.fixture
def open_transaction(engine: sa.Engine, backend: str) -> Iterator[int]:
    """A transaction left open in another connection (it wrote a row); yields that connection's id."""
    conn = engine.connect()
    try:
        ident_sql = "SELECT pg_backend_pid()" if backend == "postgresql" else "SELECT CONNECTION_ID()"
        ident = int(conn.execute(sa.text(ident_sql)).scalar_one())
        conn.commit()
        conn.execute(
            sa.insert(TABLES.locks).values(name="held-open", holder="test", expires_at=utcnow())
        )  # and now it stays open
        yield ident
    finally:
        conn.rollback()
        conn.close()


@servers_only
def test_long_running_transaction_is_found(engine: sa.Engine, open_transaction: int) -> None:
    quick = Thresholds(long_transaction_seconds=0.5)

    def long_transactions() -> Finding | None:
        found = finding(diagnose(engine, thresholds=quick), "long_transactions")
        return found if found.status is Level.WARN else None

    found = wait_until(long_transactions, timeout=15, interval=0.2, what="the doctor to see it")
    assert isinstance(found, Finding)
    assert str(open_transaction) in found.found
    assert found.fix is not None and ("pg_terminate_backend" in found.fix or "KILL" in found.fix)
    # With the default threshold (5 minutes) the same transaction is not a problem yet.
    assert finding(diagnose(engine), "long_transactions").status is Level.OK


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_dead_tuples_are_found_on_postgresql(engine: sa.Engine) -> None:
    with engine.begin() as conn:  # no autovacuum to clean up behind the test's back
        conn.execute(sa.text("ALTER TABLE outbox SET (autovacuum_enabled = false)"))
    add_messages(engine, 3000)
    with engine.begin() as conn:
        conn.execute(sa.delete(T).where(T.c.seq % 4 != 0))  # 2250 dead rows, 750 live
    limits = Thresholds(bloat_min_dead_rows=1000, bloat_ratio=0.5)

    def bloat() -> Finding | None:  # table statistics reach pg_stat_user_tables within a second or so
        found = finding(diagnose(engine, thresholds=limits), "bloat")
        return found if found.status is Level.WARN else None

    found = wait_until(bloat, timeout=30, interval=0.5, what="the dead rows in the statistics")
    assert isinstance(found, Finding)
    assert "2250 dead rows" in found.found
    assert found.fix is not None and "VACUUM" in found.fix
    assert finding(diagnose(engine), "bloat").status is Level.OK  # under the default minimum

    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM outbox"))  # the fix it gave
    wait_until(lambda: finding(diagnose(engine, thresholds=limits), "bloat").status is Level.OK, timeout=30)


@pytest.mark.parametrize("backend", ["sqlite", "mariadb"], indirect=True)
def test_free_space_is_found_on_sqlite_and_mariadb(engine: sa.Engine, backend: str) -> None:
    # SQLite: free pages of the file; MariaDB: InnoDB's data_free (whole free extents, so more data).
    count, size, minimum = (2000, 1000, 500_000) if backend == "sqlite" else (5000, 4000, 16 * 1024 * 1024)
    limits = Thresholds(bloat_min_free_bytes=minimum)
    add_messages(engine, count, payload_size=size)
    assert finding(diagnose(engine, thresholds=limits), "bloat").status is Level.OK
    with engine.begin() as conn:
        conn.execute(sa.delete(T))

    def bloat() -> Finding | None:  # InnoDB frees the pages when its purge thread gets to them
        found = finding(diagnose(engine, thresholds=limits), "bloat")
        return found if found.status is Level.WARN else None

    found = wait_until(bloat, timeout=30, interval=0.5, what="the free space to show")
    assert isinstance(found, Finding)
    assert "free bytes" in found.found
    assert found.fix is not None and (
        "VACUUM" in found.fix if backend == "sqlite" else "OPTIMIZE" in found.fix
    )

    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        result = conn.exec_driver_sql("VACUUM" if backend == "sqlite" else "OPTIMIZE TABLE outbox")
        if result.returns_rows:  # OPTIMIZE reports per table; read it so the statement completes
            result.all()
    assert finding(diagnose(engine, thresholds=limits), "bloat").status is Level.OK


@servers_only
def test_clock_skew_warns_then_fails(engine: sa.Engine, db_url: str) -> None:
    assert finding(diagnose(engine), "clock_skew").status is Level.OK
    ahead = finding(diagnose(engine, clock_offset=5.0), "clock_skew")  # lease 30 s: fails past 10 s
    assert ahead.status is Level.WARN and "ahead of" in ahead.found and ahead.fix
    behind = finding(diagnose(engine, clock_offset=-20.0), "clock_skew")
    assert behind.status is Level.FAIL and "behind" in behind.found
    shorter_lease = Thresholds(lease_seconds=12.0)  # a third of it is 4 s
    assert (
        finding(diagnose(engine, thresholds=shorter_lease, clock_offset=5.0), "clock_skew").status
        is Level.FAIL
    )

    result = doctor_cli("--database-url", db_url, "--json", "--clock-offset", "5", "--lease-seconds", "12")
    assert result.exit_code == 1
    skew = [f for f in json.loads(result.output)["findings"] if f["check"] == "clock_skew"]
    assert skew[0]["status"] == "fail"


def test_stuck_lease_is_found(engine: sa.Engine, db_url: str) -> None:
    ids = add_messages(engine, 3)
    stuck, live = ids[0], ids[1]
    with engine.begin() as conn:  # one lease expired 5 minutes ago, nobody took it back; one is live
        conn.execute(
            sa.update(T)
            .where(T.c.id == stuck)
            .values(status="inflight", lease_token="a" * 32, due_at=utcnow() - dt.timedelta(minutes=5))
        )
        conn.execute(
            sa.update(T)
            .where(T.c.id == live)
            .values(status="inflight", lease_token="b" * 32, due_at=utcnow() + dt.timedelta(seconds=30))
        )
    report = diagnose(engine)
    assert problems(report) == {"stuck_leases": Level.FAIL}
    found = finding(report, "stuck_leases")
    assert str(stuck) in found.found and str(live) not in found.found
    assert found.fix is not None and "outbox relay" in found.fix
    # Within the grace, an expired lease is normal: a relay takes it back at its next claim.
    assert finding(
        diagnose(engine, thresholds=Thresholds(stuck_lease_grace_seconds=600)), "stuck_leases"
    ).status is (Level.OK)
    result = doctor_cli("--database-url", db_url)
    assert result.exit_code == 1 and "stuck_leases" in result.output and str(stuck) in result.output
