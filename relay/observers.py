"""Hooks into a running relay, for metrics and anything else that watches it (dramatiq's middleware).

``Relay(..., observers=[...])`` calls each observer at a few points of its life, on the relay's own
threads. Subclass :class:`RelayObserver` and override what you need; every hook does nothing by
default. Hooks must be quick (they run on the claim and completion paths) and must not raise: an
exception is logged and ignored, it never disturbs delivery.

=====================  ==================  =================================================================
hook                   thread              when
=====================  ==================  =================================================================
``on_start(relay)``    caller of start()   the relay's threads run (its schema was checked)
``on_claimed``         fetcher             after each successful claim query, with the rows (maybe none)
                                           and the seconds the query took
``on_outcomes``        completer           after a batch of outcomes was written: one
                                           :class:`RecordedOutcome` per delivery, with what it became
``on_fenced(count)``   completer           delivered marks that found their lease taken over (count > 0)
``on_stop(relay)``     caller of stop()    every outcome was written and the threads have ended
=====================  ==================  =================================================================

:mod:`relay.metrics` is the observer behind ``outbox relay --metrics-port``. What an outcome became
(:class:`RecordedOutcome`, :data:`~relay._outcomes.Result`) is :mod:`relay._outcomes`, shared with the
completer that writes them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from relay._claim import ClaimedRow
from relay._outcomes import RecordedOutcome

if TYPE_CHECKING:
    from relay._runner import Relay

log = logging.getLogger("outbox.relay")


class RelayObserver:
    """Base class of relay observers: every hook is a no-op (see the module docstring)."""

    def on_start(self, relay: Relay) -> None:
        """The relay started."""

    def on_claimed(self, rows: Sequence[ClaimedRow], seconds: float) -> None:
        """A claim query returned ``rows`` (possibly none) after ``seconds``."""

    def on_outcomes(self, outcomes: Sequence[RecordedOutcome]) -> None:
        """A batch of outcomes was written (or, during a stop that ran out of time, given up on)."""

    def on_fenced(self, count: int) -> None:
        """``count`` delivered marks were fenced off: another relay had taken their messages over."""

    def on_stop(self, relay: Relay) -> None:
        """The relay stopped."""


class Observers(RelayObserver):
    """Several observers behind one: calls each in order, logging (never raising) what they raise."""

    def __init__(self, observers: Iterable[RelayObserver] = ()) -> None:
        self.observers = list(observers)

    def _each(self, hook: str, *args: object) -> None:
        for observer in self.observers:
            try:
                getattr(observer, hook)(*args)
            except Exception:
                log.exception("relay observer %r failed in %s; ignored", observer, hook)

    def on_start(self, relay: Relay) -> None:
        self._each("on_start", relay)

    def on_claimed(self, rows: Sequence[ClaimedRow], seconds: float) -> None:
        if self.observers:
            self._each("on_claimed", rows, seconds)

    def on_outcomes(self, outcomes: Sequence[RecordedOutcome]) -> None:
        if self.observers:
            self._each("on_outcomes", outcomes)

    def on_fenced(self, count: int) -> None:
        self._each("on_fenced", count)

    def on_stop(self, relay: Relay) -> None:
        self._each("on_stop", relay)


__all__ = ["Observers", "RecordedOutcome", "RelayObserver"]
