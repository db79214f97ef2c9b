"""``outbox consume`` (the Kafka consumer runner) and ``outbox dlq`` (its dead letters).

Commands::

    outbox consume --app MODULE[:ATTR] --group GROUP --kafka-bootstrap-servers HOST:PORT
    outbox dlq list [--group G] [--json]        dead letters, oldest first
    outbox dlq show SEQ [--json]                one dead letter: record, headers, value, error
    outbox dlq replay (SEQ... | --group G | --all) [--dry-run]
                                                send dead letters back to their Kafka topic

Every flag has an ``OUTBOX_*`` environment twin named after it (``--group``: ``OUTBOX_GROUP``,
``--kafka-sasl-password``: ``OUTBOX_KAFKA_SASL_PASSWORD``). The settings ``outbox relay`` also has
(``--app``, ``--max-attempts``, ``--backoff-initial``, ``--backoff-max``, ``--stop-timeout``) and the
Kafka connection (``kafka_bootstrap_servers``, ...) are read from the config file too; the consumer's
own flags (``--group``, ``--session-timeout-ms``, ...) come from flags and environment only. The SASL
password is never printed: it is scrubbed from error lines and kept out of ``repr``.

The consumer code is imported inside the commands: ``outbox`` never imports ``consumers`` at module level.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from outbox.cli_options import SECRETS, F, open_engine, settings_command
from outbox.config import Settings
from outbox.errors import ConfigError, MessageNotFound
from outbox.kafka_settings import SASL_MECHANISMS, SECURITY_PROTOCOLS, KafkaConnection

if TYPE_CHECKING:
    from consumers.dead_letters import DeadLetter

log = logging.getLogger("outbox.cli")

_KAFKA_FLAGS = (
    "kafka_bootstrap_servers",
    "kafka_client_id",
    "kafka_security_protocol",
    "kafka_sasl_mechanism",
    "kafka_sasl_username",
    "kafka_sasl_password",
    "kafka_ssl_cafile",
    "kafka_ssl_certfile",
    "kafka_ssl_keyfile",
)


def _env_option(name: str, kind: Any, help_text: str, **extra: Any) -> Callable[[F], F]:
    env = "OUTBOX_" + name.upper()
    flag = "--" + name.replace("_", "-")
    return click.option(flag, name, type=kind, envvar=env, help=f"{help_text}  [env: {env}]", **extra)


def kafka_options(func: F) -> F:
    """The Kafka connection flags (bootstrap servers, client id, TLS, SASL)."""
    options = [
        _env_option(
            "kafka_bootstrap_servers", str, "Kafka brokers to start from.", metavar="HOST:PORT[,...]"
        ),
        _env_option("kafka_client_id", str, "Client id shown to the brokers."),
        _env_option(
            "kafka_security_protocol", click.Choice(SECURITY_PROTOCOLS), "How to talk to the brokers."
        ),
        _env_option("kafka_sasl_mechanism", click.Choice(SASL_MECHANISMS), "SASL mechanism."),
        _env_option("kafka_sasl_username", str, "SASL user name."),
        _env_option(
            "kafka_sasl_password", str, "SASL password (prefer the environment variable).", metavar="SECRET"
        ),
        _env_option("kafka_ssl_cafile", str, "CA certificates (PEM) to verify the brokers.", metavar="FILE"),
        _env_option("kafka_ssl_certfile", str, "Client certificate (PEM).", metavar="FILE"),
        _env_option("kafka_ssl_keyfile", str, "Client private key (PEM).", metavar="FILE"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _connection_values(kafka: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """``KafkaConnection`` keyword arguments from the ``kafka_*`` flags (ConfigError without servers).

    A flag (or its environment twin) not given falls back to the same key of the config file, when
    :class:`Settings` knows it (the ``kafka_*`` keys ``outbox relay`` reads).
    """
    kafka = {
        name: value if value is not None else getattr(settings, name, None) for name, value in kafka.items()
    }
    for name in ("kafka_security_protocol", "kafka_sasl_mechanism"):
        if isinstance(kafka.get(name), str):
            kafka[name] = kafka[name].upper()
    servers = kafka.get("kafka_bootstrap_servers")
    if not servers:
        raise ConfigError(
            "no Kafka brokers: pass --kafka-bootstrap-servers HOST:PORT or set OUTBOX_KAFKA_BOOTSTRAP_SERVERS"
        )
    password = kafka.get("kafka_sasl_password")
    if password and len(password) >= 4:  # shorter ones would mangle every error line they occur in
        SECRETS.add(password)
    values = {name.removeprefix("kafka_"): value for name, value in kafka.items() if value is not None}
    values["bootstrap_servers"] = values["bootstrap_servers"].strip()
    return values


def _quiet_kafka_logs(settings: Settings) -> None:
    """kafka-python logs every connection step at INFO: keep its WARNING and above unless debugging."""
    if settings.log_level != "DEBUG":
        logging.getLogger("kafka").setLevel(logging.WARNING)


def _split(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    kafka = {k: kwargs.pop(k) for k in _KAFKA_FLAGS}
    return kafka, kwargs


# --- outbox consume ----------------------------------------------------------------------------------------

_CONSUME_SETTINGS = ("app", "max_attempts", "backoff_initial", "backoff_max", "stop_timeout")


@click.command()
@_env_option(
    "app",
    str,
    "Module (and Registry attribute) of the handlers: MODULE or MODULE:ATTR.",
    metavar="MODULE[:ATTR]",
)
@_env_option("group", str, "Kafka consumer group; its inbox and dead letters are kept under this name.")
@kafka_options
@_env_option(
    "session_timeout_ms",
    int,
    "Milliseconds without a heartbeat before the group drops this consumer (default 10000).",
)
@_env_option("max_poll_records", int, "Records fetched per poll, at most (default 100).")
@_env_option(
    "max_poll_interval_ms", int, "Milliseconds one poll batch (retries included) may take (default 300000)."
)
@_env_option(
    "auto_offset_reset",
    click.Choice(("earliest", "latest")),
    "Where a group without committed offsets starts (default earliest).",
)
@_env_option(
    "max_attempts", int, "Attempts before a record is dead-lettered, unless its handler says (default 10)."
)
@_env_option("backoff_initial", float, "Seconds before the first retry, doubling after (default 1).")
@_env_option("backoff_max", float, "Longest wait between retries, in seconds (default 300).")
@_env_option("stop_timeout", float, "Seconds the current handler gets to finish on stop (default 30).")
@settings_command(*_CONSUME_SETTINGS)
def consume(settings: Settings, **options: Any) -> None:
    """Run the handlers of --app on the records of their Kafka topics, as consumer group --group.

    A handler that takes a session runs in one transaction with the group's inbox row: its database
    effect happens once, even when Kafka delivers the record again. Handlers without a session are at
    least once. A record still failing after its last attempt goes to the dead letters (outbox dlq).
    The first SIGTERM/SIGINT finishes the current record, commits offsets and leaves the group (exit
    0); a second one exits at once (status 1).
    """
    kafka, rest = _split(options)
    _quiet_kafka_logs(settings)
    if settings.app is None:
        raise ConfigError("no handlers: pass --app MODULE[:ATTR] or set OUTBOX_APP")
    if not rest["group"]:
        raise ConfigError("no consumer group: pass --group GROUP or set OUTBOX_GROUP")
    from consumers.kafka import ConsumerSettings, KafkaConsumerRunner  # lazily: see the module docstring
    from consumers.registry import load_registry

    consumer_values = {
        name: rest[name]
        for name in ("session_timeout_ms", "max_poll_records", "max_poll_interval_ms", "auto_offset_reset")
        if rest[name] is not None
    }
    consumer_settings = ConsumerSettings(
        **_connection_values(kafka, settings), group=rest["group"], **consumer_values
    )
    registry = load_registry(settings.app)
    engine = open_engine(settings)
    try:
        runner = KafkaConsumerRunner(
            engine,
            registry,
            consumer_settings,
            table=settings.table,
            retry=settings.retry_policy(),
            stop_timeout=settings.stop_timeout,
        )
        _run_until_signalled(runner)
    finally:
        engine.dispose()
    if runner.error is not None:
        raise runner.error  # OutboxError / database error: one line; anything else: a bug


def _run_until_signalled(runner: Any) -> None:
    stop_requested = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop_requested.is_set():
            os.write(
                2, f"outbox: second {name}: exiting now; the current record will be read again\n".encode()
            )
            os._exit(1)  # RET_ERROR
        received.append(name)
        stop_requested.set()

    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    try:
        runner.start()
        while not stop_requested.wait(0.5):
            if not runner.running:
                break
        if received:
            log.info("%s received: stopping after the current record (again to exit at once)", received[0])
        runner.stop()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --- outbox dlq --------------------------------------------------------------------------------------------


@click.group()
def dlq() -> None:
    """Inspect and replay the dead letters of `outbox consume`."""


_json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table."
)


def _letters(settings: Settings, fn: Callable[[Any, Any], Any]) -> Any:
    """Run ``fn(dead_letters, conn)`` on the configured database."""
    from consumers.dead_letters import DeadLetters
    from outbox.schema import tables_for

    engine = open_engine(settings)
    try:
        with engine.begin() as conn:
            return fn(DeadLetters(tables_for(settings.table)), conn)
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
    letters = _letters(
        settings, lambda dl, conn: dl.find(conn, group=group, include_replayed=not pending, limit=limit)
    )
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
    letter = _letters(settings, lambda dl, conn: dl.get(conn, seq))
    if letter is None:
        raise MessageNotFound(f"no dead letter with seq {seq}")
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
@kafka_options
@settings_command()
def dlq_replay(
    settings: Settings,
    seqs: tuple[int, ...],
    group: str | None,
    select_all: bool,
    dry_run: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Send dead letters back to their Kafka topic, with their key, value and headers.

    Give SEQs (replayed again even if they were before), or --group G / --all for those not replayed
    yet. Groups whose inbox has the message skip it; the group that failed handles it again.
    """
    kafka, _ = _split(options)
    _quiet_kafka_logs(settings)
    if seqs and (group or select_all):
        raise click.UsageError("give SEQs, or --group / --all, not both")
    if not seqs and not group and not select_all:
        raise click.UsageError("say what to replay: SEQs, --group GROUP or --all")
    connection = None
    if not dry_run:
        connection = KafkaConnection(
            **{"client_id": "outbox-dlq-replay", **_connection_values(kafka, settings)}
        )
    from consumers.dead_letters import BrokerError, republish
    from outbox.writer import utcnow

    def select(dl: Any, conn: Any) -> list[DeadLetter]:
        if seqs:
            found: list[DeadLetter] = dl.find(conn, seqs=seqs)
            missing = sorted(set(seqs) - {letter.seq for letter in found})
            if missing:
                raise MessageNotFound(f"no dead letter with seq {', '.join(map(str, missing))}")
            return found
        return list(dl.find(conn, group=group, include_replayed=False))

    letters = _letters(settings, select)
    failed: list[tuple[DeadLetter, str]] = []
    if not dry_run and letters:
        assert connection is not None
        sent, failed = republish(letters, connection)
        if sent:
            _letters(settings, lambda dl, conn: dl.mark_replayed(conn, [s.seq for s in sent], at=utcnow()))
        letters = sent
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
