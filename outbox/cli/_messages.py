"""The operator commands: ``outbox status``, ``list``, ``show``, ``replay`` and ``purge``.

Each one opens the database (checking the schema), asks :class:`outbox.admin._operations.Operations`, and
prints either a table for people or, with ``--json``, one JSON document for scripts. The queries and
their guarantees are in :mod:`outbox.admin._operations`; this module only parses options and formats output.
"""

from __future__ import annotations

import datetime as dt
import json
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click

from outbox._schema import Status
from outbox.admin._operations import MessageFilter, MessageRecord, MessageRef, Operations, StatusReport
from outbox.admin._reports import span
from outbox.cli._config import Settings
from outbox.cli._options import duration_option, message_id_option, open_engine, settings_command, time_option

_STATUS_NAMES = [s.value for s in Status]
_json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table."
)


@contextmanager
def _operations(settings: Settings) -> Iterator[Operations]:
    engine = open_engine(settings)
    try:
        yield Operations(engine, settings.table)
    finally:
        engine.dispose()


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _time(value: dt.datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> None:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    click.echo(line(headers))
    for row in rows:
        click.echo(line(row))


def _shorten(text: str | None, width: int = 50) -> str:
    if not text:
        return ""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= width else first[: width - 3] + "..."


# --- status -------------------------------------------------------------------------------------------------


@click.command()
@_json_option
@settings_command()
def status(settings: Settings, as_json: bool) -> None:
    """Counts per status and topic, age of the oldest waiting message, parked keys."""
    with _operations(settings) as ops:
        report = ops.status()
    if as_json:
        _print_json({"table": settings.table, **report.to_dict()})
        return
    _print_status(settings.table, report)


def _print_status(table: str, report: StatusReport) -> None:
    click.echo(f"outbox table {table!r}: {report.total} message(s)")
    for name in _STATUS_NAMES:
        click.echo(f"  {name:<10} {report.counts.get(name, 0):>10}")
    age = report.oldest_waiting_age
    if report.oldest_waiting_at is None or age is None:
        click.echo("oldest waiting: none")
    else:
        click.echo(f"oldest waiting: created {_time(report.oldest_waiting_at)} UTC ({span(age)} ago)")
    click.echo(f"due now: {report.due_now}   expired leases: {report.expired_leases}")
    click.echo(f"parked keys: {report.parked_keys}")
    alive = report.relays_alive
    click.echo(f"relays alive: {len(alive)}")
    for relay in alive:
        progress = (
            "never"
            if relay.progress_at is None
            else f"{span(max(report.now - relay.progress_at, dt.timedelta(0)))} ago"
        )
        click.echo(
            f"  {relay.relay_id}  up {span(max(report.now - relay.started_at, dt.timedelta(0)))}"
            f"  last progress {progress}  delivered {relay.delivered}  failed {relay.failed}"
            f"  dead {relay.dead}  routes {relay.routes}"
        )
    if report.topics:
        click.echo("")
        rows = [
            [topic, *(str(counts.get(s, 0)) for s in _STATUS_NAMES)]
            for topic, counts in report.topics.items()
        ]
        _table(["TOPIC", *(s.upper() for s in _STATUS_NAMES)], rows, right=range(1, len(_STATUS_NAMES) + 1))


# --- list ---------------------------------------------------------------------------------------------------


def _filter_options(func: Any) -> Any:
    for option in reversed(
        [
            click.option(
                "--topic", metavar="TOPIC", help="Only this topic ('*' matches any characters: 'orders.*')."
            ),
            click.option("--key", metavar="KEY", help="Only messages with this key."),
            click.option(
                "--since",
                callback=time_option,
                help="Created at or after: ISO datetime (UTC) or 10m, 2h, 7d ago.",
            ),
            click.option(
                "--until", callback=time_option, help="Created before: ISO datetime (UTC) or 10m, 2h, 7d ago."
            ),
        ]
    ):
        func = option(func)
    return func


@click.command("list")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(_STATUS_NAMES),
    help="Only these statuses (repeatable; dead includes parked).",
)
@_filter_options
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Messages per page.")
@click.option(
    "--after", type=int, metavar="SEQ", help="Next page: messages after this SEQ (as printed last)."
)
@click.option(
    "--order",
    type=click.Choice(["desc", "asc"]),
    default="desc",
    show_default=True,
    help="desc = newest first.",
)
@_json_option
@settings_command()
def list_messages(
    settings: Settings,
    statuses: tuple[str, ...],
    topic: str | None,
    key: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
    limit: int,
    after: int | None,
    order: str,
    as_json: bool,
) -> None:
    """List messages, newest first, with filters and paging (--after SEQ)."""
    where = MessageFilter(tuple(Status(s) for s in statuses), topic, key, since, until)
    with _operations(settings) as ops:
        records = ops.list_messages(
            where, limit=limit, after=after, order="asc" if order == "asc" else "desc"
        )
    if as_json:
        _print_json([r.to_dict() for r in records])
        return
    if not records:
        click.echo("no messages match")
        return
    rows = [
        [
            str(r.seq),
            str(r.id),
            r.status,
            r.topic,
            r.key or "",
            str(r.attempts),
            _time(r.created_at),
            _time(r.due_at),
            _shorten(r.last_error),
        ]
        for r in records
    ]
    _table(
        ["SEQ", "ID", "STATUS", "TOPIC", "KEY", "ATT", "CREATED (UTC)", "DUE (UTC)", "LAST ERROR"],
        rows,
        right=[0, 5],
    )
    if len(records) == limit:
        click.echo(f"(more may follow: add --after {records[-1].seq})")


# --- show ---------------------------------------------------------------------------------------------------


@click.command()
@click.argument("message_id", metavar="SEQ|ID", callback=message_id_option)
@_json_option
@settings_command()
def show(settings: Settings, message_id: MessageRef, as_json: bool) -> None:
    """Everything about one message: status, attempts, times, headers, payload, last error.

    Name the message by its SEQ (the first column of `outbox list`) or its ID (a UUID).
    """
    with _operations(settings) as ops:
        record = ops.get(message_id)
    if as_json:
        _print_json(record.to_dict())
        return
    _print_record(record)


def _print_record(r: MessageRecord) -> None:
    due_label = {
        Status.PENDING.value: "due at",
        Status.FAILED.value: "next attempt at",
        Status.INFLIGHT.value: "lease expires at",
    }.get(r.status, "due at")
    fields = [
        ("id", str(r.id)),
        ("seq", str(r.seq)),
        ("status", r.status),
        ("topic", r.topic),
        ("key", r.key or "-"),
        ("attempts", str(r.attempts)),
        ("created at", f"{_time(r.created_at)} UTC"),
        (due_label, f"{_time(r.due_at)} UTC" if r.due_at else "-"),
        ("last attempt at", f"{_time(r.last_attempt_at)} UTC" if r.last_attempt_at else "-"),
        ("delivered at", f"{_time(r.delivered_at)} UTC" if r.delivered_at else "-"),
        ("content type", r.content_type),
        ("headers", json.dumps(r.headers, ensure_ascii=False) if r.headers else "-"),
    ]
    for label, value in fields:
        click.echo(f"{label + ':':<17} {value}")
    click.echo("payload:")
    value = r.decoded_payload()
    if isinstance(value, bytes):
        preview = value[:64].hex(" ")
        more = " ..." if len(value) > 64 else ""
        click.echo(f"  <{len(value)} bytes> {preview}{more}")
    else:
        click.echo(textwrap.indent(json.dumps(value, indent=2, ensure_ascii=False), "  "))
    click.echo("last error:" + ("" if r.last_error else " -"))
    if r.last_error:
        click.echo(textwrap.indent(r.last_error.rstrip(), "  "))


# --- replay -------------------------------------------------------------------------------------------------


@click.command()
@click.argument("message_ids", metavar="[SEQ|ID]...", nargs=-1, callback=message_id_option)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(["failed", "dead", "parked", "delivered"]),
    help="With a filter: these statuses (default dead, which includes parked).",
)
@_filter_options
@click.option(
    "--all", "select_all", is_flag=True, help="Replay every message of the chosen statuses (no other filter)."
)
@click.option(
    "--include-delivered", is_flag=True, help="Allow replaying delivered messages (delivers them again)."
)
@click.option("--dry-run", is_flag=True, help="Show what would be replayed; change nothing.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Messages per transaction.",
)
@_json_option
@settings_command()
def replay(
    settings: Settings,
    message_ids: tuple[MessageRef, ...],
    statuses: tuple[str, ...],
    topic: str | None,
    key: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
    select_all: bool,
    include_delivered: bool,
    dry_run: bool,
    batch_size: int,
    as_json: bool,
) -> None:
    """Send failed, dead or parked messages back to pending, by SEQ or ID, or by filter.

    A replayed message is due now, with attempts reset to 0 and its last error cleared. Inflight and
    pending messages are never touched; delivered ones only with --include-delivered. Without IDs, a
    filter (--status, --topic, --key, --since, --until) or --all is required.
    """
    filtering = bool(statuses or topic or key or since or until)
    if message_ids and (filtering or select_all):
        raise click.UsageError(
            "give message IDs or a filter (--status, --topic, --key, --since, --until, --all), not both"
        )
    if not message_ids and not filtering and not select_all:
        raise click.UsageError(
            "nothing selected: give message IDs, a filter (--status, --topic, --key, --since, --until) "
            "or --all"
        )
    if "delivered" in statuses and not include_delivered:
        raise click.UsageError(
            "replaying delivered messages delivers them again: add --include-delivered to mean it"
        )
    with _operations(settings) as ops:
        if message_ids:
            result = ops.replay_ids(message_ids, include_delivered=include_delivered, dry_run=dry_run)
        else:
            where = MessageFilter(tuple(Status(s) for s in statuses), topic, key, since, until)
            result = ops.replay_matching(
                where, include_delivered=include_delivered, dry_run=dry_run, batch_size=batch_size
            )
    if as_json:
        _print_json(result.to_dict())
        return
    verb = "would replay" if dry_run else "replayed"
    click.echo(f"{verb} {len(result.replayed)} message(s)")
    for message_id in result.replayed[:20]:
        click.echo(f"  {message_id}")
    if len(result.replayed) > 20:
        click.echo(f"  ... and {len(result.replayed) - 20} more (--json lists them all)")
    for message_id, state in result.skipped:
        why = "in flight: never replayed" if state == Status.INFLIGHT.value else f"{state}: not replayable"
        if state == Status.DELIVERED.value:
            why += " without --include-delivered"
        click.echo(f"skipped {message_id} ({why})", err=True)


# --- purge --------------------------------------------------------------------------------------------------


@click.command()
@click.option(
    "--older-than",
    callback=duration_option,
    help="Required: delete only what is older than this, e.g. 7d, 12h (delivered: since delivery; dead: "
    "since creation; --inbox: since processed).",
)
@click.option(
    "--status",
    "status_name",
    type=click.Choice(["delivered", "dead", "parked"]),
    help="Which finished messages: delivered (default), or dead (with parked, by age since creation), "
    "or parked only.",
)
@click.option("--inbox", is_flag=True, help="Delete the consumer groups' old inbox rows instead of messages.")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=5000, show_default=True, help="Rows per transaction."
)
@_json_option
@settings_command()
def purge(
    settings: Settings,
    older_than: dt.timedelta | None,
    status_name: str | None,
    inbox: bool,
    dry_run: bool,
    batch_size: int,
    as_json: bool,
) -> None:
    """Delete old delivered (or dead) messages, or old inbox rows, in small transactions.

    Never touches unfinished messages. --inbox: a message Kafka delivers again after its inbox row is
    gone is handled again, so keep the rows longer than Kafka keeps records.
    """
    if older_than is None:
        # No default on purpose: a purge deletes, and an age the operator never chose (or none: all of
        # them) is not one it should pick for them; the relays' retention is the automatic one.
        raise click.UsageError(
            "say how old the messages to delete must be: add --older-than AGE, e.g. --older-than 7d "
            "(the relays' default retention)" + ("" if dry_run else "; try it with --dry-run first")
        )
    if inbox and status_name is not None:
        raise click.UsageError("--inbox deletes inbox rows: it takes no --status")
    with _operations(settings) as ops:
        if inbox:
            result = ops.purge_inbox(older_than=older_than, dry_run=dry_run, batch_size=batch_size)
        else:
            status = Status(status_name or "delivered")
            result = ops.purge(older_than=older_than, status=status, dry_run=dry_run, batch_size=batch_size)
    if as_json:
        _print_json(result.to_dict())
        return
    verb = "would delete" if dry_run else "deleted"
    what = "inbox row(s)" if inbox else "/".join(s.value for s in result.statuses) + " message(s)"
    batches = "" if dry_run else f" in {result.batches} batch(es)"
    age = f"older than {span(older_than)} (before {_time(result.cutoff)} UTC)"
    click.echo(f"{verb} {result.count} {what} {age}{batches}")
