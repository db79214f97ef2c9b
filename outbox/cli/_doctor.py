"""``outbox doctor``: run the checks of :mod:`outbox.admin._doctor` and print what they found, with fixes.

Exit codes: 0 when every check is ok; 1 when any check warns or fails (the output says which, and what
to do); 4 when the database cannot be reached at all (the report then has that one finding).
"""

from __future__ import annotations

import json

import click

from outbox._dialects import create_engine
from outbox.admin._doctor import Thresholds, diagnose, format_report
from outbox.cli._config import Settings
from outbox.cli._options import settings_command
from outbox.redaction import scrub

#: some check warned or failed
RET_PROBLEMS = 1
#: the database did not answer (same code as every other command's "unreachable")
RET_UNREACHABLE = 4


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON for scripts.")
@click.option(
    "--lease-seconds",
    "lease_seconds",
    type=float,
    envvar="OUTBOX_LEASE_SECONDS",
    help="The relays' lease, in seconds: clock skew past a third of it fails (default 30).  "
    "[env: OUTBOX_LEASE_SECONDS]",
)
@click.option(
    "--long-transaction-seconds",
    type=float,
    default=300.0,
    show_default=True,
    help="Warn about transactions open longer than this.",
)
@click.option(
    "--bloat-ratio",
    type=float,
    default=0.2,
    show_default=True,
    help="Warn when dead rows (PostgreSQL) or free space (MariaDB, SQLite) exceed this share of the table.",
)
@click.option(
    "--bloat-min-dead-rows",
    type=int,
    default=10_000,
    show_default=True,
    help="... and at least this many dead rows.",
)
@click.option(
    "--bloat-min-free-bytes",
    type=int,
    default=64 * 1024 * 1024,
    show_default=True,
    help="... or at least this many free bytes.",
)
@click.option(
    "--stuck-lease-grace",
    type=float,
    default=60.0,
    show_default=True,
    help="Fail when a message is still in flight this many seconds after its lease expired.",
)
@click.option(
    "--clock-offset",
    type=float,
    default=0.0,
    metavar="SECONDS",
    help="Diagnostic knob: pretend this host's clock is SECONDS ahead (negative: behind), to see what "
    "a skewed relay host would be told.",
)
@settings_command("lease_seconds")
def doctor(
    settings: Settings,
    as_json: bool,
    long_transaction_seconds: float,
    bloat_ratio: float,
    bloat_min_dead_rows: int,
    bloat_min_free_bytes: int,
    stuck_lease_grace: float,
    clock_offset: float,
) -> None:
    """Check the outbox's database and explain each problem with its fix.

    Checks: the database answers; the schema version, tables, columns and indexes match this version;
    (PostgreSQL) LISTEN/NOTIFY works and no transaction-mode pooler drops it; long-running transactions;
    dead-row bloat; clock skew between this host and the database; messages stuck in flight under
    expired leases. Exit 0 when all is well, 1 when something warns or fails, 4 when the database
    cannot be reached.
    """
    thresholds = Thresholds(
        lease_seconds=settings.lease_seconds,
        long_transaction_seconds=long_transaction_seconds,
        bloat_ratio=bloat_ratio,
        bloat_min_dead_rows=bloat_min_dead_rows,
        bloat_min_free_bytes=bloat_min_free_bytes,
        stuck_lease_grace_seconds=stuck_lease_grace,
    )
    engine = create_engine(settings.database_url, must_exist=True)
    try:
        report = diagnose(engine, settings.table, thresholds=thresholds, clock_offset=clock_offset)
    finally:
        engine.dispose()
    # The URL is masked and driver errors scrubbed where the findings are made; scrubbing the whole
    # report again is the second guard (outbox.redaction): a doctor's report carries no user data.
    if as_json:
        click.echo(scrub(json.dumps(report.to_dict(), indent=2, ensure_ascii=False)))
    else:
        click.echo(scrub(format_report(report)))
    if not report.reachable:
        click.get_current_context().exit(RET_UNREACHABLE)
    if not report.ok:
        click.get_current_context().exit(RET_PROBLEMS)
