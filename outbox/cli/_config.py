"""The operator's configuration: one typed, validated :class:`Settings`, built once at start.

Where each value comes from, first match wins:

1. a command-line flag (``--batch-size 500``);
2. its environment twin (``OUTBOX_BATCH_SIZE=500``);
3. the optional TOML file named by ``--config`` / ``OUTBOX_CONFIG``, whose keys are the long option
   names with underscores (``batch_size = 500``, ``database_url = "postgresql://..."``);
4. the defaults, from :mod:`outbox._defaults` (the same as :class:`relay.Relay`'s).

The CLI resolves 1 and 2 (click reads the environment) and hands the explicit values to
:meth:`Settings.load`, which adds the file and the defaults and validates everything once, raising
:class:`~outbox._errors.ConfigError` naming the setting and how to fix it. The rest of the code receives
the :class:`Settings` object and never reads the environment itself.

Secrets (the database URL, which may hold a password, and the SASL password) can also be read from a
file: ``--database-url-file`` / ``OUTBOX_DATABASE_URL_FILE`` / ``database_url_file`` and
``--kafka-sasl-password-file`` / ``OUTBOX_KAFKA_SASL_PASSWORD_FILE`` / ``kafka_sasl_password_file``
(the file's content, stripped of surrounding whitespace; a Kubernetes or Docker secret mounted as a
file). Such a ``*_file`` setting is another way of giving its setting, with the same rank: where both
come from the same place (two flags, two environment variables, two keys of the file), that is an error.
Flags are visible to every user of the machine in ``ps``: give secrets in the environment or a file.

Durations typed by operators (``30s``, ``10m``, ``2h``, ``7d``) are parsed by :func:`parse_duration`,
and points in time (``2024-05-01T12:00`` or ``2h``, meaning two hours ago) by :func:`parse_time_ref`.
"""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from outbox import _defaults as defaults
from outbox._dialects import normalise_url
from outbox._errors import ConfigError
from outbox._policy import MAX_SECONDS, RetryPolicy
from outbox._schema import DEFAULT_TABLE, validate_table_name
from outbox.redaction import mask_url, url_secrets
from outbox.writer import MAX_DELAY

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")

#: setting name -> the kind of value it holds (how a config-file value is checked and converted)
_KINDS: dict[str, str] = {
    "database_url": "str",
    "database_url_file": "str",
    "table": "str",
    "log_level": "str",
    "log_format": "str",
    "app": "str?",
    "batch_size": "int",
    "max_batch_size": "int?",
    "workers": "int",
    "max_in_flight": "int?",
    "lease_seconds": "float",
    "poll_interval": "float",
    "stop_timeout": "float",
    "max_attempts": "int",
    "backoff_initial": "float",
    "backoff_max": "float",
    "handler_timeout": "float?",
    "max_payload_bytes": "int",
    "max_in_flight_bytes": "int",
    "max_stuck_handlers": "int?",
    "strict_order_topics": "list",
    "kafka_bootstrap_servers": "str?",
    "kafka_client_id": "str?",
    "kafka_client": "str?",
    "kafka_security_protocol": "str?",
    "kafka_sasl_mechanism": "str?",
    "kafka_sasl_username": "str?",
    "kafka_sasl_password": "str?",
    "kafka_sasl_password_file": "str?",
    "kafka_ssl_cafile": "str?",
    "kafka_ssl_certfile": "str?",
    "kafka_ssl_keyfile": "str?",
    "kafka_compression": "str?",
    "kafka_linger_ms": "int?",
    "kafka_batch_size": "int?",
    "kafka_request_timeout_ms": "int?",
    "kafka_delivery_timeout_ms": "int?",
    "kafka_routes": "routes",
    "retention": "duration",
    "stuck_after": "duration",
    "maintenance_interval": "float",
    "metrics_port": "int?",
    "metrics_host": "str",
    "metrics_interval": "float",
    "web_host": "str",
    "web_port": "int",
    "web_auth": "str?",
    "web_auth_file": "str?",
    "hide_payloads": "bool",
    "web_allow_actions": "bool",
    "web_trace_url": "str?",
}
#: settings read from a file instead (``--database-url-file``): the setting each one gives
SECRET_FILES: dict[str, str] = {
    "database_url_file": "database_url",
    "kafka_sasl_password_file": "kafka_sasl_password",
    "web_auth_file": "web_auth",
}
#: the settings of a Kafka connection (``outbox._runtime.kafka_settings.KafkaConnection``), named as in
#: the file
KAFKA_CONNECTION_SETTINGS = (
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
#: config-file spellings that are not the field name (the file uses the option's name)
_ALIASES = {"strict_order_topic": "strict_order_topics", "kafka_route": "kafka_routes"}
#: flags not spelled like their setting (``outbox web --host`` sets web_host, OUTBOX_WEB_HOST)
_FLAGS = {
    "web_host": "--host",
    "web_port": "--port",
    "web_auth": "--auth",
    "web_auth_file": "--auth-file",
    "web_allow_actions": "--allow-actions",
    "web_trace_url": "--trace-url",
}


@dataclass(frozen=True)
class Settings:
    """Everything a CLI command needs to know, validated.

    ``database_url`` is kept out of ``repr`` (it may hold a password); show :attr:`masked_url` instead.
    """

    database_url: str = field(repr=False)
    table: str = DEFAULT_TABLE
    log_level: str = "INFO"
    log_format: str = "text"
    #: ``MODULE[:ATTR]`` naming the handlers' registry (``outbox relay`` needs it)
    app: str | None = None
    batch_size: int = defaults.BATCH_SIZE
    max_batch_size: int | None = None
    workers: int = defaults.WORKERS
    max_in_flight: int | None = None
    lease_seconds: float = defaults.LEASE_SECONDS
    poll_interval: float = defaults.POLL_INTERVAL
    stop_timeout: float = defaults.STOP_TIMEOUT
    max_attempts: int = defaults.MAX_ATTEMPTS
    backoff_initial: float = defaults.BACKOFF_INITIAL
    backoff_max: float = defaults.BACKOFF_MAX
    handler_timeout: float | None = None
    #: the largest payload the relay hands out (bytes, as stored); larger ones go dead
    max_payload_bytes: int = defaults.MAX_PAYLOAD_BYTES
    #: payload bytes a relay holds claimed and not yet recorded, at most (its memory follows this)
    max_in_flight_bytes: int = defaults.MAX_IN_FLIGHT_BYTES
    #: handler threads stuck past their timeout before the relay stops claiming (default 2 x workers)
    max_stuck_handlers: int | None = None
    strict_order_topics: tuple[str, ...] = ()
    #: Kafka publishing (``outbox relay``); unset bootstrap servers = no Kafka
    kafka_bootstrap_servers: str | None = None
    kafka_client_id: str | None = None
    kafka_client: str | None = None
    kafka_security_protocol: str | None = None
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = field(default=None, repr=False)
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None
    kafka_compression: str | None = None
    kafka_linger_ms: int | None = None
    kafka_batch_size: int | None = None
    kafka_request_timeout_ms: int | None = None
    kafka_delivery_timeout_ms: int | None = None
    #: ``(outbox topic pattern, Kafka topic)`` pairs, from ``--kafka-route 'audit.*=audit-log'``
    kafka_routes: tuple[tuple[str, str], ...] = ()
    #: built-in maintenance (``relay.maintenance``): delivered messages older than this are deleted
    #: (zero: kept forever); messages and keys waiting longer than ``stuck_after`` are reported
    retention: dt.timedelta = defaults.RETENTION
    stuck_after: dt.timedelta = defaults.STUCK_AFTER
    maintenance_interval: float = defaults.MAINTENANCE_INTERVAL
    #: ``/metrics``, ``/healthz`` and ``/readyz`` (``outbox._runtime.ops_server``) on this port; ``None``: off
    metrics_port: int | None = None
    metrics_host: str = defaults.METRICS_HOST
    #: seconds between two reads of the metrics' gauges computed from the table
    metrics_interval: float = defaults.METRICS_INTERVAL
    #: ``outbox web``: where the dashboard listens, who may see it (``user:password`` lines; ``None``:
    #: nobody needs to log in, so it listens on a loopback address only) and whether payloads show
    web_host: str = "127.0.0.1"
    web_port: int = 8080
    web_auth: str | None = field(default=None, repr=False)
    hide_payloads: bool = False
    #: ``outbox web``: offer replay and purge (dry run, confirmation, CSRF, audit line); default read-only
    web_allow_actions: bool = False
    #: ``outbox web``: a link to a message's trace, ``{trace_id}`` replaced by its traceparent's trace id
    web_trace_url: str | None = None

    def __post_init__(self) -> None:
        normalise_url(self.database_url)  # raises ConfigError with the expected form
        # Every number of seconds is finite and at most 100 years (MAX_SECONDS), every duration too: leases,
        # backoffs and retention are added to or taken from a time, which must stay a datetime, and
        # timeouts become thread waits (at most threading.TIMEOUT_MAX, 292 years). An infinite lease
        # passed "> 0", then killed the relay's claim thread while the process lived on.
        for name, kind in _KINDS.items():
            value = getattr(self, name, None)  # a *_file key is read into its twin, not kept
            if value is None:
                continue
            if kind in ("float", "float?") and not abs(value) <= MAX_SECONDS:
                _invalid(
                    name, value, f"must be a finite number of seconds, at most {MAX_SECONDS:.0f} (100 years)"
                )
            if kind == "duration" and abs(value) > MAX_DELAY:
                _invalid(name, value, f"must be at most {MAX_DELAY.days} days (100 years)")
        validate_table_name(self.table)
        if self.log_level not in LOG_LEVELS:
            _invalid("log_level", self.log_level, f"use one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            _invalid("log_format", self.log_format, f"use one of {', '.join(LOG_FORMATS)}")
        if self.app is not None and not self.app.partition(":")[0]:
            _invalid("app", self.app, "expected MODULE or MODULE:ATTR")
        for name in ("batch_size", "workers", "max_attempts", "max_payload_bytes", "max_in_flight_bytes"):
            if getattr(self, name) < 1:
                _invalid(name, getattr(self, name), "must be a whole number of at least 1")
        if self.max_batch_size is not None and self.max_batch_size < self.batch_size:
            _invalid(
                "max_batch_size",
                self.max_batch_size,
                f"must not be smaller than batch_size ({self.batch_size}); give them equal for a fixed size",
            )
        if self.max_in_flight is not None and self.max_in_flight < 1:
            _invalid("max_in_flight", self.max_in_flight, "must be a whole number of at least 1")
        for name in ("lease_seconds", "poll_interval"):
            if not getattr(self, name) > 0:
                _invalid(name, getattr(self, name), "must be a positive number of seconds")
        for name in ("stop_timeout", "backoff_initial", "backoff_max"):
            if not getattr(self, name) >= 0:
                _invalid(name, getattr(self, name), "must be zero or more seconds")
        if self.backoff_max < self.backoff_initial:
            _invalid(
                "backoff_max",
                self.backoff_max,
                f"must not be smaller than backoff_initial ({self.backoff_initial})",
            )
        if self.handler_timeout is not None and not self.handler_timeout > 0:
            _invalid("handler_timeout", self.handler_timeout, "must be a positive number of seconds")
        if self.max_stuck_handlers is not None and self.max_stuck_handlers < 0:
            _invalid("max_stuck_handlers", self.max_stuck_handlers, "must be a whole number, 0 or more")
        if self.retention < dt.timedelta(0):
            _invalid("retention", self.retention, "must be a duration (7d) or off")
        if self.stuck_after <= dt.timedelta(0):
            _invalid("stuck_after", self.stuck_after, "must be a positive duration (5m)")
        if not self.maintenance_interval > 0:
            _invalid(
                "maintenance_interval", self.maintenance_interval, "must be a positive number of seconds"
            )
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            _invalid("metrics_port", self.metrics_port, "must be a TCP port number (1-65535)")
        if not self.metrics_interval > 0:
            _invalid("metrics_interval", self.metrics_interval, "must be a positive number of seconds")
        if not 1 <= self.web_port <= 65535:
            _invalid("web_port", self.web_port, "must be a TCP port number (1-65535)")

    @classmethod
    def load(cls, explicit: Mapping[str, Any], *, config_file: str | Path | None = None) -> Settings:
        """Build the settings: ``explicit`` values (flags and environment) over the file over defaults.

        ``explicit`` maps field names to values already converted by the CLI (e.g. ``int`` for
        ``batch_size``); ``None`` values count as not given.
        """
        values: dict[str, Any] = {}
        if config_file is not None:
            values.update(_read_secret_files(read_config_file(config_file), f" in config file {config_file}"))
        given: dict[str, Any] = {}
        for name, value in explicit.items():
            name = _ALIASES.get(name, name)
            if name not in _KINDS:
                raise ConfigError(f"unknown setting {name!r}")
            if value is not None:
                given[name] = _convert(name, value, "")
        values.update(_read_secret_files(given, ""))
        if "database_url" not in values:
            raise ConfigError(
                "no database URL: set OUTBOX_DATABASE_URL or OUTBOX_DATABASE_URL_FILE, pass --database-url "
                "or --database-url-file, or add database_url to the config file"
            )
        return cls(**values)

    @property
    def masked_url(self) -> str:
        """The database URL with its password hidden, for messages and logs."""
        return mask_url(self.database_url)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every password in these settings (the database URL's, in any form, and the SASL one), so that
        all output can be scrubbed of them (:func:`outbox.redaction.remember`)."""
        found = url_secrets(normalise_url(self.database_url))
        if self.kafka_sasl_password:
            found = (*found, self.kafka_sasl_password)
        for line in (self.web_auth or "").splitlines():
            password = line.strip().partition(":")[2]
            if password:
                found = (*found, password)
        return found

    def kafka_options(self) -> dict[str, Any] | None:
        """Keyword arguments for ``relay.publishers.kafka.KafkaSettings`` (``None``: Kafka not configured).

        Only what was set is included, so the publisher's own defaults apply to the rest.
        """
        if not self.kafka_bootstrap_servers:
            return None
        names = {
            "kafka_bootstrap_servers": "bootstrap_servers",
            "kafka_client_id": "client_id",
            "kafka_client": "client",
            "kafka_security_protocol": "security_protocol",
            "kafka_sasl_mechanism": "sasl_mechanism",
            "kafka_sasl_username": "sasl_username",
            "kafka_sasl_password": "sasl_password",
            "kafka_ssl_cafile": "ssl_cafile",
            "kafka_ssl_certfile": "ssl_certfile",
            "kafka_ssl_keyfile": "ssl_keyfile",
            "kafka_compression": "compression_type",
            "kafka_linger_ms": "linger_ms",
            "kafka_batch_size": "batch_size",
            "kafka_request_timeout_ms": "request_timeout_ms",
            "kafka_delivery_timeout_ms": "delivery_timeout_ms",
        }
        options = {
            target: getattr(self, name) for name, target in names.items() if getattr(self, name) is not None
        }
        if options.get("security_protocol"):
            options["security_protocol"] = options["security_protocol"].upper()
        if self.kafka_routes:
            options["routes"] = self.kafka_routes
        return options

    def retry_policy(self) -> RetryPolicy:
        """The default retry policy for topics whose handler does not set its own."""
        return RetryPolicy(
            max_attempts=self.max_attempts, backoff_initial=self.backoff_initial, backoff_max=self.backoff_max
        )


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a TOML config file, converted and checked by name (unknown keys are errors)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found: fix --config / OUTBOX_CONFIG") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML files are UTF-8; tomllib lets the decode error through
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}): save it as UTF-8"
        ) from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = _ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
        if name not in _KINDS:
            known = ", ".join(
                [*sorted(k for k in _KINDS if k != "strict_order_topics"), "strict_order_topic"]
            )
            raise ConfigError(
                f"unknown setting {key!r} in config file {str(path)!r}: known settings are {known}"
            )
        values[name] = _convert(name, value, f" in config file {str(path)!r}")
    return values


def _read_secret_files(values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` with each ``*_file`` setting replaced by its setting, read from that file."""
    values = dict(values)
    for file_setting, setting in SECRET_FILES.items():
        path = values.pop(file_setting, None)
        if path is None:
            continue
        flag, file_flag = (_option_names(setting)[0], _option_names(file_setting)[0])
        if setting in values:
            raise ConfigError(f"give {flag} or {file_flag}{where}, not both")
        values[setting] = read_secret_file(path, file_flag)
    return values


def read_secret_file(path: str | Path, flag: str) -> str:
    """The secret held in the file at ``path`` (named by ``flag`` in errors), stripped of surrounding
    whitespace (the newline an editor or ``echo`` adds)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{flag} {str(path)!r}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{flag} {str(path)!r}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{flag} {str(path)!r}: cannot read it ({exc.strerror or exc})") from None
    secret = text.strip()
    if not secret:
        raise ConfigError(f"{flag} {str(path)!r} is empty")
    return secret


def _convert(name: str, value: Any, where: str) -> Any:
    """Check ``value`` against the kind of setting ``name`` and return it in the field's type."""
    kind = _KINDS[name]
    if kind.endswith("?"):
        kind = kind[:-1]
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"setting {name}{where} must be a string, got {value!r}")
        return value.upper() if name == "log_level" else value.lower() if name == "log_format" else value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"setting {name}{where} must be true or false, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"setting {name}{where} must be a whole number, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"setting {name}{where} must be a number of seconds, got {value!r}")
        return float(value)  # TOML's inf and nan are refused by Settings with the flags' values
    if kind == "duration":  # "7d", "90m", a number of seconds, or "off" (zero)
        if isinstance(value, dt.timedelta):
            return value
        if isinstance(value, str) and value.strip().lower() in ("off", "none", "never"):
            return dt.timedelta(0)
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not abs(value) <= MAX_SECONDS:  # TOML's inf and nan too
                raise ConfigError(
                    f"setting {name}{where} must be at most {MAX_DELAY.days} days, got {value!r}"
                )
            return dt.timedelta(seconds=value)
        if not isinstance(value, str):
            raise ConfigError(
                f"setting {name}{where} must be a duration such as 30s, 10m or 7d, got {value!r}"
            )
        try:
            return parse_duration(value)
        except ConfigError as exc:
            raise ConfigError(f"setting {name}{where}: {exc}") from None
    if kind == "routes":  # PATTERN=TOPIC items: a TOML array/table, or strings separated by commas/spaces
        pairs: list[tuple[Any, Any]]
        if isinstance(value, dict):
            pairs = list(value.items())
        else:
            entries = value.replace(",", " ").split() if isinstance(value, str) else value
            if not isinstance(entries, list | tuple) or not all(isinstance(v, str) for v in entries):
                raise ConfigError(f"setting {name}{where} must be PATTERN=TOPIC items, got {value!r}")
            pairs = [t.partition("=")[::2] for v in entries for t in v.replace(",", " ").split()]
        routes = tuple((str(p), str(t)) for p, t in pairs)
        for pattern, topic in routes:
            if not pattern or not topic:
                raise ConfigError(
                    f"invalid Kafka route {pattern}={topic}{where}: use OUTBOX_TOPIC_PATTERN=KAFKA_TOPIC, "
                    "e.g. --kafka-route 'audit.*=audit-log'"
                )
        return routes
    # list of topics: a TOML array, or a string of names separated by commas or spaces
    items: Iterable[Any] = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"setting {name}{where} must be a list of topic names, got {value!r}")
    return tuple(t for v in items for t in v.replace(",", " ").split())


def _option_names(name: str) -> tuple[str, str]:
    """The flag and the environment variable of setting ``name``."""
    option = "--" + ("strict-order-topic" if name == "strict_order_topics" else name.replace("_", "-"))
    env = "OUTBOX_" + option[2:].replace("-", "_").upper()
    return _FLAGS.get(name, option), env


def _invalid(name: str, value: object, rule: str) -> None:
    option, env = _option_names(name)
    raise ConfigError(f"invalid {name} {value!r}: {rule} (set {option}, {env} or {name} in the config file)")


# --- durations and points in time -------------------------------------------------------------------------

_DURATION = re.compile(
    r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|secs|m|min|mins|h|hr|hrs|d|day|days|w|wk|wks)?\s*$", re.I
)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> dt.timedelta:
    """``30s``, ``10m``, ``2h``, ``7d``, ``1w`` (a bare number is seconds) as a ``timedelta``.

    Raises :class:`ConfigError` saying what is expected.
    """
    match = _DURATION.match(text or "")
    if not match:
        raise ConfigError(f"invalid duration {text!r}: use a number and a unit, e.g. 30s, 10m, 2h or 7d")
    number, unit = match.groups()
    seconds = float(number) * _UNIT_SECONDS[(unit or "s")[0].lower()]
    if seconds > MAX_SECONDS:  # a timedelta of 1e12 days overflows
        raise ConfigError(f"invalid duration {text!r}: use at most {MAX_DELAY.days} days (100 years)")
    return dt.timedelta(seconds=seconds)


def format_duration(value: dt.timedelta) -> str:
    """The shortest spelling :func:`parse_duration` reads back as ``value``: ``7d``, ``5m``, ``90s``."""
    seconds = value.total_seconds()
    for unit in ("d", "h", "m"):
        if seconds and seconds % _UNIT_SECONDS[unit] == 0:
            return f"{seconds / _UNIT_SECONDS[unit]:g}{unit}"
    return f"{seconds:g}s"


def format_number(value: float) -> str:
    """A default as a help text shows it: ``30`` for 30.0, ``0.5``, ``67108864`` (never ``6.7e+07``)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parse_time_ref(text: str, *, now: dt.datetime) -> dt.datetime:
    """A point in time as naive UTC: an ISO 8601 datetime or date (naive means UTC; an offset is
    converted), or a duration meaning "that long before ``now``" (``2h`` = two hours ago)."""
    if _DURATION.match(text or "") and not text.strip().isdigit():
        return now - parse_duration(text)
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"invalid time {text!r}: use an ISO datetime (2024-05-01T12:00, UTC unless it has an offset) "
            "or a duration meaning that long ago (10m, 2h, 7d)"
        ) from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
    return moment
