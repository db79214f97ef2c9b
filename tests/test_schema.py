"""Schema versions 3 and 4: PostgreSQL's partial indexes (4 adds the index of the rows holding each key,
the claim's one probe), the upgrade to them, and the claim still using them.

The partial indexes only help if the planner can use them in every plan psycopg gets, including the
generic plan of a prepared statement (psycopg prepares a statement from its fifth execution on). So the
claim is checked with ``plan_cache_mode = force_generic_plan``: a bound status list would hide the
partial index's condition from the planner, and the claim would scan the table.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import outbox
from outbox._clock import utcnow
from outbox._dialects import dialect_for
from outbox._errors import SchemaError
from outbox._schema import MIGRATIONS, SCHEMA_VERSION, check_version, current_version, tables_for
from relay._claim import ClaimQueries
from relay.metrics import backlog_query
from tests.conftest import make_database

T = tables_for()
PARTIAL = {"ix_outbox_due", "ix_outbox_key", "ix_outbox_status", "ix_outbox_done"}


def index_definitions(conn: sa.Connection) -> dict[str, str]:
    rows = conn.execute(sa.text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'outbox'"))
    return {str(name): str(definition) for name, definition in rows}


def install_v2(conn: sa.Connection) -> None:
    """What version 2 of this code created: the same tables, every index over all rows."""
    for migration in MIGRATIONS[:2]:
        migration.apply(conn, T)
    for index in T.messages.indexes:
        conn.execute(sa.schema.DropIndex(index, if_exists=True))
        if index.name == "ix_outbox_holding":
            continue  # version 4's
        columns = ", ".join(column.name for column in index.columns)
        conn.execute(sa.text(f"CREATE INDEX {index.name} ON outbox ({columns})"))
    conn.execute(sa.insert(T.meta).values(name="schema_version", value="2"))


@pytest.mark.parametrize("backend", ["postgresql", "mariadb", "sqlite"])
def test_a_v2_database_upgrades_to_the_current_version(backend: str, tmp_path: Any) -> None:
    url, drop = make_database(backend, tmp_path)
    engine = outbox.create_engine(url)
    try:
        with engine.begin() as conn:
            install_v2(conn)
            kept = outbox.add(conn, "kept", {"n": 1}, key="k")
        with engine.begin() as conn:
            assert [m.version for m in outbox.upgrade(conn)] == [3, 4, 5]
        with engine.connect() as conn:
            assert current_version(conn) == SCHEMA_VERSION == 5
            check_version(conn)
            assert conn.execute(sa.select(T.messages.c.id)).scalars().all() == [kept]
            names = {ix["name"] for ix in sa.inspect(conn).get_indexes("outbox")}
            assert names >= PARTIAL
            if backend == "postgresql":
                definitions = index_definitions(conn)
                assert all(" WHERE " in definitions[name] for name in PARTIAL), definitions
                assert "WHERE" not in definitions["uq_outbox_id"]
                assert "(msg_key, seq) WHERE" in definitions["ix_outbox_holding"], definitions
            else:
                assert "ix_outbox_holding" not in names  # PostgreSQL's alone
        with engine.begin() as conn:
            assert outbox.upgrade(conn) == []
    finally:
        engine.dispose()
        drop()


def test_a_fresh_postgresql_database_gets_partial_indexes(tmp_path: Any) -> None:
    url, drop = make_database("postgresql", tmp_path)
    engine = outbox.create_engine(url)
    try:
        with engine.begin() as conn:
            assert [m.version for m in outbox.upgrade(conn)] == [1, 2, 3, 4, 5]
        with engine.connect() as conn:
            definitions = index_definitions(conn)
        assert "WHERE (due_at IS NOT NULL)" in definitions["ix_outbox_due"]
        assert "WHERE ((status)::text <> 'delivered'::text)" in definitions["ix_outbox_status"]
        key_index = definitions["ix_outbox_key"]
        assert "'parked'" in key_index and "'delivered'" not in key_index
        holding_index = definitions["ix_outbox_holding"]
        assert "(msg_key, seq)" in holding_index and "'parked'" in holding_index, holding_index
    finally:
        engine.dispose()
        drop()


_PG_TYPES = {dt.datetime: "timestamp", int: "bigint", str: "text"}


def generic_plan(conn: sa.Connection, statement: Any, params: dict[str, Any]) -> str:
    """EXPLAIN of ``statement`` prepared server-side and planned generically, as psycopg runs it."""
    compiled = statement.compile(dialect=conn.dialect)
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    sql = re.sub(r"%\((\w+)\)s", number, str(compiled))
    values = compiled.construct_params(params)
    driver = conn.connection.driver_connection
    # client-side binding: a utility statement (EXPLAIN EXECUTE) cannot take server-side parameters
    with psycopg.ClientCursor(driver) as cursor:  # type: ignore[arg-type]
        cursor.execute("SET plan_cache_mode = force_generic_plan")
        types = [_PG_TYPES[type(values[name])] for name in names]
        cursor.execute(f"PREPARE planned ({', '.join(types)}) AS {sql}")
        arguments = ", ".join(["%s"] * len(types))
        cursor.execute(f"EXPLAIN EXECUTE planned({arguments})", [values[name] for name in names])
        plan = "\n".join(row[0] for row in cursor.fetchall())
        cursor.execute("DEALLOCATE planned")
    return plan


def test_claim_and_backlog_use_the_partial_indexes_in_generic_plans(tmp_path: Any) -> None:
    url, drop = make_database("postgresql", tmp_path)
    engine = outbox.create_engine(url)
    try:
        with engine.begin() as conn:
            outbox.upgrade(conn)
            rows = [outbox.Outbox().build_row("t", {"i": i}, key=f"k{i % 2500}") for i in range(5000)]
            conn.execute(sa.insert(T.messages), rows)
            # a table as it usually is: mostly delivered history, a little waiting work
            done = {"status": "delivered", "due_at": None, "delivered_at": utcnow()}
            conn.execute(sa.update(T.messages).where(T.messages.c.seq <= 4800).values(done))
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("ANALYZE outbox"))
        claims = ClaimQueries(T, dialect_for(engine))
        now = utcnow()
        params = {"now": now, "limit": 200}
        with engine.begin() as conn:
            claim_plan = generic_plan(conn, claims._scan, params)  # the claim's scan: what it reads
            backlog_plan = generic_plan(conn, backlog_query(T), {"now": now})
            conn.rollback()
        assert "ix_outbox_due" in claim_plan and "ix_outbox_holding" in claim_plan, claim_plan
        # the candidates and the earlier-message probes come from the indexes (the join back to the
        # claimed rows may scan this small table; that is size, not a hidden predicate)
        assert "on outbox c" not in claim_plan.split("Index Scan using ix_outbox_due")[0], claim_plan
        assert "Seq Scan on outbox e" not in claim_plan and "Filter: (((msg_key" not in claim_plan, claim_plan
        # one probe a keyed row, whatever the statuses' statistics (schema version 4)
        assert claim_plan.count("Index Only Scan Backward using ix_outbox_holding") == 1, claim_plan
        assert "ix_outbox_status" not in claim_plan, claim_plan
        assert "ix_outbox_status" in backlog_plan, backlog_plan
    finally:
        engine.dispose()
        drop()


@pytest.mark.parametrize("backend", ["postgresql", "mariadb", "sqlite"])
def test_code_runs_on_a_newer_schema_only_when_every_step_since_was_additive(
    backend: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compatible-upgrade rule: after `outbox db upgrade` by a newer package whose steps were all
    additive, this code's relays still start (and its upgrade is a no-op); after a breaking step they
    refuse, naming the fix; an older schema always needs the upgrade."""
    import outbox._schema as schema

    url, drop = make_database(backend, tmp_path)
    engine = outbox.create_engine(url)
    try:
        with engine.begin() as conn:
            outbox.upgrade(conn)
            meta = {row.name: row.value for row in conn.execute(sa.select(T.meta))}
        assert meta == {"schema_version": str(SCHEMA_VERSION), "compatible_from": "1"}

        def newer(*, additive: bool) -> None:
            step = schema.Migration(SCHEMA_VERSION + 1, "a later step", lambda conn, t: None, additive)
            with monkeypatch.context() as later:  # the next package's upgrade
                later.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, step))
                later.setattr(schema, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
                with engine.begin() as conn:
                    assert [m.version for m in schema.upgrade(conn)] == [SCHEMA_VERSION + 1]

        newer(additive=True)
        with engine.begin() as conn:
            check_version(conn)  # this code still runs
            assert outbox.upgrade(conn) == []
        with engine.begin() as conn:  # back to this version, and a breaking step instead
            conn.execute(
                sa.update(T.meta).where(T.meta.c.name == "schema_version").values(value=str(SCHEMA_VERSION))
            )
        newer(additive=False)
        with engine.begin() as conn:
            with pytest.raises(
                SchemaError, match=r"newer than this code .* can run on: upgrade the outbox package"
            ):
                check_version(conn)
            with pytest.raises(SchemaError, match="upgrade the outbox package"):
                outbox.upgrade(conn)
            conn.execute(sa.update(T.meta).where(T.meta.c.name == "schema_version").values(value="4"))
            with pytest.raises(
                SchemaError, match=r"at schema version 4, this code needs .*run `outbox db upgrade`"
            ):
                check_version(conn)
    finally:
        engine.dispose()
        drop()
