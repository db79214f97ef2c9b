"""The ``outbox`` group itself: how every failure becomes one line on stderr and an exit code.

Errors never print a traceback for a user mistake: each :class:`~outbox._errors.OutboxError`, usage error
or database error becomes one line ``outbox: error: <message>`` on stderr (database passwords masked)
and one of the exit codes below. Only a bug (any other exception) prints its traceback. The commands
are attached to the group in :mod:`outbox.cli`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import click
import sqlalchemy as sa

from outbox._dialects import is_outage
from outbox._errors import (
    BrokerError,
    ConfigError,
    DatabaseUnavailable,
    MessageNotFound,
    OutboxError,
    RelayConflict,
    RelayFailed,
    SchemaError,
    first_line,
)
from outbox.cli._options import shared_options
from outbox.redaction import scrub

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
#: a thread ``outbox relay`` cannot work without died (a claim's MemoryError, a bug): it stopped rather
#: than live on claiming nothing; restart it (its unfinished messages come back after their lease)
RET_CRASHED = 8
#: the Kafka cluster cannot be reached or refused the request (``outbox consume``, ``outbox dlq replay``)
RET_BROKER = 9

_EXIT_CODES: tuple[tuple[type[OutboxError], int], ...] = (
    (ConfigError, RET_CONFIG),
    (DatabaseUnavailable, RET_CONNECT),
    (SchemaError, RET_SCHEMA),
    (RelayConflict, RET_CONFLICT),
    (MessageNotFound, RET_NOT_FOUND),
    (RelayFailed, RET_CRASHED),
    (BrokerError, RET_BROKER),
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
    5 schema missing or outdated, 6 relay conflict, 7 message not found, 8 the relay crashed,
    9 Kafka unreachable or refusing.
    """


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry point (``outbox`` and ``python -m outbox``)."""
    outbox.main(args=argv, prog_name="outbox")
    raise AssertionError("unreachable")  # main() exits
