"""``outbox relay``: deliver committed messages to in-process handlers and/or Kafka.

Command::

    outbox relay --app MODULE[:ATTR] [--kafka-bootstrap-servers HOST:PORT] [--metrics-port PORT]

Every flag has an ``OUTBOX_*`` environment twin and a config-file key (:mod:`outbox.cli._config`). The relay
and consumer code are imported inside the command: ``outbox`` never imports ``relay`` or ``consumers``
at module level.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

import click

from outbox import _defaults as defaults
from outbox._errors import ConfigError, RelayFailed
from outbox.cli._config import Settings, format_duration
from outbox.cli._config import format_number as _n
from outbox.cli._options import (
    KAFKA_CONNECTION_NAMES,
    StopSignals,
    app_flag,
    backoff_flags,
    env_option,
    kafka_connection_flags,
    metrics_flags,
    settings_command,
)
from outbox.cli._root import RET_CRASHED

if TYPE_CHECKING:
    from relay import Relay

#: seconds between the main thread's looks at whether the relay lost a thread it needs
FAILURE_CHECK_SECONDS = 0.2
#: seconds a failed relay gets to stop, beyond --stop-timeout, before the process exits regardless
STOP_MARGIN_SECONDS = 15.0

log = logging.getLogger("outbox.cli")


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
    "max_payload_bytes",
    "max_in_flight_bytes",
    "max_stuck_handlers",
    "strict_order_topic",
    *KAFKA_CONNECTION_NAMES,
    "kafka_client",
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


@click.command()
@app_flag
@env_option(
    "batch_size",
    int,
    f"Messages a claim asks for (default {_n(defaults.BATCH_SIZE)}; "
    "more during a backlog: --max-batch-size).",
)
@env_option(
    "max_batch_size",
    int,
    "Claims grow to this while a backlog lasts and the handlers keep up "
    f"(default: {_n(defaults.MAX_BATCH_SIZE)} or --batch-size).",
)
@env_option("workers", int, f"Handler threads (default {_n(defaults.WORKERS)}).")
@env_option(
    "max_in_flight",
    int,
    "Messages claimed but not finished, at most "
    f"(default: max(2 x claim, 4 x workers), {_n(defaults.BROKER_IN_FLIGHT)} with Kafka).",
)
@env_option(
    "lease_seconds",
    float,
    "Seconds a claim holds a message before another relay may take it "
    f"(default {_n(defaults.LEASE_SECONDS)}).",
)
@env_option(
    "poll_interval", float, f"Seconds between polls when idle (default {_n(defaults.POLL_INTERVAL)})."
)
@env_option(
    "stop_timeout",
    float,
    f"Seconds running handlers get to finish on stop (default {_n(defaults.STOP_TIMEOUT)}).",
)
@env_option(
    "max_attempts",
    int,
    f"Attempts before a message is dead, unless its handler says (default {_n(defaults.MAX_ATTEMPTS)}).",
)
@backoff_flags
@env_option(
    "handler_timeout",
    float,
    "Seconds a handler may run before the attempt fails and the handler is interrupted (default: none).",
)
@env_option(
    "max_stuck_handlers",
    int,
    "Handler threads stuck past their timeout (blocked in C) before the relay stops claiming and "
    "/readyz fails (default: 2 x --workers).",
)
@env_option(
    "max_in_flight_bytes",
    int,
    "Payload bytes claimed and not yet recorded, at most: the relay's memory follows it "
    f"(default {_n(defaults.MAX_IN_FLIGHT_BYTES)}).",
)
@env_option(
    "max_payload_bytes",
    int,
    "Largest payload handed out, in bytes; a larger one goes dead "
    f"(default {_n(defaults.MAX_PAYLOAD_BYTES)}, as outbox.add's).",
)
@env_option(
    "strict_order_topic", str, "Topic whose dead messages hold back their key (repeatable).", multiple=True
)
@kafka_connection_flags(
    servers_help="Publish topics without an in-process handler to this Kafka cluster.",
    client_id_help=f"Kafka client id (default {defaults.KAFKA_CLIENT_ID}).",
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
@env_option(
    "kafka_linger_ms",
    int,
    f"Milliseconds the producer waits to fill a batch (default {_n(defaults.KAFKA_LINGER_MS)}).",
)
@env_option(
    "kafka_batch_size", int, f"Producer batch size in bytes (default {_n(defaults.KAFKA_BATCH_SIZE)})."
)
@env_option(
    "kafka_request_timeout_ms",
    int,
    f"Kafka request timeout in ms (default {_n(defaults.KAFKA_REQUEST_TIMEOUT_MS)}).",
)
@env_option(
    "kafka_delivery_timeout_ms",
    int,
    "Give up on a send after this many ms; the message is released, not failed "
    f"(default {_n(defaults.KAFKA_DELIVERY_TIMEOUT_MS)}).",
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
    "Delete delivered messages older than this, in small batches, one relay at a time "
    f"(default {format_duration(defaults.RETENTION)}; off keeps them).",
    metavar="DURATION|off",
)
@env_option(
    "stuck_after",
    str,
    "Warn about messages and keys waiting this long past their due time "
    f"(default {format_duration(defaults.STUCK_AFTER)}).",
    metavar="DURATION",
)
@env_option(
    "maintenance_interval",
    float,
    f"Seconds between retention and stuck checks (default {_n(defaults.MAINTENANCE_INTERVAL)}).",
)
@metrics_flags
@env_option(
    "metrics_interval",
    float,
    f"Seconds between reads of the table's gauges (default {_n(defaults.METRICS_INTERVAL)}).",
)
@settings_command(*_RELAY_SETTINGS)
def relay(settings: Settings) -> None:
    """Deliver committed messages to the handlers of --app until SIGTERM or SIGINT.

    The first signal stops gracefully: no new claims, running handlers get --stop-timeout seconds,
    every outcome is written, then exit 0. A second signal exits at once (status 1); messages still
    running then come back to another relay when their lease expires. A relay that loses a thread it
    cannot work without (its claim, dispatch or completion loop) fails /healthz, stops and exits 8.
    """
    kafka_options = settings.kafka_options()
    if settings.app is None and kafka_options is None:
        raise ConfigError(
            "nowhere to deliver: pass --app MODULE[:ATTR] (in-process handlers) and/or "
            "--kafka-bootstrap-servers HOST:PORT (or OUTBOX_APP / OUTBOX_KAFKA_BOOTSTRAP_SERVERS)"
        )
    # outbox never imports relay/consumers at module level: only this command needs them
    from consumers._registry import Registry, load_registry
    from relay import Relay

    registry = load_registry(settings.app) if settings.app is not None else Registry()
    if settings.app is not None and not len(registry) and kafka_options is None:
        module = settings.app.partition(":")[0]
        raise ConfigError(
            f"--app {settings.app!r} registered no handler: importing {module} ran no "
            "@consumers.handler on that registry, so the relay could deliver nothing. Point --app at "
            "the module that registers the handlers (e.g. --app myapp.handlers, not the package "
            "myapp), or add --kafka-bootstrap-servers to publish to Kafka"
        )
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
        max_stuck_handlers=settings.max_stuck_handlers,
        strict_order_topics=settings.strict_order_topics,
        kafka=kafka,
        retention=settings.retention,
        stuck_after=settings.stuck_after,
        maintenance_interval=settings.maintenance_interval,
        observers=[metrics] if metrics is not None else [],
        freeze_gc=True,  # this process is the relay: its start-up objects live as long as it does
        max_payload_bytes=settings.max_payload_bytes,
        max_in_flight_bytes=settings.max_in_flight_bytes,
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
            while runner.failure is None and not signals.wait(FAILURE_CHECK_SECONDS):
                pass  # a signal, or a thread the relay needs died
            if runner.failure is None:
                log.info("%s received: stopping gracefully (again to exit at once)", signals.received)
                runner.stop()
            else:
                _stop_after_failure(runner, settings.stop_timeout + STOP_MARGIN_SECONDS)
    finally:
        if server is not None:
            server.stop()
    if runner.failure is not None:
        raise RelayFailed(f"{runner.failure}: the relay stopped; restart it")


def _stop_after_failure(runner: Relay, deadline_seconds: float) -> None:
    """Stop a relay that lost a thread it needs; exit at once (``RET_CRASHED``) if stopping hangs.

    The relay already stops itself (``Relay._thread_died``); this waits for it within a deadline. A
    process in that state (a MemoryError, a bug) may not manage a graceful stop: it must exit anyway,
    and what it still holds comes back after the lease.
    """
    stopper = threading.Thread(target=runner.stop, name="outbox-cli-stop", daemon=True)
    stopper.start()
    stopper.join(deadline_seconds)
    if stopper.is_alive():
        os.write(2, f"outbox: error: {runner.failure}; the stop hung, exiting now\n".encode())
        os._exit(RET_CRASHED)
