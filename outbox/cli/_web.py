"""``outbox web``: serve the dashboard (:mod:`outbox.web`) with uvicorn, until SIGTERM or SIGINT.

Safe by default: without credentials (``OUTBOX_WEB_AUTH=user:password``, or ``--auth-file`` with one
``user:password`` per line) the dashboard listens on a loopback address only, and any other ``--host``
is refused with exit code 3, so an open dashboard is never exposed by accident. With credentials, every
request needs HTTP basic auth (:mod:`outbox.web._auth`). The web extra is imported only here, when the
command runs: the other commands, and ``import outbox``, never need it.
"""

from __future__ import annotations

import logging

import click

from outbox._errors import ConfigError
from outbox.cli._config import Settings
from outbox.cli._options import (
    KAFKA_CONNECTION_NAMES,
    StopSignals,
    kafka_connection_flags,
    open_engine,
    settings_command,
)

#: where a dashboard nobody logs in to may listen: this machine only
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MISSING_EXTRA = "outbox web needs the web extra: pip install 'sqla-outbox[web]'"

log = logging.getLogger("outbox.web")


@click.command()
@click.option(
    "--host",
    "web_host",
    envvar="OUTBOX_WEB_HOST",
    metavar="ADDRESS",
    help="Address to listen on (default 127.0.0.1; any other needs credentials).  [env: OUTBOX_WEB_HOST]",
)
@click.option(
    "--port",
    "web_port",
    type=int,
    envvar="OUTBOX_WEB_PORT",
    help="Port to listen on (default 8080).  [env: OUTBOX_WEB_PORT]",
)
@click.option(
    "--auth",
    "web_auth",
    envvar="OUTBOX_WEB_AUTH",
    metavar="USER:PASSWORD",
    help="Require HTTP basic auth with this user and password: give it in the environment variable or "
    "--auth-file, as flags are visible to every user in ps.  [env: OUTBOX_WEB_AUTH]",
)
@click.option(
    "--auth-file",
    "web_auth_file",
    envvar="OUTBOX_WEB_AUTH_FILE",
    metavar="FILE",
    help="Require HTTP basic auth with the user:password lines of this file.  [env: OUTBOX_WEB_AUTH_FILE]",
)
@click.option(
    "--hide-payloads",
    "hide_payloads",
    is_flag=True,
    default=None,
    envvar="OUTBOX_HIDE_PAYLOADS",
    help="Never show payloads or headers (where they hold personal data).  [env: OUTBOX_HIDE_PAYLOADS]",
)
@click.option(
    "--allow-actions",
    "web_allow_actions",
    is_flag=True,
    default=None,
    envvar="OUTBOX_WEB_ALLOW_ACTIONS",
    help="Offer replay and purge (each with a dry-run count and a confirmation; every action logged); "
    "default read-only.  [env: OUTBOX_WEB_ALLOW_ACTIONS]",
)
@click.option(
    "--trace-url",
    "web_trace_url",
    envvar="OUTBOX_WEB_TRACE_URL",
    metavar="URL",
    help="Link each message with a traceparent header to its trace: {trace_id} in URL is replaced by "
    "its trace id, e.g. https://jaeger.example/trace/{trace_id}.  [env: OUTBOX_WEB_TRACE_URL]",
)
@kafka_connection_flags(
    servers_help="Kafka brokers that replayed dead letters of `outbox consume` go to (without them the "
    "dashboard shows dead letters and does not replay them).",
)
@settings_command(
    "web_host",
    "web_port",
    "web_auth",
    "web_auth_file",
    "hide_payloads",
    "web_allow_actions",
    "web_trace_url",
    *KAFKA_CONNECTION_NAMES,
)
def web(settings: Settings) -> None:
    """Serve the web dashboard (overview, messages, keys, dead letters) until SIGTERM or SIGINT.

    Read-only unless --allow-actions."""
    if settings.web_auth is None and settings.web_host not in LOOPBACK_HOSTS:
        raise ConfigError(
            f"refusing to serve the dashboard on {settings.web_host} without authentication: set "
            "OUTBOX_WEB_AUTH=user:password or --auth-file, or listen on 127.0.0.1"
        )
    try:
        import uvicorn

        from outbox.web import create_app
        from outbox.web._auth import BasicAuth, parse_credentials
    except ImportError:
        raise ConfigError(MISSING_EXTRA) from None
    credentials = (
        None
        if settings.web_auth is None
        else parse_credentials(settings.web_auth, "the web credentials (OUTBOX_WEB_AUTH or --auth-file)")
    )
    kafka = None
    if settings.kafka_bootstrap_servers:
        from outbox._runtime.kafka_settings import KafkaConnection
        from outbox.cli._consume import connection_values, quiet_kafka_logs

        quiet_kafka_logs(settings)
        kafka = KafkaConnection(**{"client_id": "outbox-web", **connection_values(settings)})
    engine = open_engine(settings)
    try:
        app = create_app(
            engine,
            table=settings.table,
            hide_payloads=settings.hide_payloads,
            allow_actions=settings.web_allow_actions,
            kafka=kafka,
            trace_url=settings.web_trace_url,
        )
        served = app if credentials is None else BasicAuth(app, credentials)
        log.info(
            "dashboard of outbox table %r on http://%s:%d/ (%s, %s)",
            settings.table,
            f"[{settings.web_host}]" if ":" in settings.web_host else settings.web_host,
            settings.web_port,
            "basic auth" if credentials else "no authentication: this machine only",
            "replay and purge allowed" if settings.web_allow_actions else "read-only",
        )
        # uvicorn stops gracefully on SIGTERM/SIGINT, then raises the signal again for the handler it
        # found: StopSignals' handler only records it, so a graceful stop exits 0, as `outbox relay` does.
        with StopSignals(on_second="the dashboard was stopping anyway"):
            # log_config=None: uvicorn's loggers go through outbox's handler (text or JSON, scrubbed)
            uvicorn.run(
                served,
                host=settings.web_host,
                port=settings.web_port,
                log_config=None,
                log_level=settings.log_level.lower(),
            )
    finally:
        engine.dispose()
