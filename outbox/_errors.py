"""The exception hierarchy: every error this project raises on purpose is an ``OutboxError``.

Catch by meaning::

    OutboxError
    ├── MessageError          invalid input to ``outbox.add`` (raised before anything is written)
    │   ├── PayloadError      payload is not JSON-serialisable and not bytes, or is larger than
    │   │                     max_payload_bytes (4 MiB by default)
    │   ├── TopicError        empty, too long, or characters outside [A-Za-z0-9._-] (a newline too)
    │   ├── MessageKeyError   key is not a string, longer than 255 characters, or holds a NUL or a
    │   │                     lone surrogate
    │   ├── HeaderError       a header name or value is not a string or holds a lone surrogate, or
    │   │                     the headers are larger than 64 KiB
    │   └── DelayError        negative, non-numeric or longer than 100 years
    ├── ConfigError           bad configuration: database URL, table name, --app, policy values
    ├── SchemaError           the outbox table is missing or at another schema version
    ├── DatabaseUnavailable   the database cannot be reached (at start-up; later outages are retried)
    ├── BrokerError           the Kafka cluster cannot be reached, or refused what a consumer or
    │                         ``outbox dlq replay`` asked of it
    ├── MessageNotFound       ``outbox show`` / ``replay`` of an id that does not exist
    ├── RelayConflict         a second relay on a SQLite database (SQLite allows one at a time)
    └── RelayFailed           a thread the relay cannot work without died: the relay stopped

The CLI turns each of these into one line on stderr and a non-zero exit code (see ``outbox.cli``).
"""

from __future__ import annotations


class OutboxError(Exception):
    """Base class of every error raised on purpose by this project."""


class MessageError(OutboxError, ValueError):
    """A message given to ``outbox.add`` is invalid; nothing was written."""


class PayloadError(MessageError):
    """The payload cannot be serialised (not JSON-serialisable and not bytes), or is too large."""


class TopicError(MessageError):
    """The topic is empty, too long or contains characters outside ``[A-Za-z0-9._-]``."""


class MessageKeyError(MessageError):
    """The key is not a string, is longer than 255 characters, or holds a NUL or a lone surrogate."""


class HeaderError(MessageError):
    """A header name or value is not a string or holds a lone surrogate, or the headers are too large."""


class DelayError(MessageError):
    """The delay is negative, longer than 100 years, or not a number of seconds / ``timedelta``."""


class ConfigError(OutboxError):
    """Configuration is invalid: the message names the setting and how to fix it."""


class SchemaError(OutboxError):
    """The outbox table does not exist, or its schema version is not the one this code expects."""


class DatabaseUnavailable(OutboxError):
    """The database cannot be reached or refused the connection."""


class BrokerError(OutboxError):
    """The Kafka cluster cannot be reached, or refused what the consumer or the replay asked of it."""


class MessageNotFound(OutboxError, LookupError):
    """No message has the given id."""


class RelayConflict(OutboxError):
    """Another relay already runs on this SQLite database (SQLite supports one relay at a time)."""


class RelayFailed(OutboxError):
    """A thread the relay cannot work without (fetcher, dispatcher, completer) died, so it stopped
    instead of living on without claiming; its unfinished messages come back after their lease."""


__all__ = [
    "BrokerError",
    "ConfigError",
    "DatabaseUnavailable",
    "DelayError",
    "HeaderError",
    "MessageError",
    "MessageKeyError",
    "MessageNotFound",
    "OutboxError",
    "PayloadError",
    "RelayConflict",
    "RelayFailed",
    "SchemaError",
    "TopicError",
]


def first_line(exc: BaseException | object) -> str:
    """The first line of an exception's text (driver errors often carry several)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
