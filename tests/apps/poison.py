"""Handlers for the poison-message test: ``bill`` fails until the file named by OUTBOX_TEST_FIXED exists."""

from __future__ import annotations

import os
from pathlib import Path

from consumers import Registry
from outbox._message import Message

registry = Registry()


@registry.handler("bill", max_attempts=3, backoff_initial=0.05, backoff_max=0.1)
def bill(message: Message) -> None:
    if message.payload.get("poison") and not Path(os.environ["OUTBOX_TEST_FIXED"]).exists():
        raise ValueError(f"cannot bill order {message.payload['order']}: unknown currency 'XXX'")
