"""``outbox doctor``: check the database an outbox runs on, and say how to fix what is wrong.

:func:`diagnose` runs the checks below on one outbox table and returns a :class:`DoctorReport`: one
:class:`Finding` per check, each with its status (``ok``, ``warn``, ``fail``), what was found, and
what to do about it. ``warn`` means degraded or heading for trouble; ``fail`` means broken now.

==================  =============================================================================
check               what it looks at
==================  =============================================================================
database            the database answers (nothing else runs without it)
schema_version      the installed migrations are the ones this code needs
tables              every table and column of :mod:`outbox._schema` exists
indexes             every index and unique constraint exists, on the right columns
listen              PostgreSQL: a LISTEN/NOTIFY round trip works, and no transaction-mode pooler
                    (PgBouncer) sits in between: it would drop the relays' wake-ups
long_transactions   transactions open longer than a threshold: they hold back VACUUM (PostgreSQL)
                    or the purge of old row versions (InnoDB), so the table bloats
bloat               dead rows (PostgreSQL), free space (MariaDB) or free pages (SQLite) in the table
clock_skew          this host's clock against the database's: relays' lease times come from their
                    own clocks, so hosts must agree (``docs/guarantees.md``, "Clocks")
stuck_leases        messages in flight under a lease that expired long ago: no relay takes them back
==================  =============================================================================

Database-specific SQL sits in one table, :data:`outbox.admin._probes.PROBES`, one entry per database
family; a check a family cannot have (LISTEN on MariaDB) is simply not run there. The checks that read
the outbox table itself (indexes, bloat, stuck leases) are not run while it is missing.

``clock_offset`` pretends this host's clock is that many seconds off. It is a diagnostic and test knob
(``outbox doctor --clock-offset 5`` shows what a skewed relay host would see), not a correction.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import sqlalchemy as sa

from outbox._dialects import dialect_for
from outbox._errors import first_line
from outbox._schema import (
    DEFAULT_TABLE,
    SCHEMA_VERSION,
    OutboxTables,
    Status,
    current_version,
    index_applies,
    tables_for,
)
from outbox.admin._probes import PROBES, Probes
from outbox.redaction import mask_url, scrub


class Level(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Finding:
    """The result of one check: ``found`` says what, ``fix`` what to do (``None`` when ok)."""

    check: str
    status: Level
    found: str
    fix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "status": self.status.value, "found": self.found, "fix": self.fix}


@dataclass(frozen=True)
class DoctorReport:
    table: str
    database: str
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        """Every check passed (``outbox doctor`` exits 0 exactly then)."""
        return all(f.status is Level.OK for f in self.findings)

    @property
    def reachable(self) -> bool:
        return not any(f.check == "database" and f.status is Level.FAIL for f in self.findings)

    def get(self, check: str) -> Finding | None:
        return next((f for f in self.findings if f.check == check), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "database": self.database,
            "ok": self.ok,
            "findings": [f.to_dict() for f in self.findings],
        }


@dataclass(frozen=True)
class Thresholds:
    """When a check warns or fails. ``lease_seconds`` is the relays' (``--lease-seconds``)."""

    lease_seconds: float = 30.0
    long_transaction_seconds: float = 300.0
    #: warn when dead rows / free space exceed this share of the table, and the minimum below
    bloat_ratio: float = 0.2
    bloat_min_dead_rows: int = 10_000  # PostgreSQL
    bloat_min_free_bytes: int = 64 * 1024 * 1024  # MariaDB, SQLite
    clock_warn_seconds: float = 2.0
    #: in flight this long past the lease expiry: no relay is taking it back
    stuck_lease_grace_seconds: float = 60.0
    listen_timeout_seconds: float = 5.0


@dataclass(frozen=True)
class _Context:
    engine: sa.Engine
    tables: OutboxTables
    probes: Probes
    limits: Thresholds
    clock_offset: float

    def now(self) -> dt.datetime:
        """This host's naive-UTC clock, shifted by the ``clock_offset`` knob."""
        return dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(seconds=self.clock_offset)


def diagnose(
    engine: sa.Engine,
    table: str = DEFAULT_TABLE,
    *,
    thresholds: Thresholds | None = None,
    clock_offset: float = 0.0,
) -> DoctorReport:
    """Run every check that applies to this database on outbox ``table``."""
    probes = PROBES[dialect_for(engine)]
    where = mask_url(engine.url)
    try:
        with engine.connect() as conn:
            server = conn.execute(sa.text(probes.version_sql)).scalar()
            has_messages = sa.inspect(conn).has_table(tables_for(table).messages.name)
    except sa.exc.DBAPIError as exc:
        found = Finding(
            "database",
            Level.FAIL,
            f"cannot connect to {where}: {scrub(first_line(exc.orig or exc))}",
            "check the URL, the network and the server; nothing else can be checked until it answers",
        )
        return DoctorReport(table, where, (found,))
    ctx = _Context(engine, tables_for(table), probes, thresholds or Thresholds(), clock_offset)
    findings = [Finding("database", Level.OK, f"{probes.label} {server} at {where}")]
    checks: list[tuple[str, Callable[[_Context], Finding]]] = [
        ("schema_version", _schema_version),
        ("tables", _tables),
    ]
    if has_messages:  # without the table, the tables check says all there is to say
        checks.append(("indexes", _indexes))
    if probes.listen is not None:
        checks.append(("listen", _listen))
    if probes.long_transactions is not None:
        checks.append(("long_transactions", _long_transactions))
    if has_messages:
        checks.append(("bloat", _bloat))
    checks.append(("clock_skew", _clock_skew))
    if has_messages:
        checks.append(("stuck_leases", _stuck_leases))
    for name, check in checks:
        try:
            findings.append(check(ctx))
        except sa.exc.DBAPIError as exc:  # no privilege to read a system view, a table dropped meanwhile
            findings.append(
                Finding(
                    name,
                    Level.WARN,
                    f"could not run this check: {scrub(first_line(exc.orig or exc))}",
                    "run `outbox doctor` as a user that can read the database's statistics views",
                )
            )
    return DoctorReport(table, where, tuple(findings))


# --- schema -------------------------------------------------------------------------------------------


def _schema_version(ctx: _Context) -> Finding:
    t = ctx.tables
    with ctx.engine.connect() as conn:
        installed = current_version(conn, t.name)
    if installed == SCHEMA_VERSION:
        return Finding("schema_version", Level.OK, f"schema version {installed}, as this code needs")
    if installed == 0:
        return Finding(
            "schema_version",
            Level.FAIL,
            f"outbox {t.name!r} is not installed (no version in {t.meta.name})",
            "run `outbox db upgrade`",
        )
    if installed < SCHEMA_VERSION:
        return Finding(
            "schema_version",
            Level.FAIL,
            f"schema version {installed} is installed, this code needs {SCHEMA_VERSION}",
            "run `outbox db upgrade` (relays of this version refuse to start until then)",
        )
    return Finding(
        "schema_version",
        Level.FAIL,
        f"schema version {installed} is installed, newer than this code ({SCHEMA_VERSION})",
        "upgrade the outbox package where this runs (relays and CLI) to the version that migrated it",
    )


def _recreate_hint(ctx: _Context) -> str:
    t = ctx.tables
    with ctx.engine.connect() as conn:
        current = current_version(conn, t.name) == SCHEMA_VERSION
    if not current:
        return "run `outbox db upgrade`, which creates them"
    return (
        "the schema version says current, so `outbox db upgrade` will not recreate it: create what is "
        f"missing with `outbox.metadata_for({t.name!r}).create_all(engine)` (it skips what exists), "
        "or restore it from a backup"
    )


def _tables(ctx: _Context) -> Finding:
    t = ctx.tables
    inspector = sa.inspect(ctx.engine)
    missing: list[str] = []
    columns: list[str] = []
    for table in t.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            missing.append(table.name)
            continue
        present = {c["name"].lower() for c in inspector.get_columns(table.name)}
        columns += [f"{table.name}.{c.name}" for c in table.columns if c.name.lower() not in present]
    if missing:
        return Finding("tables", Level.FAIL, f"missing table(s): {', '.join(missing)}", _recreate_hint(ctx))
    if columns:
        return Finding(
            "tables",
            Level.FAIL,
            f"missing column(s): {', '.join(columns)}",
            "the tables were changed by hand or by another tool: restore them from the definitions in "
            "outbox._schema (ALTER TABLE ... ADD COLUMN), or from a backup",
        )
    names = ", ".join(table.name for table in t.metadata.sorted_tables)
    return Finding("tables", Level.OK, f"all tables and columns present ({names})")


def _indexes(ctx: _Context) -> Finding:
    engine, t = ctx.engine, ctx.tables
    inspector = sa.inspect(engine)
    problems: list[str] = []
    fixes: list[str] = []
    checked = 0
    for table in t.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue  # reported by the tables check
        found: dict[str, list[str]] = {}
        for ix in inspector.get_indexes(table.name):
            found[str(ix["name"]).lower()] = [str(c).lower() for c in ix["column_names"]]
        for uq in inspector.get_unique_constraints(table.name):
            found.setdefault(str(uq["name"]).lower(), [str(c).lower() for c in uq["column_names"]])
        prep = engine.dialect.identifier_preparer
        expected: list[tuple[str, list[str], str]] = [
            (
                str(index.name),
                [c.name.lower() for c in index.columns],
                _ddl(engine, sa.schema.CreateIndex(index)),
            )
            for index in table.indexes
            if index_applies(index, engine.dialect.name)
        ]
        # A unique constraint is put back as a unique index: the same guarantee, and SQLite cannot ALTER
        # TABLE ... ADD CONSTRAINT. (No sa.schema.AddConstraint here: building one changes the Table so
        # that later CREATE TABLEs leave the constraint out.)
        expected += [
            (
                str(uq.name),
                [c.name.lower() for c in uq.columns],
                f"CREATE UNIQUE INDEX {prep.quote(str(uq.name))} ON {prep.format_table(table)} "
                f"({', '.join(prep.quote(c.name) for c in uq.columns)})",
            )
            for uq in table.constraints
            if isinstance(uq, sa.UniqueConstraint)
        ]
        for name, cols, create in expected:
            checked += 1
            have = found.get(name.lower())
            if have is None:
                problems.append(f"{name} on {table.name}({', '.join(cols)}) is missing")
                fixes.append(create)
            elif have != cols:
                problems.append(
                    f"{name} on {table.name} covers ({', '.join(have)}), expected ({', '.join(cols)})"
                )
                fixes.append(f"drop {name}, then {create}")
    if problems:
        return Finding("indexes", Level.FAIL, "; ".join(problems), "run: " + "; ".join(fixes))
    return Finding("indexes", Level.OK, f"all {checked} indexes and unique constraints present")


def _ddl(engine: sa.Engine, statement: Any) -> str:
    return " ".join(str(statement.compile(dialect=engine.dialect)).split())


# --- activity and storage -----------------------------------------------------------------------------


def _listen(ctx: _Context) -> Finding:
    assert ctx.probes.listen is not None
    timeout = ctx.limits.listen_timeout_seconds
    result = ctx.probes.listen(ctx.engine, timeout)
    pooler_fix = (
        "point relays at PostgreSQL itself or at a session-mode pool: a transaction-mode pooler such as "
        "PgBouncer (pool_mode = transaction) drops LISTEN/NOTIFY, so relays in other processes only see "
        "new messages at their --poll-interval"
    )
    signs = "; ".join(result.pooler_signs)
    if not result.heard:
        return Finding(
            "listen",
            Level.WARN,
            f"a NOTIFY on {result.channel} did not arrive within {timeout:g}s"
            + (f" ({signs})" if signs else ""),
            pooler_fix,
        )
    if signs:
        return Finding(
            "listen",
            Level.WARN,
            f"LISTEN/NOTIFY answered, but a transaction-mode pooler seems to be in between: {signs}",
            pooler_fix,
        )
    return Finding(
        "listen",
        Level.OK,
        f"a NOTIFY reached a LISTEN on another connection in {result.seconds * 1000:.0f} ms; no pooler "
        "detected (a transaction-mode pooler such as PgBouncer would drop notifications: keep relays on "
        "a direct or session-mode connection)",
    )


def _long_transactions(ctx: _Context) -> Finding:
    probe, limits = ctx.probes.long_transactions, ctx.limits
    assert probe is not None
    with ctx.engine.connect() as conn:
        found = probe(conn, limits.long_transaction_seconds)
    if not found:
        return Finding(
            "long_transactions",
            Level.OK,
            f"no transaction open longer than {limits.long_transaction_seconds:g}s",
        )
    shown = "; ".join(
        f"{tx.ident}: {tx.seconds:.0f}s, {tx.state or '?'}, {tx.query[:80]!r}" for tx in found[:5]
    )
    kill = ctx.probes.kill_hint
    return Finding(
        "long_transactions",
        Level.WARN,
        f"{len(found)} transaction(s) open longer than {limits.long_transaction_seconds:g}s, holding "
        f"back the clean-up of old row versions (the outbox table bloats meanwhile): {shown}",
        f"end them ({kill}), and fix the code that leaves transactions open (idle in transaction)",
    )


def _bloat(ctx: _Context) -> Finding:
    t, probes, limits = ctx.tables, ctx.probes, ctx.limits
    with ctx.engine.connect() as conn:
        bloat = probes.bloat(conn, t.messages.name)
    if bloat is None:
        return Finding("bloat", Level.OK, f"no statistics for {t.messages.name} yet")
    total = bloat.dead + bloat.live
    share = bloat.dead / total if total else 0.0
    minimum = limits.bloat_min_dead_rows if bloat.unit == "rows" else limits.bloat_min_free_bytes
    what = "dead rows" if bloat.unit == "rows" else "free bytes"
    text = f"{bloat.dead} {what} in {t.messages.name} ({share:.0%} of {total} {bloat.unit})"
    if bloat.dead >= minimum and share > limits.bloat_ratio:
        return Finding("bloat", Level.WARN, text, probes.bloat_fix.format(table=t.messages.name))
    return Finding("bloat", Level.OK, text)


def _clock_skew(ctx: _Context) -> Finding:
    probes, limits = ctx.probes, ctx.limits
    if probes.server_epoch is None:
        return Finding(
            "clock_skew",
            Level.OK,
            "SQLite has no server clock: relays and writers use their own (keep hosts NTP-synchronised)",
        )
    with ctx.engine.connect() as conn:
        before = time.time()
        server = float(conn.execute(sa.text(probes.server_epoch)).scalar_one())
        after = time.time()
    local = (before + after) / 2 + ctx.clock_offset
    skew = local - server
    uncertainty = (after - before) / 2
    apparent = max(0.0, abs(skew) - uncertainty)
    direction = "ahead of" if skew > 0 else "behind"
    text = f"this host's clock is {abs(skew):.3f}s {direction} the database's (+/- {uncertainty:.3f}s)"
    fix = (
        "synchronise this host's clock (NTP: chrony or systemd-timesyncd); relays whose clocks differ by "
        f"more than the lease ({limits.lease_seconds:g}s) take over live leases and deliver twice"
    )
    if apparent > limits.lease_seconds / 3:
        return Finding("clock_skew", Level.FAIL, f"{text}: more than a third of the lease", fix)
    if apparent > limits.clock_warn_seconds:
        return Finding("clock_skew", Level.WARN, f"{text}: more than {limits.clock_warn_seconds:g}s", fix)
    return Finding("clock_skew", Level.OK, text)


def _stuck_leases(ctx: _Context) -> Finding:
    m, limits = ctx.tables.messages, ctx.limits
    now = ctx.now()
    cutoff = now - dt.timedelta(seconds=limits.stuck_lease_grace_seconds)
    stuck = (m.c.status == Status.INFLIGHT.value, m.c.due_at < cutoff)
    with ctx.engine.connect() as conn:
        count, oldest = conn.execute(sa.select(sa.func.count(), sa.func.min(m.c.due_at)).where(*stuck)).one()
        ids = list(conn.execute(sa.select(m.c.id).where(*stuck).order_by(m.c.due_at).limit(5)).scalars())
    if not count:
        return Finding(
            "stuck_leases",
            Level.OK,
            f"no message in flight past its lease by more than {limits.stuck_lease_grace_seconds:g}s",
        )
    late = (now - oldest).total_seconds()
    more = f" and {count - len(ids)} more" if count > len(ids) else ""
    return Finding(
        "stuck_leases",
        Level.FAIL,
        f"{count} message(s) in flight under a lease that expired up to {late:.0f}s ago and no relay has "
        f"taken them back: {', '.join(str(i) for i in ids)}{more}",
        "start a relay (`outbox relay`): relays take expired leases back by themselves; if relays run, "
        "look in their logs for database errors, and check that they are not all at --max-in-flight",
    )


def format_report(report: DoctorReport) -> str:
    """The report for people: one line per check, its fix indented under it, and a summary."""
    lines = []
    for f in report.findings:
        lines.append(f"{f.status.value.upper():<5} {f.check:<18} {f.found}")
        if f.fix:
            lines.append(f"{'':<24} fix: {f.fix}")
    counts = {level: sum(1 for f in report.findings if f.status is level) for level in Level}
    lines.append(
        f"{counts[Level.FAIL]} failed, {counts[Level.WARN]} warning(s), {counts[Level.OK]} ok "
        f"(outbox table {report.table!r})"
    )
    return "\n".join(lines)
