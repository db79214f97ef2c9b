"""What a delivery's outcome became once the completer wrote it: the vocabulary the completer speaks
and the observers hear.

A publisher reports an :data:`~relay.publishers.Outcome` (delivered, failed, released); the completer
writes it and says what it did to the message: a :data:`Result`, carried in a :class:`RecordedOutcome`
to every :class:`~relay.observers.RelayObserver`. Its own module so that the completer (which produces
them) and the observers (which consume them) both import it, and neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from outbox._schema import Status
from relay.publishers import Delivery, Outcome

#: what an outcome did to its message: ``released`` = back to the queue, attempt not counted
Result = Literal["delivered", "failed", "dead", "parked", "released"]


_FAILURE_RESULTS: dict[Status, Result] = {
    Status.FAILED: "failed",
    Status.DEAD: "dead",
    Status.PARKED: "parked",
}


def failure_result(status: Status) -> Result:
    """The result of a failed attempt that made its message ``status`` (failed, dead or parked)."""
    return _FAILURE_RESULTS[status]


# Not frozen: one is made per message on the completer's path when anything observes the relay (the
# heartbeat always does), and a frozen dataclass' __init__ costs four times as much (0.57 against 0.13 us).
# Observers read it; none may change it.
@dataclass(slots=True)
class RecordedOutcome:
    """One delivery's outcome as the completer wrote it (read it; never change it)."""

    delivery: Delivery
    outcome: Outcome
    result: Result


__all__ = ["RecordedOutcome", "Result", "failure_result"]
