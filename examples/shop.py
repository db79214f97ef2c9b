"""A tiny shop: the business code and the handlers that ``examples/demo.py`` runs.

The write side is ordinary SQLAlchemy ORM code; the only outbox call is ``outbox.add(session, ...)`` inside
the same transaction as the business change, so the message commits or rolls back with it.

The handlers are registered on :data:`registry`, so a real relay can run them too::

    outbox relay --database-url sqlite:///demo-output/shop.db --app examples.shop:registry
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import outbox
from consumers import Registry
from outbox import Message

# --- the business model ---------------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "products"

    sku: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    price: Mapped[Decimal] = mapped_column(sa.Numeric(10, 2))
    stock: Mapped[int]


class Order(Base):
    __tablename__ = "orders"

    # The shop numbers its orders itself, so a rolled-back order number is never reused by another order.
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    customer: Mapped[str] = mapped_column(sa.String(40))
    sku: Mapped[str] = mapped_column(sa.ForeignKey("products.sku"))
    quantity: Mapped[int]
    total: Mapped[Decimal] = mapped_column(sa.Numeric(10, 2))
    status: Mapped[str] = mapped_column(sa.String(20), default="placed")


class Payment(Base):
    """The accounting ledger, written by the ``order.paid`` handler (not by the shop)."""

    __tablename__ = "payments"

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(sa.ForeignKey("orders.id"))
    amount: Mapped[Decimal] = mapped_column(sa.Numeric(10, 2))
    # One ledger line per message: the handler's work commits together with the delivered mark.
    message_id: Mapped[str] = mapped_column(sa.String(36), unique=True)


CATALOGUE = {
    "espresso-beans": (Decimal("12.30"), 20),
    "grinder": (Decimal("89.00"), 6),
    "kettle": (Decimal("34.50"), 8),
}


def create_schema(conn: sa.Connection) -> None:
    """The shop's tables, the outbox's tables, and the initial stock, in the caller's transaction."""
    Base.metadata.create_all(conn)
    outbox.upgrade(conn)
    conn.execute(
        sa.insert(Product),
        [{"sku": sku, "price": price, "stock": stock} for sku, (price, stock) in CATALOGUE.items()],
    )


class OutOfStock(Exception):
    pass


def place_order(session: orm.Session, order_id: int, customer: str, sku: str, quantity: int) -> uuid.UUID:
    """Record an order, take it from stock and announce it, in the caller's transaction.

    Returns the id of the ``order.created`` message.
    The message is written before the stock check on purpose: when the check fails, the exception
    rolls back the order, the stock update and the message together.
    """
    product = session.get_one(Product, sku)
    total = product.price * quantity
    session.add(Order(id=order_id, customer=customer, sku=sku, quantity=quantity, total=total))
    product.stock -= quantity
    message_id = outbox.add(
        session,
        "order.created",
        {"order_id": order_id, "customer": customer, "sku": sku, "quantity": quantity, "total": total},
        key=customer,
    )
    session.flush()
    if product.stock < 0:
        raise OutOfStock(f"{sku}: {quantity} wanted, {product.stock + quantity} left")
    return message_id


def pay_order(session: orm.Session, order_id: int) -> uuid.UUID:
    """Mark an order paid and tell accounting, in the caller's transaction; returns the message id."""
    order = session.get_one(Order, order_id)
    order.status = "paid"
    payload = {"order_id": order.id, "amount": order.total}
    return outbox.add(session, "order.paid", payload, key=order.customer)


# --- the handlers ---------------------------------------------------------------------------------------

registry = Registry()


@dataclass(frozen=True)
class Handled:
    """One successful handler call, as the demo's journal records it."""

    topic: str
    key: str | None
    message_id: str


#: every successful handler call, in the order they happened (the demo prints it)
journal: list[Handled] = []
_journal_lock = threading.Lock()


def _record(message: Message) -> None:
    with _journal_lock:
        journal.append(Handled(message.topic, message.key, str(message.id)))


@registry.handler("order.created")
def send_confirmation(message: Message) -> None:
    """Without a session: at least once (here, the "e-mail" is an entry in the journal)."""
    _record(message)


@registry.handler("order.paid")
def record_payment(message: Message, session: orm.Session) -> None:
    """With a session: the ledger line and the message's delivered mark commit in one transaction."""
    amount = Decimal(message.payload["amount"])  # Decimal travels as its exact string, "24.60"
    session.add(Payment(order_id=message.payload["order_id"], amount=amount, message_id=str(message.id)))
    _record(message)


@registry.handler("review.requested")
def ask_for_review(message: Message) -> None:
    _record(message)


class TemplateMissing(Exception):
    pass


@registry.handler("invoice.requested", max_attempts=3, backoff_initial=0.05, backoff_max=0.1)
def render_invoice(message: Message) -> None:
    """A poison message for this handler fails every time: after 3 quick attempts it is dead."""
    raise TemplateMissing(f"no invoice template named {message.payload['template']!r}")
