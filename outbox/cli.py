"""The ``outbox`` command: run the relay, manage the schema, inspect and operate the outbox.

Commands::

    outbox relay --app MODULE[:ATTR]    deliver messages to the handlers registered in MODULE
    outbox db upgrade | db version      apply / show schema migrations
    outbox status | list | show ID      what is in the outbox, and why     (outbox.cli_inspect)
    outbox replay | purge               send messages back / delete old ones (outbox.cli_inspect)
    outbox doctor                       check the database and explain each fix (outbox.cli_doctor)

Every flag has an ``OUTBOX_*`` environment twin and a config-file key (see :mod:`outbox.config`).

Errors never print a traceback for a user mistake: each :class:`~outbox.errors.OutboxError`, usage error
or database error becomes one line ``outbox: error: <message>`` on stderr (database passwords masked)
and one of the exit codes below. Only a bug (any other exception) prints its traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import click
import sqlalchemy as sa

from outbox.cli_doctor import doctor
from outbox.cli_inspect import list_messages, purge, replay, show, status
from outbox.cli_options import (
    StopSignals,
    env_option,
    kafka_connection_flags,
    open_engine,
    scrub,
    settings_command,
    shared_options,
)
from outbox.config import Settings
from outbox.dialects import is_outage
from outbox.errors import (
    ConfigError,
    DatabaseUnavailable,
    MessageNotFound,
    OutboxError,
    RelayConflict,
    SchemaError,
    first_line,
)
from outbox.schema import SCHEMA_VERSION, check_version, current_version, upgrade

#: success (also: the relay stopped gracefully on SIGTERM/SIGINT)
RET_OK = 0
#: an unexpected error (a bug: its traceback is printed), or a database error that is not an outage
RET_ERROR = 1
#: bad command line: unknown option, invalid value (click's usage errors)
RET_USAGE = 2
#: bad configuration: settings, config file, database URL, --app
RET_CONFIG = 3
#: the database cannot be reached
RET_CONNECT = 4
#: the outbox tables are missing or at another schema version (run ``outbox db upgrade``)
RET_SCHEMA = 5
#: another relay holds the SQLite database
RET_CONFLICT = 6
#: no message has the given id
RET_NOT_FOUND = 7

_EXIT_CODES: tuple[tuple[type[OutboxError], int], ...] = (
    (ConfigError, RET_CONFIG),
    (DatabaseUnavailable, RET_CONNECT),
    (SchemaError, RET_SCHEMA),
    (RelayConflict, RET_CONFLICT),
    (MessageNotFound, RET_NOT_FOUND),
)

log = logging.getLogger("outbox.cli")

# click >= 8.2 raises this usage error for a group called without a command; 8.1 printed the help
_NO_ARGS_IS_HELP: type[click.UsageError] | None = getattr(click.exceptions, "NoArgsIsHelpError", None)


def _fail(message: str) -> None:
    click.echo(f"outbox: error: {scrub(message)}", err=True)


def exit_code_for(exc: OutboxError) -> int:
    """The exit code of an :class:`OutboxError` (``RET_ERROR`` for kinds without their own code)."""
    for kind, code in _EXIT_CODES:
        if isinstance(exc, kind):
            return code
    return RET_ERROR


class OutboxGroup(click.Group):
    """The ``outbox`` group, whose ``main`` turns every failure into one line and an exit code.

    Overriding ``main`` (rather than wrapping it in :func:`main`) means click's ``CliRunner`` in the
    tests sees exactly what a user sees.
    """

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        code = self.run(args, prog_name, complete_var, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def run(
        self, args: Sequence[str] | None, prog_name: str | None, complete_var: str | None, **extra: Any
    ) -> int:
        """Run the command line and return its exit code (printing the one-line error, if any)."""
        try:
            result = super().main(args, prog_name or "outbox", complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            if _NO_ARGS_IS_HELP is not None and isinstance(exc, _NO_ARGS_IS_HELP) and exc.ctx is not None:
                click.echo(exc.ctx.get_help())  # bare `outbox` or `outbox db`: help, as click 8.1 did
                return RET_OK
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            _fail(f"{exc.format_message()}{hint}")
            return RET_USAGE
        except click.ClickException as exc:
            _fail(exc.format_message())
            return exc.exit_code
        except BrokenPipeError:
            _silence_stdout()  # `outbox list | head`: the reader left; nothing to report
            return RET_ERROR
        except click.Abort:
            _fail("aborted")
            return RET_ERROR
        except OutboxError as exc:
            _fail(first_line(exc))
            return exit_code_for(exc)
        except sa.exc.DBAPIError as exc:
            if is_outage(exc):
                _fail(f"database unreachable: {first_line(exc.orig or exc)}")
                return RET_CONNECT
            _fail(f"database error: {first_line(exc.orig or exc)}")
            return RET_ERROR
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            _fail(
                f"unexpected {type(exc).__name__}: {first_line(exc)} "
                "(a bug: please report it with the traceback above)"
            )
            return RET_ERROR
        return result if isinstance(result, int) else RET_OK


def _silence_stdout() -> None:
    # Python's own advice for SIGPIPE: point stdout at devnull so the flush at exit does not fail again.
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@click.group(cls=OutboxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@shared_options
def outbox(**_options: Any) -> None:
    """Operate a transactional outbox: run the relay, manage its tables, inspect and replay messages.

    Every option also reads an OUTBOX_* environment variable (--batch-size: OUTBOX_BATCH_SIZE) and a
    key of the --config TOML file (batch_size = 500); flags win over the environment, which wins over
    the file. Exit codes: 0 ok, 1 unexpected, 2 usage, 3 configuration, 4 database unreachable,
    5 schema missing or outdated, 6 relay conflict, 7 message not found.
    """


# --- outbox db ---------------------------------------------------------------------------------------------


@outbox.group()
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


# --- outbox relay ------------------------------------------------------------------------------------------

_RELAY_SETTINGS = (
    "app",
    "batch_size",
    "max_batch_size",
    "workers",
    "max_in_flight",
    "lease_seconds",
    "poll_interval",
    "stop_timeout",
    "max_attempts",
    "backoff_initial",
    "backoff_max",
    "handler_timeout",
    "strict_order_topic",
    "kafka_bootstrap_servers",
    "kafka_client_id",
    "kafka_client",
    "kafka_security_protocol",
    "kafka_sasl_mechanism",
    "kafka_sasl_username",
    "kafka_sasl_password",
    "kafka_ssl_cafile",
    "kafka_ssl_certfile",
    "kafka_ssl_keyfile",
    "kafka_compression",
    "kafka_linger_ms",
    "kafka_batch_size",
    "kafka_request_timeout_ms",
    "kafka_delivery_timeout_ms",
    "kafka_route",
    "retention",
    "stuck_after",
    "maintenance_interval",
    "metrics_port",
    "metrics_host",
    "metrics_interval",
)


@outbox.command()
@env_option(
    "app",
    str,
    "Module (and Registry attribute) of the handlers: MODULE or MODULE:ATTR.",
    metavar="MODULE[:ATTR]",
)
@env_option(
    "batch_size", int, "Messages a claim asks for (default 200; more during a backlog: --max-batch-size)."
)
@env_option(
    "max_batch_size",
    int,
    "Claims grow to this while a backlog lasts and the handlers keep up (default: 2000 or --batch-size).",
)
@env_option("workers", int, "Handler threads (default 8).")
@env_option(
    "max_in_flight",
    int,
    "Messages claimed but not finished, at most (default: max(2 x claim, 4 x workers), 2000 with Kafka).",
)
@env_option(
    "lease_seconds", float, "Seconds a claim holds a message before another relay may take it (default 30)."
)
@env_option("poll_interval", float, "Seconds between polls when idle (default 1).")
@env_option("stop_timeout", float, "Seconds running handlers get to finish on stop (default 30).")
@env_option("max_attempts", int, "Attempts before a message is dead, unless its handler says (default 10).")
@env_option("backoff_initial", float, "Seconds before the first retry, doubling after (default 1).")
@env_option("backoff_max", float, "Longest wait between retries, in seconds (default 300).")
@env_option("handler_timeout", float, "Seconds a handler may run before the attempt fails (default: none).")
@env_option(
    "strict_order_topic", str, "Topic whose dead messages hold back their key (repeatable).", multiple=True
)
@kafka_connection_flags(
    servers_help="Publish topics without an in-process handler to this Kafka cluster.",
    client_id_help="Kafka client id (default outbox-relay).",
)
@env_option(
    "kafka_client",
    click.Choice(["kafka-python", "confluent"]),
    "Kafka client library: kafka-python (default) or confluent (librdkafka; the confluent extra).",
)
@env_option(
    "kafka_compression",
    click.Choice(["gzip", "snappy", "lz4", "zstd"], case_sensitive=False),
    "Compress record batches.",
)
@env_option("kafka_linger_ms", int, "Milliseconds the producer waits to fill a batch (default 5).")
@env_option("kafka_batch_size", int, "Producer batch size in bytes (default 262144).")
@env_option("kafka_request_timeout_ms", int, "Kafka request timeout in ms (default 30000).")
@env_option(
    "kafka_delivery_timeout_ms",
    int,
    "Give up on a send after this many ms; the message is released, not failed (default 120000).",
)
@env_option(
    "kafka_route",
    str,
    "Publish outbox topics matching PATTERN to Kafka topic TOPIC (repeatable; default: same name).",
    multiple=True,
    metavar="PATTERN=TOPIC",
)
@env_option(
    "retention",
    str,
    "Delete delivered messages older than this, in small batches, one relay at a time (default 7d; "
    "off keeps them).",
    metavar="DURATION|off",
)
@env_option(
    "stuck_after",
    str,
    "Warn about messages and keys waiting this long past their due time (default 5m).",
    metavar="DURATION",
)
@env_option("maintenance_interval", float, "Seconds between retention and stuck checks (default 60).")
@env_option(
    "metrics_port", int, "Serve /metrics (Prometheus), /healthz and /readyz on this port (default: off)."
)
@env_option("metrics_host", str, "Address the metrics port listens on (default 0.0.0.0).")
@env_option("metrics_interval", float, "Seconds between reads of the table's gauges (default 15).")
@settings_command(*_RELAY_SETTINGS)
def relay(settings: Settings) -> None:
    """Deliver committed messages to the handlers of --app until SIGTERM or SIGINT.

    The first signal stops gracefully: no new claims, running handlers get --stop-timeout seconds,
    every outcome is written, then exit 0. A second signal exits at once (status 1); messages still
    running then come back to another relay when their lease expires.
    """
    kafka_options = settings.kafka_options()
    if settings.app is None and kafka_options is None:
        raise ConfigError(
            "nowhere to deliver: pass --app MODULE[:ATTR] (in-process handlers) and/or "
            "--kafka-bootstrap-servers HOST:PORT (or OUTBOX_APP / OUTBOX_KAFKA_BOOTSTRAP_SERVERS)"
        )
    # outbox never imports relay/consumers at module level: only this command needs them
    from consumers.registry import Registry, load_registry
    from relay import Relay

    registry = load_registry(settings.app) if settings.app is not None else Registry()
    kafka = None
    if kafka_options is not None:
        from relay.publishers.kafka import KafkaSettings

        kafka = KafkaSettings(**kafka_options)
    metrics = None
    if settings.metrics_port is not None:
        from prometheus_client import disable_created_metrics

        from relay.metrics import RelayMetrics

        disable_created_metrics()  # type: ignore[no-untyped-call]  # no "<counter>_created" series
        metrics = RelayMetrics(interval=settings.metrics_interval)
    runner = Relay(
        settings.database_url,
        registry,
        table=settings.table,
        batch_size=settings.batch_size,
        max_batch_size=settings.max_batch_size,
        workers=settings.workers,
        max_in_flight=settings.max_in_flight,
        lease_seconds=settings.lease_seconds,
        poll_interval=settings.poll_interval,
        stop_timeout=settings.stop_timeout,
        retry=settings.retry_policy(),
        handler_timeout=settings.handler_timeout,
        strict_order_topics=settings.strict_order_topics,
        kafka=kafka,
        retention=settings.retention,
        stuck_after=settings.stuck_after,
        maintenance_interval=settings.maintenance_interval,
        observers=[metrics] if metrics is not None else [],
        freeze_gc=True,  # this process is the relay: its start-up objects live as long as it does
    )
    server = None
    try:
        with StopSignals("running messages return after their lease") as signals:
            if metrics is not None:  # before start: /healthz answers (and /readyz says why not) meanwhile
                from relay.health import serve

                server = serve(runner, metrics, host=settings.metrics_host, port=settings.metrics_port or 0)
            runner.start()
            log.info(
                "relay running with handlers for %s%s; stop with SIGTERM or Ctrl-C",
                ", ".join(registry.topics()) or "no topics",
                f", other topics to Kafka at {kafka.bootstrap_servers}" if kafka is not None else "",
            )
            while not signals.requested.wait(0.5):  # woken in time to run the signal handler
                pass
            log.info("%s received: stopping gracefully (again to exit at once)", signals.received or "stop")
            runner.stop()
    finally:
        if server is not None:
            server.stop()


# --- inspect and operate (outbox.cli_inspect) -------------------------------------------------------------

for _command in (status, list_messages, show, replay, purge):
    outbox.add_command(_command)
outbox.add_command(doctor)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry point (``outbox`` and ``python -m outbox``)."""
    outbox.main(args=argv, prog_name="outbox")
    raise AssertionError("unreachable")  # main() exits


# --- outbox consume (outbox.cli_consume), outbox dlq (outbox.cli_dlq) --------------------------------------

from outbox.cli_consume import consume  # noqa: E402
from outbox.cli_dlq import dlq  # noqa: E402

outbox.add_command(consume)
outbox.add_command(dlq)
