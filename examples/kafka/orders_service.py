"""The orders service: plain SQLAlchemy, writing an order and its ``orders.created`` message atomically.

Run the relay next to it to publish the messages to Kafka::

    outbox db upgrade --database-url sqlite:///orders.db
    outbox relay --database-url sqlite:///orders.db --kafka-bootstrap-servers localhost:9092
"""

from __future__ import annotations

from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy import orm

import outbox


class Base(orm.DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    customer: orm.Mapped[str] = orm.mapped_column(sa.String(40))
    total: orm.Mapped[Decimal] = orm.mapped_column(sa.Numeric(10, 2))


class OutOfStock(Exception):
    pass


def place_order(
    session: orm.Session, order_id: int, customer: str, total: Decimal, *, in_stock: bool
) -> None:
    """Write the order and its message in the caller's transaction; refuse (roll back) when out of stock."""
    session.add(Order(id=order_id, customer=customer, total=total))
    outbox.add(
        session,
        "orders.created",
        {"order_id": order_id, "customer": customer, "total": total},
        key=f"customer-{customer}",  # one customer's orders reach Kafka (and the consumer) in order
    )
    if not in_stock:
        raise OutOfStock(f"order {order_id}: out of stock")  # the order and its message roll back together


def write_orders(engine: sa.Engine, count: int) -> tuple[list[int], list[int]]:
    """Place ``count`` orders, every fifth one out of stock; return (committed ids, rolled-back ids)."""
    Base.metadata.create_all(engine)
    committed, rolled_back = [], []
    for order_id in range(1, count + 1):
        try:
            with orm.Session(engine) as session, session.begin():
                place_order(
                    session, order_id, f"c{order_id % 7}", Decimal(order_id) + Decimal("0.99"),
                    in_stock=order_id % 5 != 0,
                )  # fmt: skip
            committed.append(order_id)
        except OutOfStock:
            rolled_back.append(order_id)
    return committed, rolled_back
