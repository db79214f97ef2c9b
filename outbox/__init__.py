"""Transactional outbox for SQLAlchemy.

Write a message in the same transaction as your business change; a relay delivers it at least once::

    import outbox

    with Session(engine) as session, session.begin():
        session.add(Order(id=42))
        outbox.add(session, "order.created", {"order_id": 42}, key="order-42")

Public surface (everything else is internal): :func:`add`, :class:`Outbox`, :func:`configure`,
:class:`Message`, :class:`RetryPolicy`, :class:`TopicPolicy`, :func:`metadata_for`, :func:`upgrade`,
:class:`Status`, :func:`create_engine`, and the exceptions rooted at :class:`OutboxError`.
"""

from outbox._dialects import create_engine
from outbox._errors import (
    BrokerError,
    ConfigError,
    DatabaseUnavailable,
    DelayError,
    HeaderError,
    MessageError,
    MessageKeyError,
    MessageNotFound,
    OutboxError,
    PayloadError,
    RelayConflict,
    RelayFailed,
    SchemaError,
    TopicError,
)
from outbox._message import Message
from outbox._policy import RetryPolicy, TopicPolicy
from outbox._schema import Status, metadata_for, tables_for, upgrade
from outbox.writer import Outbox, add, configure

__version__ = "0.1.0"

__all__ = [
    "BrokerError",
    "ConfigError",
    "DatabaseUnavailable",
    "DelayError",
    "HeaderError",
    "Message",
    "MessageError",
    "MessageKeyError",
    "MessageNotFound",
    "Outbox",
    "OutboxError",
    "PayloadError",
    "RelayConflict",
    "RelayFailed",
    "RetryPolicy",
    "SchemaError",
    "Status",
    "TopicError",
    "TopicPolicy",
    "add",
    "configure",
    "create_engine",
    "metadata_for",
    "tables_for",
    "upgrade",
]
