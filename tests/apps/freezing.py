"""The recording handlers, in a relay that freezes itself right after a chosen statement.

``tests.apps.freezing:registry`` is :data:`tests.apps.recording.registry`; importing this module also
hooks every engine so that the first statement whose text matches the regular expression in
``OUTBOX_TEST_FREEZE_AFTER`` (and, with ``OUTBOX_TEST_FREEZE_IF_EMPTY`` set, that found or changed no
row) stops the whole process (``SIGSTOP``) the moment the database has answered
it: before whatever the relay would do next, such as a ``COMMIT``. That is the worst instant for a GC
pause or a VM freeze, made exact instead of left to chance; the test continues the process with
``SIGCONT``.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from typing import Any

import sqlalchemy as sa

from tests.apps.recording import registry

__all__ = ["EMPTY_ENV", "FREEZE_ENV", "registry"]

FREEZE_ENV = "OUTBOX_TEST_FREEZE_AFTER"
#: set (to anything) to freeze only after a matching statement that found or changed no row
EMPTY_ENV = "OUTBOX_TEST_FREEZE_IF_EMPTY"

_pattern = re.compile(os.environ.get(FREEZE_ENV) or r"(?!)")  # unset: matches nothing
_only_empty = bool(os.environ.get(EMPTY_ENV))
_frozen = False


@sa.event.listens_for(sa.Engine, "after_cursor_execute")
def _freeze_after(conn: sa.Connection, cursor: Any, statement: str, *args: Any) -> None:
    global _frozen
    if _frozen or not _pattern.search(statement) or (_only_empty and cursor.rowcount != 0):
        return
    _frozen = True
    print(f"freezing after: {statement} (rowcount {cursor.rowcount})", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
