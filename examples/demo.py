"""The outbox end to end, on SQLite, in one process: ``make demo`` (or ``python examples/demo.py``).

1. The shop (``examples/shop.py``) places 20 orders, each in its own transaction with its
   ``order.created`` message; the orders that run out of stock roll back, message included.
2. Some orders are paid (``order.paid``, handled with a session that writes the ``payments`` ledger);
   one payment also asks for an invoice whose template is missing: a poison message. One review request
   is written with a 1 second ``delay``.
3. A relay runs in this process until every committed message is delivered or dead, then stops.
4. A summary of what was delivered (per handler) and what was rolled back; the demo exits non-zero if
   anything is not as promised.
5. ``outbox status`` on the demo database, with the CLI installed next to this Python.
6. What to do next about the dead message: the ``outbox show``, ``replay`` and ``status`` commands to
   run, with the demo database's URL.

Everything is written under ``demo-output/`` (git-ignored), or ``--output-dir``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # Import the shop as `examples.shop`, the name `outbox relay --app examples.shop:registry` uses.
    sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402
from sqlalchemy import orm  # noqa: E402

import outbox  # noqa: E402
from examples import shop  # noqa: E402
from outbox import Status  # noqa: E402
from relay import Relay  # noqa: E402

ORDERS = 20
CUSTOMERS = 5
SKUS = ("espresso-beans", "grinder", "kettle")
PAID_ORDERS = (1, 2, 3, 5, 8)
POISON_ORDER = 2  # its payment also requests an invoice with a template that does not exist
REVIEW_DELAY = 1.0  # seconds
DEADLINE = 30.0  # seconds for the relay to deliver everything; the demo fails after that
TOPICS = ("order.created", "order.paid", "review.requested", "invoice.requested")
UNFINISHED = (Status.PENDING.value, Status.INFLIGHT.value, Status.FAILED.value)


def main() -> int:
    parser = argparse.ArgumentParser(description="The outbox end to end, on SQLite, in one process.")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "demo-output", help="where shop.db goes")
    args = parser.parse_args()
    # The relay logs each failed attempt: show those lines in the story (stdout, so they stay in place).
    logging.basicConfig(level=logging.WARNING, format="   [relay] %(message)s", stream=sys.stdout)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    db_path = (args.output_dir / "shop.db").resolve()
    for leftover in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")):
        leftover.unlink(missing_ok=True)
    url = f"sqlite:///{db_path}"
    engine = outbox.create_engine(url)
    with engine.begin() as conn:
        shop.create_schema(conn)  # the shop's tables, and outbox.upgrade(conn) for the outbox's
    Session = orm.sessionmaker(engine)
    print(f"Shop demo: a transactional outbox on SQLite ({db_path})")
    print()

    # -- 1. orders, some rolled back -------------------------------------------------------------------
    print(f"1. Placing {ORDERS} orders. Each writes its order row, the stock update and an")
    print('   "order.created" message (key: the customer) in ONE transaction.')
    committed: list[int] = []
    sent: list[uuid.UUID] = []  # ids of the messages whose transaction committed
    rolled_back: list[int] = []
    for n in range(1, ORDERS + 1):
        customer = f"customer-{(n - 1) % CUSTOMERS + 1}"
        sku = SKUS[n % len(SKUS)]
        quantity = 1 + n % 2
        line = f"   order #{n:<2}  {customer}  {quantity} x {sku:<15}"
        session = Session()
        try:
            with session.begin():
                message_id = shop.place_order(session, n, customer, sku, quantity)
        except shop.OutOfStock as exc:  # raised after outbox.add(): the message is rolled back too
            rolled_back.append(n)
            print(f"{line} ROLLED BACK, out of stock ({exc})")
        else:
            committed.append(n)
            sent.append(message_id)
            print(f"{line} committed")
        finally:
            session.close()
    print(f"   => {len(committed)} committed, {len(rolled_back)} rolled back with their messages")
    print()

    # -- 2. payments, a poison message, a delayed message ----------------------------------------------
    paid = ", ".join(f"#{n}" for n in PAID_ORDERS)
    print(f"2. {len(PAID_ORDERS)} orders are paid ({paid}): each sets the order's status and writes an")
    print(f'   "order.paid" message in one transaction. The payment of order #{POISON_ORDER} also writes an')
    print('   "invoice.requested" message naming a template that does not exist: a poison message.')
    print(f'   A "review.requested" message is written with delay={REVIEW_DELAY} (seconds).')
    for n in PAID_ORDERS:
        with Session.begin() as session:
            sent.append(shop.pay_order(session, n))
            if n == POISON_ORDER:
                customer = session.get_one(shop.Order, n).customer
                payload = {"order_id": n, "template": "xmas-special"}
                sent.append(outbox.add(session, "invoice.requested", payload, key=customer))
    with Session.begin() as session:
        sent.append(outbox.add(session, "review.requested", {"order_id": committed[0]}, delay=REVIEW_DELAY))
    print()

    # -- 3. the relay ----------------------------------------------------------------------------------
    print(f"3. A relay runs in this process (poll_interval=0.1) until all {len(sent)} committed messages")
    print("   are delivered or dead:")
    started = time.monotonic()
    with Relay(engine, shop.registry, poll_interval=0.1):
        finished = _wait_until_finished(engine, len(sent))
    elapsed = time.monotonic() - started
    if not finished:
        print(f"   FAILED: not all delivered or dead after {DEADLINE:g}s: {_status_counts(engine)}")
        return 1
    print(f"   done in {elapsed:.1f}s; relay stopped.")
    print()

    # -- 4. summary ------------------------------------------------------------------------------------
    ok = _summary(engine, sent, rolled_back)
    print()

    # -- 5. the CLI ------------------------------------------------------------------------------------
    ok = _outbox_status(url) and ok
    print()

    # -- 6. what next ----------------------------------------------------------------------------------
    _next_steps(engine, url)
    return 0 if ok else 1


def _status_counts(engine: sa.Engine) -> dict[str, int]:
    t = outbox.tables_for().messages
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.status, sa.func.count()).group_by(t.c.status)).all()
    return {str(status): int(n) for status, n in rows}


def _wait_until_finished(engine: sa.Engine, expected: int) -> bool:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        counts = _status_counts(engine)
        if sum(counts.values()) == expected and not any(status in UNFINISHED for status in counts):
            return True
        time.sleep(0.05)
    return False


def _summary(engine: sa.Engine, sent: list[uuid.UUID], rolled_back: list[int]) -> bool:
    t = outbox.tables_for().messages
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t).order_by(t.c.seq)).all()
        payments = conn.execute(sa.select(sa.func.count()).select_from(shop.Payment)).scalar_one()
    checks: list[bool] = []
    print("4. Summary")

    print("   Delivered, per handler:")
    by_topic: dict[str, Counter[str]] = defaultdict(Counter)
    for row in rows:
        by_topic[row.topic][row.status] += 1
    for topic in TOPICS:
        entry = shop.registry.route(topic)
        name = entry.func.__name__ if entry else "(no handler)"
        counts = by_topic[topic]
        others = "".join(f", {n} {status}" for status, n in sorted(counts.items()) if status != "delivered")
        print(f"     {name:<18} {topic:<18} {counts['delivered']:>2} delivered{others}")
    for row in rows:
        if row.status in (Status.DEAD.value, Status.PARKED.value):
            print(f"   {row.status.capitalize()}: {row.topic} ({row.msg_key}) after {row.attempts} attempts:")
            print(f"     {row.last_error}")
    checks.append({row.id for row in rows} == set(sent))

    paid_delivered = by_topic["order.paid"]["delivered"]
    print(f"   Payments ledger: {payments} rows for {paid_delivered} delivered order.paid messages, each row")
    print("   written in the handler's transaction together with its message's delivered mark.")
    checks.append(payments == paid_delivered == len(PAID_ORDERS))

    review = next(row for row in rows if row.topic == "review.requested")
    held = (review.delivered_at - review.created_at).total_seconds() >= REVIEW_DELAY
    print(f"   The review request waited for its {REVIEW_DELAY}s delay: {'yes' if held else 'NO'}")
    checks.append(held)

    announced = {json.loads(row.payload)["order_id"] for row in rows if row.topic == "order.created"}
    leaked = announced & set(rolled_back)
    orders = ", ".join(f"#{n}" for n in rolled_back)
    print(f"   Rolled back, never delivered: {len(rolled_back)} orders ({orders});")
    print(f'   "order.created" messages about them in the outbox: {len(leaked)}')
    checks.append(not leaked)

    # Order per key: each customer's messages were handled in the order they were written (seq order).
    written: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        if row.msg_key is not None and row.status == Status.DELIVERED.value:
            written[row.msg_key].append(str(row.id))
    handled: dict[str, list[str]] = defaultdict(list)
    for call in shop.journal:
        if call.key is not None:
            handled[call.key].append(call.message_id)
    in_order = handled == written
    print(
        f"   Order per key: every customer's messages were handled in the order they were written: "
        f"{'yes' if in_order else 'NO'}"
    )
    checks.append(in_order)

    if not all(checks):
        print("   SOMETHING IS NOT AS PROMISED: see the lines above")
    return all(checks)


def _outbox_status(url: str) -> bool:
    """Run ``outbox status`` on the demo database with the console script installed next to Python."""
    script = Path(sys.executable).parent / "outbox"
    print(f"5. $ outbox status --database-url {url}")
    if not script.exists() or importlib.util.find_spec("outbox.cli") is None:
        print(f"   (the outbox CLI is not installed next to {sys.executable}; `make demo` installs it)")
        return True
    env = {name: value for name, value in os.environ.items() if not name.startswith("OUTBOX_")}
    result = subprocess.run(
        [str(script), "status", "--database-url", url], capture_output=True, text=True, env=env, timeout=60
    )
    for line in (result.stdout + result.stderr).splitlines():
        print(f"   {line}".rstrip())
    if result.returncode != 0:
        print(f"   FAILED: outbox status exited with code {result.returncode}")
        return False
    return True


def _outbox_command() -> str:
    """How to run the CLI from here: the console script next to this Python (relative to the current
    directory when inside it, as `.venv/bin/outbox` after `make demo`), else ``python -m outbox``."""
    script = Path(sys.executable).parent / "outbox"
    if not script.exists():
        return f"{shlex.quote(sys.executable)} -m outbox"
    try:
        return shlex.quote(str(script.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(script))


def _next_steps(engine: sa.Engine, url: str) -> None:
    """End on what an operator would do about the dead message(s): the commands, ready to paste."""
    t = outbox.tables_for().messages
    dead_statuses = (Status.DEAD.value, Status.PARKED.value)
    with engine.connect() as conn:
        dead = list(conn.execute(sa.select(t.c.id).where(t.c.status.in_(dead_statuses))).scalars())
    cli, at = _outbox_command(), f"--database-url {shlex.quote(url)}"
    if not dead:
        print(f"6. Next: nothing is dead. The outbox, any time:\n   $ {cli} status {at}")
        return
    print("6. Next: a dead message is kept, with its error, until you replay or purge it.")
    for message_id in dead:
        print("   Why it died (its error, attempts and payload):")
        print(f"   $ {cli} show {message_id} {at}")
        print(
            "   Once its handler is fixed, back to pending for a relay to deliver (--dry-run to look first):"
        )
        print(f"   $ {cli} replay {message_id} {at}")
    print("   The counts per status and topic:")
    print(f"   $ {cli} status {at}")


if __name__ == "__main__":
    sys.exit(main())
