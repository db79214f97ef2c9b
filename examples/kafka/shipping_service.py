"""The shipping service: consumes ``orders.created`` from Kafka and creates one shipment per order.

The handler takes a session, so its shipment row and the consumer group's inbox record commit together:
a redelivered record (consumer killed before its offset commit) is recognised and skipped::

    outbox db upgrade --database-url sqlite:///shipping.db
    outbox consume --database-url sqlite:///shipping.db --kafka-bootstrap-servers localhost:9092 \\
        --app examples.kafka.shipping_service:registry --group shipping
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import orm

from consumers import Registry
from outbox import Message


class Base(orm.DeclarativeBase):
    pass


class Shipment(Base):
    __tablename__ = "shipments"

    order_id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    customer: orm.Mapped[str] = orm.mapped_column(sa.String(40))


registry = Registry()


@registry.handler("orders.created", max_attempts=5, backoff_initial=0.2, backoff_max=2)
def create_shipment(message: Message, session: orm.Session) -> None:
    order = message.payload
    session.add(Shipment(order_id=order["order_id"], customer=order["customer"]))
