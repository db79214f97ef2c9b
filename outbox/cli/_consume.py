"""``outbox consume``: the Kafka consumer runner, and how ``outbox dlq`` reads the Kafka connection.

Command::

    outbox consume --app MODULE[:ATTR] --group GROUP --kafka-bootstrap-servers HOST:PORT
                   [--workers N] [--batch-records N] [--batch-ms MS] [--metrics-port PORT]

Every flag has an ``OUTBOX_*`` environment twin named after it (``--group``: ``OUTBOX_GROUP``,
``--kafka-sasl-password``: ``OUTBOX_KAFKA_SASL_PASSWORD``). The settings ``outbox relay`` also has
(``--app``, ``--max-attempts``, ``--backoff-initial``, ``--backoff-max``, ``--stop-timeout``,
``--metrics-port``, ``--metrics-host``) and the Kafka connection (``kafka_bootstrap_servers``, ...) are
read from the config file too; the consumer's own flags (``--group``, ``--session-timeout-ms``, ...)
come from flags and environment only. The SASL password is never printed: it is scrubbed from every
output (:mod:`outbox.redaction`) and kept out of ``repr``; give it in the environment or a file
(``--kafka-sasl-password-file``), as flags are visible to every user in ``ps``. ``outbox dlq``
(:mod:`outbox.cli._dlq`) uses :func:`connection_values` from here; the connection flags themselves are
:func:`outbox.cli._options.kafka_connection_flags`.

The consumer code is imported inside the commands: ``outbox`` never imports ``consumers`` at module level.
"""

from __future__ import annotations

import logging
from typing import Any

import click

from outbox import _defaults as defaults
from outbox._errors import ConfigError
from outbox.cli._config import KAFKA_CONNECTION_SETTINGS, Settings
from outbox.cli._options import (
    KAFKA_CONNECTION_NAMES,
    StopSignals,
    app_flag,
    backoff_flags,
    env_option,
    kafka_connection_flags,
    metrics_flags,
    open_engine,
    settings_command,
)

#: ``--batch-isolation`` (as ``consumers._batches.ISOLATIONS``; ``outbox`` does not import ``consumers``)
ISOLATIONS = ("redo", "savepoint")

log = logging.getLogger("outbox.cli")


def connection_values(settings: Settings) -> dict[str, Any]:
    """``KafkaConnection`` keyword arguments from the ``kafka_*`` settings (ConfigError without servers).

    The connection flags are settings like any other: flag, environment, then the config file's key.
    """
    kafka = {name: getattr(settings, name) for name in KAFKA_CONNECTION_SETTINGS}
    for name in ("kafka_security_protocol", "kafka_sasl_mechanism"):
        if isinstance(kafka.get(name), str):
            kafka[name] = kafka[name].upper()
    servers = kafka.get("kafka_bootstrap_servers")
    if not servers:
        raise ConfigError(
            "no Kafka brokers: pass --kafka-bootstrap-servers HOST:PORT or set OUTBOX_KAFKA_BOOTSTRAP_SERVERS"
        )
    values = {name.removeprefix("kafka_"): value for name, value in kafka.items() if value is not None}
    values["bootstrap_servers"] = values["bootstrap_servers"].strip()
    return values


def quiet_kafka_logs(settings: Settings) -> None:
    """kafka-python logs every connection step at INFO: keep its WARNING and above unless debugging."""
    if settings.log_level != "DEBUG":
        logging.getLogger("kafka").setLevel(logging.WARNING)


# --- outbox consume ----------------------------------------------------------------------------------------

_CONSUME_SETTINGS = (
    *KAFKA_CONNECTION_NAMES,
    "app",
    "max_attempts",
    "backoff_initial",
    "backoff_max",
    "stop_timeout",
    "metrics_port",
    "metrics_host",
)


@click.command()
@app_flag
@env_option("group", str, "Kafka consumer group; its inbox and dead letters are kept under this name.")
@kafka_connection_flags()
@env_option(
    "session_timeout_ms",
    int,
    "Milliseconds without a heartbeat before the group drops this consumer (default 10000).",
)
@env_option("max_poll_records", int, "Records fetched per poll, at most (default 500).")
@env_option(
    "fetch_max_wait_ms",
    int,
    "Milliseconds the broker may hold a fetch waiting for records (default 50).",
)
@env_option(
    "workers",
    int,
    "Partitions finished at once, each in order on one worker (default 4; 1 on SQLite).",
    env="OUTBOX_CONSUME_WORKERS",
)
@env_option(
    "batch_records", int, "Records of one partition finished in one transaction, at most (default 500)."
)
@env_option(
    "batch_ms",
    int,
    "Milliseconds a busy consumer gathers records before finishing them (default 100).",
)
@env_option("batch_isolation", click.Choice(ISOLATIONS), "How a failing handler is isolated.", hidden=True)
@env_option(
    "max_poll_interval_ms", int, "Milliseconds one poll batch (retries included) may take (default 300000)."
)
@env_option(
    "auto_offset_reset",
    click.Choice(("earliest", "latest")),
    "Where a group without committed offsets starts (default earliest).",
)
@env_option(
    "max_attempts",
    int,
    f"Attempts before a record is dead-lettered, unless its handler says (default {defaults.MAX_ATTEMPTS}).",
)
@backoff_flags
@env_option("stop_timeout", float, "Seconds the current handler gets to finish on stop (default 30).")
@metrics_flags
@settings_command(*_CONSUME_SETTINGS)
def consume(settings: Settings, **options: Any) -> None:
    """Run the handlers of --app on the records of their Kafka topics, as consumer group --group.

    A handler that takes a session runs in one transaction with the group's inbox row: its database
    effect happens once, even when Kafka delivers the record again. Records of one partition are
    finished in batches (one transaction for up to --batch-records), partitions in parallel
    (--workers). Handlers without a session are at least once. A record still failing after its last
    attempt goes to the dead letters (outbox dlq). The first SIGTERM/SIGINT finishes the current batch,
    commits offsets and leaves the group (exit
    0); a second one exits at once (status 1). With --metrics-port, /metrics, /healthz and /readyz
    are served on that port while it runs.
    """
    quiet_kafka_logs(settings)
    if settings.app is None:
        raise ConfigError("no handlers: pass --app MODULE[:ATTR] or set OUTBOX_APP")
    if not options["group"]:
        raise ConfigError("no consumer group: pass --group GROUP or set OUTBOX_GROUP")
    from consumers._kafka import ConsumerSettings, KafkaConsumerRunner  # lazily: see the module docstring
    from consumers._registry import load_registry

    kafka_names = (
        "session_timeout_ms",
        "max_poll_records",
        "fetch_max_wait_ms",
        "max_poll_interval_ms",
        "auto_offset_reset",
    )
    consumer_values = {name: options[name] for name in kafka_names if options[name] is not None}
    batching = {
        name: options[name]
        for name in ("workers", "batch_records", "batch_ms", "batch_isolation")
        if options[name] is not None
    }
    consumer_settings = ConsumerSettings(
        **connection_values(settings), group=options["group"], **consumer_values
    )
    registry = load_registry(settings.app)
    metrics = None
    if settings.metrics_port is not None:
        from prometheus_client import disable_created_metrics

        from consumers._metrics import ConsumerMetrics, consumer_checks
        from outbox._runtime.ops_server import OpsServer

        disable_created_metrics()  # type: ignore[no-untyped-call]  # no "<counter>_created" series
        metrics = ConsumerMetrics(consumer_settings.group)
    engine = open_engine(settings)
    server = None
    try:
        runner = KafkaConsumerRunner(
            engine,
            registry,
            consumer_settings,
            table=settings.table,
            retry=settings.retry_policy(),
            stop_timeout=settings.stop_timeout,
            metrics=metrics,
            **batching,
        )
        if metrics is not None:  # before start: /healthz answers (and /readyz says why not) meanwhile
            server = OpsServer(
                metrics.registry,
                consumer_checks(runner),
                host=settings.metrics_host,
                port=settings.metrics_port or 0,
            ).start()
        _run_until_signalled(runner)
    finally:
        if server is not None:
            server.stop()
        engine.dispose()
    if runner.error is not None:
        raise runner.error  # OutboxError / database error: one line; anything else: a bug


def _run_until_signalled(runner: Any) -> None:
    with StopSignals("the current record will be read again") as signals:
        runner.start()
        while not signals.wait(0.5):
            if not runner.running:
                break
        if signals.received:
            log.info(
                "%s received: stopping after the current record (again to exit at once)", signals.received
            )
        runner.stop()
