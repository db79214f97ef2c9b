"""The README's Kafka example runs here, end to end: service -> outbox -> relay -> Kafka -> consumer."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.apps import ROOT


@pytest.mark.slow
def test_kafka_example_ships_every_committed_order_once() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "examples.kafka.run", "--orders", "20"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "placed 16 orders; 4 rolled back" in result.stdout
    assert "shipments created by the shipping service: 16" in result.stdout
    assert "no rolled-back order shipped: yes" in result.stdout
