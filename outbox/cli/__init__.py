"""The ``outbox`` command: run the relay, manage the schema, inspect and operate the outbox.

One module per command group; this package only assembles them under the root group::

    outbox relay --app MODULE[:ATTR]    deliver committed messages            (outbox.cli._relay)
    outbox db upgrade | db version      apply / show schema migrations        (outbox.cli._db)
    outbox status | list | show SEQ|ID  what is in the outbox, and why       (outbox.cli._messages)
    outbox replay | purge               send messages back / delete old ones  (outbox.cli._messages)
    outbox doctor                       check the database, explain each fix  (outbox.cli._doctor)
    outbox consume | dlq                consume from Kafka, its dead letters  (outbox.cli._consume, ._dlq)
    outbox web                          serve the web dashboard               (outbox.cli._web)

What every command shares (options, settings, logging, the engine) is :mod:`outbox.cli._options`; the root
group, the exit codes and how an error becomes one line on stderr are :mod:`outbox.cli._root`. Every flag
has an ``OUTBOX_*`` environment twin and a config-file key (see :mod:`outbox.cli._config`).

Public: :func:`main` (the console script) and the exit codes (``RET_*``, :func:`exit_code_for`). The
click group itself (:data:`outbox`, importable for tests driving it with ``CliRunner``) is internal.
"""

from __future__ import annotations

from outbox.cli._consume import consume
from outbox.cli._db import db
from outbox.cli._dlq import dlq
from outbox.cli._doctor import doctor
from outbox.cli._messages import list_messages, purge, replay, show, status
from outbox.cli._relay import relay
from outbox.cli._root import (
    RET_BROKER,
    RET_CONFIG,
    RET_CONFLICT,
    RET_CONNECT,
    RET_CRASHED,
    RET_ERROR,
    RET_NOT_FOUND,
    RET_OK,
    RET_SCHEMA,
    RET_USAGE,
    exit_code_for,
    main,
    outbox,
)
from outbox.cli._web import web

for _command in (db, status, list_messages, show, replay, purge, doctor, relay, consume, dlq, web):
    outbox.add_command(_command)

__all__ = [
    "RET_BROKER",
    "RET_CONFIG",
    "RET_CONFLICT",
    "RET_CONNECT",
    "RET_CRASHED",
    "RET_ERROR",
    "RET_NOT_FOUND",
    "RET_OK",
    "RET_SCHEMA",
    "RET_USAGE",
    "exit_code_for",
    "main",
]
