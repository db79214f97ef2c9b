"""What every ``outbox`` command shares: its options, how they become :class:`~outbox.cli._config.Settings`,
logging, the database connection, and the parameter types for durations, times and message ids.

The shared options (``--database-url``, ``--table``, ``--config``, ``--log-level``, ``--log-format``) are
accepted both on the group and on each command (``outbox --table t status`` and ``outbox status --table
t`` mean the same); a flag on the command beats one on the group, and any flag beats its ``OUTBOX_*``
environment twin, which beats the config file, which beats the defaults.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from types import FrameType
from typing import Any

import click
import sqlalchemy as sa
from click.core import ParameterSource

from outbox import _defaults as defaults
from outbox._clock import utcnow
from outbox._dialects import create_engine
from outbox._errors import ConfigError, DatabaseUnavailable, first_line
from outbox._runtime.kafka_settings import SASL_MECHANISMS, SECURITY_PROTOCOLS
from outbox._schema import check_version
from outbox.admin._reports import message_ref
from outbox.cli._config import (
    LOG_FORMATS,
    LOG_LEVELS,
    SECRET_FILES,
    Settings,
    format_number,
    parse_duration,
    parse_time_ref,
)
from outbox.redaction import mask_url, remember, scrub

F = Callable[..., Any]

_SHARED: list[Callable[[F], F]] = [
    click.option(
        "--database-url",
        envvar="OUTBOX_DATABASE_URL",
        metavar="URL",
        help="Database holding the outbox, e.g. postgresql://user@host/db. A URL with a password belongs "
        "in the environment variable or --database-url-file: flags are visible to every user in ps.  "
        "[env: OUTBOX_DATABASE_URL]",
    ),
    click.option(
        "--database-url-file",
        envvar="OUTBOX_DATABASE_URL_FILE",
        metavar="FILE",
        help="Read the database URL from this file (stripped), e.g. a mounted secret.  "
        "[env: OUTBOX_DATABASE_URL_FILE]",
    ),
    click.option(
        "--table",
        envvar="OUTBOX_TABLE",
        metavar="NAME",
        help="Base name of the outbox tables (default: outbox).  [env: OUTBOX_TABLE]",
    ),
    click.option(
        "--config",
        envvar="OUTBOX_CONFIG",
        metavar="FILE",
        type=click.Path(dir_okay=False),
        help="TOML file of settings named like the long options (batch_size = 500).  [env: OUTBOX_CONFIG]",
    ),
    click.option(
        "--log-level",
        envvar="OUTBOX_LOG_LEVEL",
        type=click.Choice(LOG_LEVELS, case_sensitive=False),
        help="Logging threshold (default: INFO).  [env: OUTBOX_LOG_LEVEL]",
    ),
    click.option(
        "--log-format",
        envvar="OUTBOX_LOG_FORMAT",
        type=click.Choice(LOG_FORMATS, case_sensitive=False),
        help="Log lines as text or one JSON object per line (default: text).  [env: OUTBOX_LOG_FORMAT]",
    ),
]
SHARED_NAMES = ("database_url", "database_url_file", "table", "config", "log_level", "log_format")


def env_option(
    name: str, kind: Any, help_text: str, *, env: str | None = None, **extra: Any
) -> Callable[[F], F]:
    """A command's own setting as a flag with its ``OUTBOX_*`` environment twin (``batch_size``:
    ``--batch-size`` / ``OUTBOX_BATCH_SIZE``; ``env`` names another twin, for a flag two commands
    spell alike with different meanings), the twin shown in the help."""
    env = env or "OUTBOX_" + name.upper()
    flag = "--" + name.replace("_", "-")
    return click.option(flag, name, type=kind, envvar=env, help=f"{help_text}  [env: {env}]", **extra)


def option_group(*options: Callable[[F], F]) -> Callable[[F], F]:
    """Options several commands share, applied in the order given (as if stacked as decorators)."""

    def decorate(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


#: the shared options (database, table, config, logging), for every command and the group
shared_options = option_group(*_SHARED)


def settings_command(*setting_names: str) -> Callable[[F], F]:
    """Turn a click callback into one that receives validated :class:`Settings` as its first argument.

    The shared options are added to the command; ``setting_names`` are the command's own parameters
    that are settings too (e.g. ``batch_size`` for ``outbox relay``): they are taken out of the
    callback's keyword arguments and put into the settings.
    """

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(**kwargs: Any) -> Any:
            ctx = click.get_current_context()
            settings = build_settings(ctx, (*SHARED_NAMES, *setting_names))
            configure_logging(settings)
            rest = {k: v for k, v in kwargs.items() if k not in SHARED_NAMES and k not in setting_names}
            return func(settings, **rest)

        return shared_options(wrapper)

    return decorate


def build_settings(ctx: click.Context, names: tuple[str, ...]) -> Settings:
    """Settings from the explicit values on this command and its parent groups (see module doc)."""
    chain: list[click.Context] = []
    current: click.Context | None = ctx
    while current is not None:  # outbox -> db -> upgrade: the group's options are two levels up
        chain.insert(0, current)
        current = current.parent
    ranked: list[tuple[int, str, Any]] = []
    for depth, context in enumerate(chain):
        for name in names:
            if name not in context.params:
                continue
            source = context.get_parameter_source(name)
            if source is ParameterSource.COMMANDLINE:
                ranked.append((1000 + depth, name, context.params[name]))
            elif source is ParameterSource.ENVIRONMENT:
                ranked.append((depth, name, context.params[name]))
    # A secret and its *_file twin (--database-url, --database-url-file) are one setting given two ways:
    # the higher rank wins; the same rank (two flags, two variables) is left for Settings.load to refuse.
    twins = {**SECRET_FILES, **{setting: file for file, setting in SECRET_FILES.items()}}
    explicit: dict[str, Any] = {}
    ranks: dict[str, int] = {}
    for rank, name, value in sorted(ranked, key=lambda item: item[0]):
        twin = twins.get(name)
        if twin is not None and twin in explicit and ranks[twin] < rank:
            del explicit[twin]
        explicit[name] = value
        ranks[name] = rank
    config_file = explicit.pop("config", None)
    if "strict_order_topic" in explicit:
        explicit["strict_order_topics"] = tuple(explicit.pop("strict_order_topic"))
    settings = Settings.load(explicit, config_file=config_file)
    # Messages already show URLs masked; this is the second guard (outbox.redaction), against a driver or
    # a library echoing a password: every log line, error and ops-server body is scrubbed of these.
    remember(settings.secrets)
    return settings


# --- logging ---------------------------------------------------------------------------------------------


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (so test runners that swap it see the logs)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(scrub(self.format(record)) + "\n")  # every log line, every library
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO), ``level``, ``logger``, ``message`` (+ ``exc``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": scrub(record.getMessage()),  # before JSON escaping could hide a secret
        }
        if record.exc_info:
            entry["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(settings: Settings) -> None:
    """Send logs to stderr at the configured level and format (replacing an earlier call's handler)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    handler = _StderrHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    # kafka-python logs every connection attempt at INFO; the publisher and consumer log what matters
    # (a broker unreachable, and back) once: its chatter shows at DEBUG only.
    logging.getLogger("kafka").setLevel(logging.DEBUG if settings.log_level == "DEBUG" else logging.WARNING)


# --- the database ----------------------------------------------------------------------------------------


def open_engine(settings: Settings, *, check_schema: bool = True) -> sa.Engine:
    """An engine on the configured database, after one connection proved it reachable.

    Raises :class:`DatabaseUnavailable` (with the password masked) when it is not, and, when
    ``check_schema``, :class:`~outbox._errors.SchemaError` unless the outbox tables are current.
    """
    engine = create_engine(settings.database_url, must_exist=check_schema)
    try:
        with engine.connect() as conn:
            if check_schema:
                check_version(conn, settings.table)
    except sa.exc.DBAPIError as exc:
        engine.dispose()
        raise DatabaseUnavailable(
            f"cannot connect to the database at {mask_url(settings.database_url)}: "
            f"{first_line(exc.orig or exc)}"
        ) from None
    except BaseException:
        engine.dispose()
        raise
    return engine


# --- values typed by operators -------------------------------------------------------------------------
# Option callbacks (rather than click.ParamType subclasses, whose generic signature changed across click
# releases): a bad value is a usage error naming the option, like click's own types.


def _convert_each(value: Any, convert: Callable[[str], Any]) -> Any:
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(convert(v) for v in value)
    return convert(value)


def duration_option(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """``30s``, ``10m``, ``2h``, ``7d`` -> ``timedelta`` (see :func:`outbox.cli._config.parse_duration`)."""
    try:
        return _convert_each(value, parse_duration)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def time_option(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """An ISO datetime (UTC unless it has an offset) or a duration ago -> naive UTC ``datetime``."""
    now = utcnow()
    try:
        return _convert_each(value, lambda text: parse_time_ref(text, now=now))
    except ConfigError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def message_id_option(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A message as an operator names it: its SEQ (an ``int``, the first column of ``outbox list``) or
    its id (a ``uuid.UUID``); or a tuple of them for ``nargs=-1``."""

    def convert(text: str) -> uuid.UUID | int:
        ref = message_ref(text)
        if ref is None:
            raise click.BadParameter(
                f"{text.strip()!r} is neither a SEQ (a whole number, the first column of `outbox list`) "
                "nor a message id (a UUID like 0190a1b2-...)",
                ctx,
                param,
            )
        return ref

    return _convert_each(value, convert)


class StopSignals:
    """``with StopSignals(...)``: SIGTERM or SIGINT asks a long-running command to stop gracefully.

    The first signal's name goes into ``received``; a second one exits at once with status 1, after
    printing ``on_second`` (what that costs) to stderr. The previous handlers come back on leaving the
    block. Shared by ``outbox relay`` and ``outbox consume``, whose main thread waits in :meth:`wait`.

    The handler only records the name. Python runs it in the main thread between any two bytecodes, so
    it must not take a lock that the code it interrupts may hold: a ``threading.Event.set()`` there
    deadlocks when the main thread was inside that Event's ``wait()``, which holds the Event's lock
    around its sleep (a relay that never stopped on SIGTERM; tests/test_cli_signals.py).
    """

    #: seconds between :meth:`wait`'s looks at ``received``: the longest a stop waits to be noticed
    POLL = 0.05

    def __init__(self, on_second: str) -> None:
        self.received: str | None = None
        self._on_second = on_second
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            os.write(2, f"outbox: second {name}: exiting now; {self._on_second}\n".encode())
            os._exit(1)  # RET_ERROR
        self.received = name

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until a stop signal has come, or ``timeout`` seconds have passed; true once one has.

        Short sleeps and no lock (see the class docstring): a signal does not cut ``time.sleep`` short,
        its handler runs and the sleep goes on, so each sleep lasts at most :attr:`POLL`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.received is None:
            left = self.POLL if deadline is None else deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, self.POLL))
        return self.received is not None

    def __enter__(self) -> StopSignals:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)


#: --app of ``outbox relay`` and ``outbox consume``: where the handlers are registered
app_flag = env_option(
    "app",
    str,
    "Module (and Registry attribute) of the handlers: MODULE or MODULE:ATTR.",
    metavar="MODULE[:ATTR]",
)
#: the retry backoff flags of ``outbox relay`` and ``outbox consume``
backoff_flags = option_group(
    env_option(
        "backoff_initial",
        float,
        "Seconds before the first retry, doubling after "
        f"(default {format_number(defaults.BACKOFF_INITIAL)}).",
    ),
    env_option(
        "backoff_max",
        float,
        f"Longest wait between retries, in seconds (default {format_number(defaults.BACKOFF_MAX)}).",
    ),
)
#: the metrics and health port flags of ``outbox relay`` and ``outbox consume``
metrics_flags = option_group(
    env_option(
        "metrics_port", int, "Serve /metrics (Prometheus), /healthz and /readyz on this port (default: off)."
    ),
    env_option(
        "metrics_host", str, f"Address the metrics port listens on (default {defaults.METRICS_HOST})."
    ),
)


#: the settings kafka_connection_flags declares, in its order
KAFKA_CONNECTION_NAMES = (
    "kafka_bootstrap_servers",
    "kafka_client_id",
    "kafka_security_protocol",
    "kafka_sasl_mechanism",
    "kafka_sasl_username",
    "kafka_sasl_password",
    "kafka_sasl_password_file",
    "kafka_ssl_cafile",
    "kafka_ssl_certfile",
    "kafka_ssl_keyfile",
)


def kafka_connection_flags(
    *,
    servers_help: str = "Kafka brokers to start from.",
    client_id_help: str = "Client id shown to the brokers.",
) -> Callable[[F], F]:
    """The Kafka connection flags (bootstrap servers, client id, TLS, SASL) of ``outbox relay``,
    ``outbox consume`` and ``outbox dlq replay``; each command says what its servers are for."""
    return option_group(
        env_option("kafka_bootstrap_servers", str, servers_help, metavar="HOST:PORT[,...]"),
        env_option("kafka_client_id", str, client_id_help),
        env_option(
            "kafka_security_protocol",
            click.Choice(SECURITY_PROTOCOLS, case_sensitive=False),
            "How to talk to the brokers (default PLAINTEXT).",
        ),
        env_option(
            "kafka_sasl_mechanism", click.Choice(SASL_MECHANISMS, case_sensitive=False), "SASL mechanism."
        ),
        env_option("kafka_sasl_username", str, "SASL user name."),
        env_option(
            "kafka_sasl_password",
            str,
            "SASL password: give it in the environment variable or --kafka-sasl-password-file, as flags are "
            "visible to every user in ps.",
            metavar="SECRET",
        ),
        env_option(
            "kafka_sasl_password_file",
            str,
            "Read the SASL password from this file (stripped).",
            metavar="FILE",
        ),
        env_option("kafka_ssl_cafile", str, "CA certificates (PEM) to verify the brokers.", metavar="FILE"),
        env_option("kafka_ssl_certfile", str, "Client certificate (PEM).", metavar="FILE"),
        env_option("kafka_ssl_keyfile", str, "Client private key (PEM).", metavar="FILE"),
    )
