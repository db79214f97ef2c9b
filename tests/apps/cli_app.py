"""Handlers for the CLI tests: ``outbox relay --app tests.apps.cli_app:registry``.

- ``cli.ok`` succeeds and appends the message id to the file named by ``CLI_APP_LOG`` (when set), so a
  test in another process sees what was handled;
- ``cli.fail`` always fails, with one attempt, so its messages go dead at once;
- ``cli.gc`` appends ``gc <objects frozen>`` to that file (``outbox relay`` freezes its start-up heap);
- ``cli.slow`` sleeps ``payload["sleep"]`` seconds, to hold a relay busy while it is asked to stop.
"""

from __future__ import annotations

import gc
import os
import time

from consumers import Registry
from outbox import Message

registry = Registry()


@registry.handler("cli.ok")
def record(message: Message) -> None:
    path = os.environ.get("CLI_APP_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"{message.id}\n")


@registry.handler("cli.gc")
def report_gc(message: Message) -> None:
    with open(os.environ["CLI_APP_LOG"], "a", encoding="utf-8") as fh:
        fh.write(f"gc {gc.get_freeze_count()}\n")


@registry.handler("cli.fail", max_attempts=1)
def fail(message: Message) -> None:
    raise RuntimeError(f"cli.fail always fails ({message.payload!r})")


@registry.handler("cli.slow")
def slow(message: Message) -> None:
    time.sleep(float(message.payload.get("sleep", 1.0)))
