"""The shop as a long-running service: the example app of ``deploy/compose.yaml``.

    python -m examples.shop_app --database-url postgresql://shop:shop@postgres/shop [--interval 2]

Every ``--interval`` seconds it places an order (``order.created``), and pays every third one
(``order.paid``), each in its own transaction with its message (``examples/shop.py``). Next to it,
``outbox relay`` publishes the messages to Kafka and ``outbox consume --app examples.shop:registry``
handles them (the ``order.paid`` handler writes the ``payments`` ledger, exactly once per message). It
creates the shop's tables on first start and restocks when stock runs low. SIGTERM or Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402
from sqlalchemy import orm  # noqa: E402

from examples import shop  # noqa: E402
from outbox import create_engine  # noqa: E402

log = logging.getLogger("shop")
CUSTOMERS = ("ada", "grace", "linus", "margaret", "ken")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m examples.shop_app", description="The shop, writing orders."
    )
    parser.add_argument("--database-url", default=os.environ.get("OUTBOX_DATABASE_URL"))
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between orders")
    parser.add_argument("--orders", type=int, default=0, help="stop after this many orders (0: never)")
    return parser


def pause(seconds: float, stopping: list[int]) -> None:
    """Sleep ``seconds``, in short sleeps that end once a stop signal has come."""
    deadline = time.monotonic() + seconds
    while not stopping and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.1))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("pass --database-url or set OUTBOX_DATABASE_URL")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # The handler only notes the signal: it runs in this (the main) thread between any two bytecodes,
    # so it must not take a lock this thread may hold, as threading.Event.set() would during its wait().
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))

    engine = create_engine(args.database_url)
    with engine.begin() as conn:
        if not sa.inspect(conn).has_table(shop.Product.__tablename__):
            shop.create_schema(conn)  # the shop's tables and stock (and the outbox's, if missing)
    sessions = orm.sessionmaker(engine)
    with sessions() as session:
        last = session.scalar(sa.select(sa.func.max(shop.Order.id))) or 0

    count = range(args.orders) if args.orders else itertools.count()
    for order_id in (last + 1 + n for n in count):
        if stopping:
            break
        customer = random.choice(CUSTOMERS)
        sku = random.choice(list(shop.CATALOGUE))
        try:
            with sessions.begin() as session:
                product = session.get_one(shop.Product, sku)
                if product.stock < 5:
                    product.stock += shop.CATALOGUE[sku][1]  # restock, in the same transaction
                shop.place_order(session, order_id, customer, sku, random.randint(1, 3))
                if order_id % 3 == 0:
                    shop.pay_order(session, order_id)
            log.info("order %d placed for %s (%s)", order_id, customer, sku)
        except shop.OutOfStock as exc:
            log.info("order %d rolled back, message included: %s", order_id, exc)
        pause(args.interval, stopping)
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
