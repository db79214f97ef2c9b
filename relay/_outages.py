"""Riding out database outages: a relay retries every database operation until it works.

An outage (:func:`outbox._dialects.is_outage`: the server gone, restarting, refusing connections) is never
recorded against a message; the operation is retried with exponential backoff (tenacity), one warning
when the outage starts and one when it ends. A caller that is stopping can give up
(:class:`GaveUp`): the claim loop as soon as the relay stops, the completer when the stop's deadline has
passed (its outcomes then stay unrecorded, and their leases expire).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import tenacity

from outbox._dialects import is_outage
from relay.publishers import describe_error

log = logging.getLogger("outbox.relay")
T = TypeVar("T")


class GaveUp(Exception):
    """A database operation was abandoned during an outage because the relay is stopping."""


class OutageRetry:
    """Runs database operations for one relay, retrying them through outages (see the module docstring).

    The first try is a plain call (no retry machinery on the hot path); only an outage starts the
    retrying loop, and the relay stays in "outage" mode (every call under that loop) until one succeeds.
    """

    def __init__(self, stopping: threading.Event) -> None:
        self._stopping = stopping
        self._since: float | None = None  # when the current outage began (None: no outage)

    def run(self, fn: Callable[[], T], *, give_up: Callable[[], bool]) -> T:
        """Run ``fn``, retrying through outages with backoff until it works, or raise :class:`GaveUp` once
        the relay is stopping and ``give_up()`` is true. Any other error is raised as it is."""
        if self._since is None:  # the usual case: one plain call
            try:
                return fn()
            except Exception as exc:
                if not is_outage(exc):
                    raise
                # an outage: start over under the retrying loop (it logs, waits and tries again)
        retryer = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_outage),
            wait=tenacity.wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.2),
            stop=_StopWhen(give_up, self._stopping),
            before_sleep=self._began,
            reraise=True,
            sleep=time.sleep,
        )
        try:
            result = retryer(fn)
        except Exception as exc:
            if is_outage(exc):
                raise GaveUp() from exc
            raise
        if self._since is not None:
            log.warning("database reachable again after %.1fs", time.monotonic() - self._since)
            self._since = None
        return result

    def _began(self, state: tenacity.RetryCallState) -> None:
        if self._since is None:
            self._since = time.monotonic()
            exc = state.outcome.exception() if state.outcome else None
            log.warning("database unreachable (%s); retrying", describe_error(exc) if exc else "?")


class _StopWhen(tenacity.stop.stop_base):
    def __init__(self, give_up: Callable[[], bool], stopping: threading.Event) -> None:
        self.give_up = give_up
        self.stopping = stopping

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self.stopping.is_set() and self.give_up()
