"""``outbox dlq``: the dead letters of ``outbox consume``, listed, shown and replayed.

Commands::

    outbox dlq list [--group G] [--json]        dead letters, oldest first
    outbox dlq show SEQ [--json]                one dead letter: record, headers, value, error
    outbox dlq replay (SEQ... | --group G | --all) [--dry-run]
                                                send dead letters back to their Kafka topic

``replay`` takes the Kafka connection flags of ``outbox consume``
(:func:`outbox.cli._options.kafka_connection_flags`).
The consumer code is imported inside the commands: ``outbox`` never imports ``consumers`` at module level.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from outbox._errors import BrokerError
from outbox._runtime.kafka_settings import KafkaConnection
from outbox.admin import Operations
from outbox.cli._config import Settings
from outbox.cli._consume import connection_values, quiet_kafka_logs
from outbox.cli._options import KAFKA_CONNECTION_NAMES, kafka_connection_flags, open_engine, settings_command

if TYPE_CHECKING:
    from consumers._dead_letters import DeadLetter


@click.group()
def dlq() -> None:
    """Inspect and replay the dead letters of `outbox consume`."""


_json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table."
)


def _letters(settings: Settings, fn: Callable[[Operations], Any]) -> Any:
    """Run ``fn(operations)`` on the configured database (the operator layer, as the dashboard)."""
    engine = open_engine(settings)
    try:
        return fn(Operations(engine, settings.table))
    finally:
        engine.dispose()


def _where(letter: DeadLetter) -> str:
    return f"{letter.kafka_topic}[{letter.partition}]@{letter.offset}"


def _short(text: str, width: int = 60) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= width else first[: width - 3] + "..."


@dlq.command("list")
@click.option("--group", help="Only this consumer group's dead letters.")
@click.option("--pending", is_flag=True, help="Only dead letters never replayed.")
@click.option(
    "--limit", type=click.IntRange(min=1), default=100, show_default=True, help="At most this many."
)
@_json_option
@settings_command()
def dlq_list(settings: Settings, group: str | None, pending: bool, limit: int, as_json: bool) -> None:
    """List dead letters, oldest first."""
    letters = _letters(settings, lambda ops: ops.dead_letters(group=group, pending=pending, limit=limit))
    if as_json:
        click.echo(json.dumps([letter.to_dict() for letter in letters], indent=2, ensure_ascii=False))
        return
    if not letters:
        click.echo("no dead letters")
        return
    rows = [
        [
            str(letter.seq),
            letter.consumer_group,
            _where(letter),
            letter.key or "-",
            str(letter.attempts),
            letter.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            "-" if letter.replayed_at is None else letter.replayed_at.strftime("%Y-%m-%d %H:%M:%S"),
            _short(letter.error),
        ]
        for letter in letters
    ]
    headers = ["SEQ", "GROUP", "RECORD", "KEY", "ATTEMPTS", "DEAD-LETTERED", "REPLAYED", "ERROR"]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for cells in [headers, *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())


@dlq.command("show")
@click.argument("seq", type=int)
@_json_option
@settings_command()
def dlq_show(settings: Settings, seq: int, as_json: bool) -> None:
    """Everything about one dead letter: the record, its headers and value, the error."""
    letter = _letters(settings, lambda ops: ops.dead_letter(seq))
    entry = letter.to_dict(with_value=True)
    if as_json:
        click.echo(json.dumps(entry, indent=2, ensure_ascii=False))
        return
    for name in ("seq", "group", "topic", "partition", "offset", "message_id", "key", "attempts"):
        click.echo(f"{name + ':':<17} {'-' if entry[name] is None else entry[name]}")
    click.echo(f"{'dead-lettered:':<17} {entry['dead_lettered_at']}")
    click.echo(f"{'replayed:':<17} {entry['replayed_at'] or '-'}")
    click.echo("headers:")
    for name, value in entry["headers"]:
        click.echo(f"  {name}: {value}")
    click.echo(f"value:\n  {entry['value'] if entry['value'] is not None else '(none: tombstone)'}")
    click.echo(f"error:\n  {letter.error}")


@dlq.command("replay")
@click.argument("seqs", nargs=-1, type=int, metavar="[SEQ]...")
@click.option("--group", help="Replay this consumer group's dead letters not replayed yet.")
@click.option(
    "--all", "select_all", is_flag=True, help="Replay every dead letter not replayed yet (any group)."
)
@click.option("--dry-run", is_flag=True, help="Show what would be replayed; send nothing.")
@_json_option
@kafka_connection_flags()
@settings_command(*KAFKA_CONNECTION_NAMES)
def dlq_replay(
    settings: Settings,
    seqs: tuple[int, ...],
    group: str | None,
    select_all: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Send dead letters back to their Kafka topic, with their key, value and headers.

    Give SEQs (replayed again even if they were before), or --group G / --all for those not replayed
    yet. Groups whose inbox has the message skip it; the group that failed handles it again.
    """
    quiet_kafka_logs(settings)
    if seqs and (group or select_all):
        raise click.UsageError("give SEQs, or --group / --all, not both")
    if not seqs and not group and not select_all:
        raise click.UsageError("say what to replay: SEQs, --group GROUP or --all")
    connection = None
    if not dry_run:
        connection = KafkaConnection(**{"client_id": "outbox-dlq-replay", **connection_values(settings)})
    result = _letters(
        settings,
        lambda ops: ops.replay_dead_letters(
            connection, seqs=seqs, group=group, everything=select_all, dry_run=dry_run
        ),
    )
    letters, failed = list(result.replayed), list(result.failed)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "dry_run": dry_run,
                    "replayed": [letter.seq for letter in letters],
                    "failed": [{"seq": letter.seq, "error": why} for letter, why in failed],
                }
            )
        )
    else:
        verb = "would replay" if dry_run else "replayed"
        click.echo(f"{verb} {len(letters)} dead letter(s)")
        for letter in letters[:20]:
            click.echo(
                f"  {letter.seq}  {letter.consumer_group}  {_where(letter)}  {letter.message_id or '-'}"
            )
        if len(letters) > 20:
            click.echo(f"  ... and {len(letters) - 20} more (--json lists them all)")
    if failed:
        letter, why = failed[0]
        raise BrokerError(
            f"{len(failed)} dead letter(s) could not be sent to Kafka (seq {letter.seq}: {why})"
        )
