"""The README's Kafka example runs here, end to end: service -> outbox -> relay -> Kafka -> consumer; it
says what happened, and leaves nothing behind, also when it is interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.apps import ROOT


def example_env(tmp_path: Path) -> dict[str, str]:
    """Its temporary directory under ``tmp_path`` (TMPDIR), to see that it is removed."""
    return {**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_kafka_example_ships_every_committed_order_once(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "examples.kafka.run", "--orders", "20"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env=example_env(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "20 orders tried: 16 committed with their message, 4 rolled back" in result.stdout
    assert "shipments created by the shipping service: 16" in result.stdout
    assert "no rolled-back order shipped: yes" in result.stdout
    assert list(tmp_path.glob("outbox-kafka-example-*")) == []  # issue 17: they were left behind


@pytest.mark.slow
def test_interrupted_kafka_example_stops_everything_and_leaves_nothing(tmp_path: Path) -> None:
    # As from a terminal: Ctrl-C reaches it. A test run started in the background by a shell without job
    # control (``cmd &`` in a script, nohup) has SIGINT ignored, which every child inherits, and Python
    # then leaves it ignored: the example would not see the signal at all.
    example = subprocess.Popen(
        [sys.executable, "-m", "examples.kafka.run", "--orders", "20"],
        cwd=ROOT, env=example_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        assert example.stdout is not None
        first = example.stdout.readline()  # "1. Kafka at ...; databases in DIR": the broker runs
        assert first.startswith("1. Kafka at"), first + example.communicate(timeout=60)[1]
        work = Path(first.rsplit("databases in ", 1)[1].strip())
        assert work.parent == tmp_path and work.exists()
        second = example.stdout.readline()  # the relay and the consumer run too
        assert second.startswith("2. "), second
        example.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = example.communicate(timeout=90)
    finally:
        if example.poll() is None:
            example.kill()
    assert example.returncode == 130, err
    assert "interrupted: the relay, the consumer and the broker are stopped" in err
    assert "Traceback" not in err
    assert not work.exists()
