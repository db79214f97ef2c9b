"""Per-topic delivery policy: how often to retry, how long to wait between attempts, ordering strictness."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import tenacity

from outbox._errors import ConfigError
from outbox.writer import MAX_DELAY

#: the most seconds a backoff, a timeout, a lease or any setting in seconds may be: 100 years, as
#: ``outbox.add``'s longest delay (an infinite backoff passed ``>= 0``, then adding it to a time raised
#: OverflowError in the relay's completer)
MAX_SECONDS = MAX_DELAY.total_seconds()


@dataclass(frozen=True)
class RetryPolicy:
    """Retries with exponential backoff and jitter (tenacity's ``wait_exponential_jitter``).

    Attempt *n* failing waits ``min(backoff_max, backoff_initial * 2**(n-1) + random(0, jitter))``
    seconds before attempt *n+1*. After ``max_attempts`` failed attempts the message is dead.
    """

    max_attempts: int = 10
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    jitter: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be an integer of at least 1, got {self.max_attempts!r}")
        if not all(0 <= s <= MAX_SECONDS for s in (self.backoff_initial, self.backoff_max, self.jitter)):
            raise ConfigError(
                "backoff_initial, backoff_max and jitter must be zero or more seconds, finite, at most "
                f"{MAX_SECONDS:.0f}; got {self.backoff_initial!r}, {self.backoff_max!r}, {self.jitter!r}"
            )
        if self.backoff_max < self.backoff_initial:
            raise ConfigError(
                f"backoff_max ({self.backoff_max}) must not be smaller than "
                f"backoff_initial ({self.backoff_initial})"
            )

    def delay_after(self, attempt: int) -> dt.timedelta:
        """How long to wait after failed attempt number ``attempt`` (1-based)."""
        wait = tenacity.wait_exponential_jitter(
            multiplier=self.backoff_initial, max=self.backoff_max, exp_base=2, jitter=self.jitter
        )
        state = tenacity.RetryCallState(retry_object=tenacity.Retrying(), fn=None, args=(), kwargs={})
        state.attempt_number = max(1, attempt)
        return dt.timedelta(seconds=wait(state))

    def exhausted(self, attempt: int) -> bool:
        """True when failed attempt number ``attempt`` was the last one allowed."""
        return attempt >= self.max_attempts


@dataclass(frozen=True)
class TopicPolicy:
    """Everything the relay needs to know about delivering one topic.

    ``strict_order``: when a message of this topic goes dead, later messages of its key stay parked until
    it is replayed or purged (default: they go on). ``timeout``: seconds a handler may run before the
    attempt counts as failed (``None``: no limit).
    """

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float | None = None
    strict_order: bool = False

    def __post_init__(self) -> None:
        if self.timeout is not None and not 0 < self.timeout <= MAX_SECONDS:
            raise ConfigError(
                f"handler timeout must be a positive, finite number of seconds, got {self.timeout!r}"
            )


@dataclass(frozen=True)
class PolicyOverrides:
    """What one handler says about its topic's policy; ``None`` means "as the relay is configured"."""

    max_attempts: int | None = None
    backoff_initial: float | None = None
    backoff_max: float | None = None
    jitter: float | None = None
    timeout: float | None = None
    strict_order: bool | None = None

    def __post_init__(self) -> None:
        self.apply(TopicPolicy(retry=RetryPolicy(max_attempts=1, backoff_initial=0, backoff_max=1e9)))

    def apply(self, base: TopicPolicy) -> TopicPolicy:
        """``base`` with these overrides applied (validated: raises ConfigError on bad values)."""
        retry = base.retry
        changes = {
            name: value
            for name in ("max_attempts", "backoff_initial", "backoff_max", "jitter")
            if (value := getattr(self, name)) is not None
        }
        if changes:
            merged = {**retry.__dict__, **changes}
            if "backoff_max" not in changes and merged["backoff_max"] < merged["backoff_initial"]:
                merged["backoff_max"] = merged["backoff_initial"]
            if "backoff_initial" not in changes and merged["backoff_initial"] > merged["backoff_max"]:
                merged["backoff_initial"] = merged["backoff_max"]
            retry = RetryPolicy(**merged)
        return TopicPolicy(
            retry=retry,
            timeout=self.timeout if self.timeout is not None else base.timeout,
            strict_order=self.strict_order if self.strict_order is not None else base.strict_order,
        )
