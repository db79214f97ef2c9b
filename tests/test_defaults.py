"""Every relay setting has one default, in ``outbox._defaults``: ``Relay(...)``, the CLI's ``Settings`` and
``outbox relay --help`` all say the same value.

Before this, the defaults were written three times (``outbox/config.py``, ``relay/_runner.py`` with
``relay/maintenance.py``, and the help texts) and nothing compared them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
from typing import Any

import click
import pytest

from outbox import _defaults as defaults
from outbox._policy import RetryPolicy
from outbox._runtime.kafka_settings import KafkaConnection
from outbox._runtime.ops_server import OpsServer
from outbox.cli._config import Settings, format_duration, format_number, parse_duration
from outbox.cli._consume import consume
from outbox.cli._relay import relay as relay_command
from relay import Relay
from relay import _runner as runner
from relay.health import serve
from relay.maintenance import Maintenance
from relay.metrics import RelayMetrics
from relay.publishers.kafka import KafkaSettings

#: setting (as ``Settings`` and ``Relay`` name it) -> its default
RELAY_DEFAULTS: dict[str, Any] = {
    "batch_size": defaults.BATCH_SIZE,
    "workers": defaults.WORKERS,
    "lease_seconds": defaults.LEASE_SECONDS,
    "poll_interval": defaults.POLL_INTERVAL,
    "stop_timeout": defaults.STOP_TIMEOUT,
    "max_payload_bytes": defaults.MAX_PAYLOAD_BYTES,
    "max_in_flight_bytes": defaults.MAX_IN_FLIGHT_BYTES,
    "retention": defaults.RETENTION,
    "stuck_after": defaults.STUCK_AFTER,
    "maintenance_interval": defaults.MAINTENANCE_INTERVAL,
}
#: settings of the CLI only (``Relay`` takes a RetryPolicy, and metrics are an observer)
CLI_ONLY_DEFAULTS: dict[str, Any] = {
    "max_attempts": defaults.MAX_ATTEMPTS,
    "backoff_initial": defaults.BACKOFF_INITIAL,
    "backoff_max": defaults.BACKOFF_MAX,
    "metrics_interval": defaults.METRICS_INTERVAL,
    "metrics_host": defaults.METRICS_HOST,
}
#: the Kafka flags of ``outbox relay`` -> the KafkaSettings field and its default
KAFKA_DEFAULTS: dict[str, tuple[str, Any]] = {
    "kafka_client_id": ("client_id", defaults.KAFKA_CLIENT_ID),
    "kafka_linger_ms": ("linger_ms", defaults.KAFKA_LINGER_MS),
    "kafka_batch_size": ("batch_size", defaults.KAFKA_BATCH_SIZE),
    "kafka_request_timeout_ms": ("request_timeout_ms", defaults.KAFKA_REQUEST_TIMEOUT_MS),
    "kafka_delivery_timeout_ms": ("delivery_timeout_ms", defaults.KAFKA_DELIVERY_TIMEOUT_MS),
}


def shown(value: Any) -> str:
    """A default as a help text writes it."""
    if isinstance(value, dt.timedelta):
        return format_duration(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format_number(value)
    return str(value)


def help_of(command: click.Command, setting: str) -> str:
    for param in command.params:
        if param.name == setting and isinstance(param, click.Option):
            return " ".join((param.help or "").split())
    raise AssertionError(f"{command.name} has no option for {setting}")


def keyword_defaults(function: Any) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def test_the_relay_signature_takes_its_defaults_from_outbox_defaults() -> None:
    signature = keyword_defaults(Relay.__init__)
    assert {name: signature[name] for name in RELAY_DEFAULTS} == RELAY_DEFAULTS


def test_the_relays_own_constants_agree_with_outbox_defaults() -> None:
    """relay/_runner.py still writes these three (it is being changed by the claim-engine work); until they
    are imported from outbox._defaults, they must at least be equal."""
    assert runner.MAX_BATCH_SIZE == defaults.MAX_BATCH_SIZE
    assert runner.MAX_IN_FLIGHT_BYTES == defaults.MAX_IN_FLIGHT_BYTES
    assert runner.BROKER_IN_FLIGHT == defaults.BROKER_IN_FLIGHT


def test_the_retry_defaults_are_retry_policys() -> None:
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.backoff_initial, policy.backoff_max) == (
        defaults.MAX_ATTEMPTS,
        defaults.BACKOFF_INITIAL,
        defaults.BACKOFF_MAX,
    )


def test_the_settings_defaults_are_the_relays() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(Settings)}
    expected = RELAY_DEFAULTS | CLI_ONLY_DEFAULTS
    assert {name: fields[name] for name in expected} == expected


def test_maintenance_metrics_and_the_ops_server_use_the_same_defaults() -> None:
    maintenance = keyword_defaults(Maintenance.__init__)
    assert (maintenance["retention"], maintenance["stuck_after"], maintenance["interval"]) == (
        defaults.RETENTION,
        defaults.STUCK_AFTER,
        defaults.MAINTENANCE_INTERVAL,
    )
    assert maintenance["lease_seconds"] == defaults.LEASE_SECONDS
    assert keyword_defaults(RelayMetrics.__init__)["interval"] == defaults.METRICS_INTERVAL
    assert keyword_defaults(serve)["host"] == defaults.METRICS_HOST
    assert keyword_defaults(OpsServer.__init__)["host"] == defaults.METRICS_HOST


def test_the_kafka_settings_defaults_are_the_ones_the_help_shows() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(KafkaSettings)}
    assert {name: fields[name] for name, _ in KAFKA_DEFAULTS.values()} == dict(KAFKA_DEFAULTS.values())
    connection = {f.name: f.default for f in dataclasses.fields(KafkaConnection)}
    assert connection["request_timeout_ms"] == defaults.KAFKA_REQUEST_TIMEOUT_MS


@pytest.mark.parametrize("setting", [*RELAY_DEFAULTS, *CLI_ONLY_DEFAULTS])
def test_outbox_relay_help_shows_each_default(setting: str) -> None:
    value = (RELAY_DEFAULTS | CLI_ONLY_DEFAULTS)[setting]
    assert f"(default {shown(value)}" in help_of(relay_command, setting)


@pytest.mark.parametrize("flag", list(KAFKA_DEFAULTS))
def test_outbox_relay_help_shows_each_kafka_default(flag: str) -> None:
    assert f"(default {shown(KAFKA_DEFAULTS[flag][1])}" in help_of(relay_command, flag)


def test_the_computed_defaults_in_the_help_name_their_numbers() -> None:
    assert f"(default: {defaults.MAX_BATCH_SIZE} or --batch-size)" in help_of(relay_command, "max_batch_size")
    assert f"{defaults.BROKER_IN_FLIGHT} with Kafka" in help_of(relay_command, "max_in_flight")


@pytest.mark.parametrize("setting", ["max_attempts", "backoff_initial", "backoff_max", "metrics_host"])
def test_outbox_consume_help_shows_the_shared_defaults(setting: str) -> None:
    assert f"(default {shown(CLI_ONLY_DEFAULTS[setting])}" in help_of(consume, setting)


def test_a_duration_default_reads_back_as_itself() -> None:
    for value in (defaults.RETENTION, defaults.STUCK_AFTER, dt.timedelta(seconds=90)):
        assert parse_duration(format_duration(value)) == value
