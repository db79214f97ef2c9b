"""Destinations a claimed message can be delivered to, behind one small interface.

The relay claims rows, turns each into a :class:`Delivery`, asks its router which :class:`Publisher`
takes it, and hands it over. A publisher reports each outcome through the ``done`` callback, from any
thread, exactly once per delivery:

- :class:`Delivered`: the message reached its destination (``marked=True`` when the publisher already
  wrote the delivered mark itself, in the handler's own transaction);
- :class:`Failed`: the attempt failed; the relay applies the topic's retry policy (``permanent=True``
  skips the remaining attempts: the error cannot go away by retrying);
- :class:`Released`: not attempted, or interrupted by an infrastructure outage (database or broker):
  the row goes back to the queue and the attempt is not counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from outbox._message import Message
from outbox._policy import TopicPolicy


@dataclass(frozen=True, slots=True)
class Delivery:
    """One claimed message on its way to a destination."""

    seq: int
    token: str
    message: Message
    policy: TopicPolicy
    #: the last message of its key's run in this claim (or a message without a key): once it is
    #: delivered, the key's next messages are brought back to the claim (relay._claim, promotion)
    run_end: bool = True
    #: its attempt was counted before it started (a message taken back from an expired lease:
    #: ``relay._claim``, invariant 10), so its outcome's mark does not count it again
    counted: bool = False


@dataclass(frozen=True, slots=True)
class Delivered:
    marked: bool = False


@dataclass(frozen=True, slots=True)
class Failed:
    error: str
    permanent: bool = False


@dataclass(frozen=True, slots=True)
class Released:
    reason: str
    #: seconds before the message may be claimed again (e.g. a pause while a broker is away)
    retry_after: float = 0.0


Outcome = Delivered | Failed | Released
DoneCallback = Callable[[Delivery, Outcome], None]


class Publisher(Protocol):
    """A destination for messages: in-process handlers, Kafka, ... (``Relay(publishers=[...])`` adds
    one of your own; the relay asks each, in order, whether it :meth:`accepts` a topic).

    An optional method, ``routed_topics() -> Sequence[str] | None``, lists every topic the publisher
    accepts (exact names and shell-style patterns such as ``orders.*``; None: it may accept any topic).
    When every publisher of a relay lists its topics, the relay claims messages of those topics only,
    and leaves the others, attempts untouched, to relays that route them; without it the relay claims
    every topic and gives back, without counting an attempt, what no publisher accepts.

    Two optional class attributes change how the relay hands deliveries over; a publisher without them
    gets the safe default (``False``):

    - ``keeps_order_in_flight``: a key's consecutive deliveries of one topic may be in flight together,
      because the destination keeps the order they were sent in (Kafka's idempotent producer);
    - ``marks_starts``: the publisher writes a ``counted`` delivery's start mark itself, right before it
      runs (the in-process handlers).
    """

    #: whether deliveries need ``message.payload`` decoded; a broker publisher sends ``message.body``,
    #: the stored bytes, and gets the raw bytes in ``payload`` too (no JSON decoding per record)
    decodes_payload: bool

    def accepts(self, topic: str) -> bool:
        """Whether this publisher delivers ``topic``'s messages (the first publisher that accepts a
        topic gets all of them; the relay's in-process handlers are asked first)."""

    def deliver(self, deliveries: Sequence[Delivery], done: DoneCallback) -> None:
        """Start delivering; report each delivery's outcome, exactly once, through the ``done`` it was
        delivered with (from any thread), whoever decides it: a key's run hands out its next message,
        and the lane of reclaimed messages its next one, only when their callback hears."""

    def check_timeouts(self, done: DoneCallback) -> None:
        """Called periodically: report deliveries that ran past their topic's timeout as failed (to
        their own callback; ``done`` is the relay's, for what has no callback of its own)."""

    def stop(self, timeout: float, done: DoneCallback) -> None:
        """Stop: release what has not started, wait up to ``timeout`` seconds for what runs (outcomes
        go to each delivery's own callback, as in :meth:`deliver`)."""


@runtime_checkable
class BrokerPublisher(Publisher, Protocol):
    """A publisher to a broker, which can say whether the broker is usable: ``/readyz``'s ``broker``
    check (:mod:`relay.health`) calls :meth:`broker_problem` of every publisher that has it."""

    def broker_problem(self, timeout: float = 1.0) -> str | None:
        """Why the broker looks unreachable now (``None``: it looks fine), within ``timeout`` seconds."""


def describe_error(exc: BaseException) -> str:
    """``Type: message`` for storing as a message's last error."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def error_of(outcome: Outcome) -> str | None:
    """The error an outcome reports (``None`` when delivered), e.g. to end a delivery's span with."""
    if isinstance(outcome, Failed):
        return outcome.error
    if isinstance(outcome, Released):
        return outcome.reason
    return None


__all__ = [
    "BrokerPublisher",
    "Delivered",
    "Delivery",
    "DoneCallback",
    "Failed",
    "Outcome",
    "Publisher",
    "Released",
    "describe_error",
    "error_of",
]
