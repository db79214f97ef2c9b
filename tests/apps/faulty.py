"""Handlers that misbehave in every way a handler can: ``outbox relay --app tests.apps.faulty:registry``.

Each topic ``fault.<kind>`` fails its attempt by :data:`FAULTS` ``[kind]``; ``fault.ok`` succeeds and
appends ``<message id>`` to the file named by ``OUTBOX_TEST_RECORD``. Run the relay with a
``--handler-timeout`` for the hanging kinds: ``busy`` loops in Python (a timeout interrupts it),
``sleep`` and ``socket`` block in C (``time.sleep``, a read on a socket nobody writes to) where no
interruption reaches them, so their threads are handed off.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable

from consumers import Registry
from outbox import Message

registry = Registry()

#: sockets nobody writes to, kept open so that reads on them block for good
_silent: list[socket.socket] = []


def _exit(message: Message) -> None:
    sys.exit()


def _keyboard_interrupt(message: Message) -> None:
    raise KeyboardInterrupt


def _base_exception(message: Message) -> None:
    raise BaseException("a bare BaseException")


def _busy(message: Message) -> None:
    n = 0
    while True:  # pure Python: an interruption reaches it at its next bytecode
        n += 1


def _sleep(message: Message) -> None:
    time.sleep(3600)


def _socket(message: Message) -> None:
    reader, writer = socket.socketpair()
    _silent.append(writer)
    reader.recv(1)


FAULTS: dict[str, Callable[[Message], None]] = {
    "exit": _exit,
    "keyboard_interrupt": _keyboard_interrupt,
    "base_exception": _base_exception,
    "busy": _busy,
    "sleep": _sleep,
    "socket": _socket,
}
#: the error each kind leaves on its message (a prefix, for the timeouts)
ERRORS = {
    "exit": "SystemExit",
    "keyboard_interrupt": "KeyboardInterrupt",
    "base_exception": "BaseException: a bare BaseException",
    "busy": "HandlerTimeout",
    "sleep": "HandlerTimeout",
    "socket": "HandlerTimeout",
}

for _kind, _fault in FAULTS.items():
    registry.add(f"fault.{_kind}", _fault)


@registry.handler("fault.ok")
def ok(message: Message) -> None:
    fd = os.open(os.environ["OUTBOX_TEST_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{message.id}\n".encode())
    finally:
        os.close(fd)
