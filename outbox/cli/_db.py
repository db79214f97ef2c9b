"""``outbox db upgrade`` and ``outbox db version``: create and migrate the outbox tables."""

from __future__ import annotations

import json

import click

from outbox._errors import SchemaError
from outbox._schema import SCHEMA_VERSION, check_version, current_version, upgrade
from outbox.cli._config import Settings
from outbox.cli._options import open_engine, settings_command


@click.group()
def db() -> None:
    """Create and migrate the outbox tables."""


@db.command("upgrade")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@settings_command()
def db_upgrade(settings: Settings, as_json: bool) -> None:
    """Apply the schema migrations this version needs (creates the tables on first run)."""
    engine = open_engine(settings, check_schema=False)
    try:
        with engine.begin() as conn:
            applied = upgrade(conn, settings.table)
    finally:
        engine.dispose()
    if as_json:
        steps = [{"version": m.version, "description": m.description} for m in applied]
        click.echo(json.dumps({"table": settings.table, "applied": steps, "version": SCHEMA_VERSION}))
        return
    if not applied:
        click.echo(f"outbox table {settings.table!r} is already at version {SCHEMA_VERSION}")
        return
    for migration in applied:
        click.echo(f"applied migration {migration.version}: {migration.description}")
    click.echo(f"outbox table {settings.table!r} is now at version {SCHEMA_VERSION}")


@db.command("version")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--check", is_flag=True, help="Exit 5 unless the installed schema is the one this code needs.")
@settings_command()
def db_version(settings: Settings, as_json: bool, check: bool) -> None:
    """Show the installed schema version and the one this code needs."""
    engine = open_engine(settings, check_schema=False)
    problem: SchemaError | None = None
    try:
        with engine.connect() as conn:
            installed = current_version(conn, settings.table)
            try:
                check_version(conn, settings.table)
            except SchemaError as exc:
                problem = exc
    finally:
        engine.dispose()
    if as_json:
        click.echo(json.dumps({"table": settings.table, "installed": installed, "code": SCHEMA_VERSION}))
    else:
        click.echo(f"installed: {installed}\ncode:      {SCHEMA_VERSION}")
    if check and problem is not None:
        raise problem
