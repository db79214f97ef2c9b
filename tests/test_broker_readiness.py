"""``/readyz`` says the broker is usable only when it completes a handshake with the configured settings.

A broker that accepts TCP connections but refuses every SASL or TLS handshake cannot take a record: with
no recent answer from it, the ``broker`` check runs a real handshake (TLS and SASL as configured, then a
metadata request), cached for a few seconds. The test broker speaks plaintext only, so ``SSL`` and
``SASL_PLAINTEXT`` against it are the settings that cannot complete a handshake while TCP works.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from outbox._runtime.broker_health import BrokerHealth, Handshake
from outbox._runtime.kafka_settings import KafkaConnection
from tests.apps import ROOT
from tests.conftest import wait_until
from tests.test_metrics import Scraper

SECURITY: dict[str, dict[str, Any]] = {
    "PLAINTEXT": {},
    "SASL_PLAINTEXT": {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_username": "relay",
        "sasl_password": "not-used-here",
    },
    "SSL": {"security_protocol": "SSL"},
}


def tcp_connects(bootstrap: str) -> bool:
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5):
        return True


def settled(health: BrokerHealth) -> str | bool:
    """The check's answer once its first handshake has finished (``False`` while it is still running)."""
    problem = health.problem(timeout=1.0)
    if problem is not None and "within" in problem:
        return False
    return problem or "ok"


@pytest.mark.parametrize("security", sorted(SECURITY))
def test_the_broker_check_needs_a_completed_handshake(kafka_bootstrap: str, security: str) -> None:
    assert tcp_connects(kafka_bootstrap)  # TCP alone would say "fine" to every one of these settings
    health = BrokerHealth(KafkaConnection(kafka_bootstrap, **SECURITY[security]))
    answer = wait_until(lambda: settled(health), timeout=30, what="the first handshake to finish")
    if security == "PLAINTEXT":
        assert answer == "ok"
    elif security == "SSL":
        assert "no Kafka bootstrap server completes a TLS handshake" in str(answer), answer
    else:
        assert "accepts connections but completes no handshake" in str(answer), answer
        assert "SASL_PLAINTEXT, SASL PLAIN as 'relay'" in str(answer) and "not-used-here" not in str(answer)


def test_a_handshake_result_is_reused_so_probes_stay_cheap(kafka_bootstrap: str) -> None:
    handshake = Handshake(KafkaConnection(kafka_bootstrap), cache_for=600)
    wait_until(lambda: handshake.problem(wait=1.0) is None, timeout=30, what="a handshake")
    for _ in range(20):
        assert handshake.problem(wait=1.0) is None
    assert handshake.attempts == 1


def test_a_recent_answer_spares_the_handshake(kafka_bootstrap: str) -> None:
    """While the client hears from the broker (acknowledgements, fetches), nothing extra is sent."""
    health = BrokerHealth(KafkaConnection(kafka_bootstrap, **SECURITY["SASL_PLAINTEXT"]))
    health.answered()
    assert health.problem() is None
    assert health.handshake.attempts == 0


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@pytest.mark.parametrize("security", ["PLAINTEXT", "SASL_PLAINTEXT"])
def test_readyz_of_an_idle_relay_tells_whether_its_broker_settings_work(
    engine: sa.Engine, db_url: str, kafka_bootstrap: str, tmp_path: Path, security: str
) -> None:
    """``outbox relay`` with nothing to publish (so no answer from the broker to go by): ``/readyz`` is
    200 with settings the broker accepts, 503 naming the broker with settings it refuses."""
    flags = ["--kafka-bootstrap-servers", kafka_bootstrap, "--kafka-security-protocol", security]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OUTBOX_DATABASE_URL=db_url)
    if security == "SASL_PLAINTEXT":
        flags += ["--kafka-sasl-mechanism", "PLAIN", "--kafka-sasl-username", "relay"]
        env["OUTBOX_KAFKA_SASL_PASSWORD"] = "not-used-here"
    log_path = tmp_path / "relay.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "outbox",
                "relay",
                *flags,
                "--metrics-port",
                "0",
                "--metrics-host",
                "127.0.0.1",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        served = wait_until(
            lambda: re.search(r"serving /metrics.* on http://127\.0\.0\.1:(\d+)", log_path.read_text()),
            timeout=30,
            what="the relay's ops server",
            explain=lambda: log_path.read_text(errors="replace")[-3000:],
        )
        scrape = Scraper(int(served[1]))  # type: ignore[index]
        want = 200 if security == "PLAINTEXT" else 503

        def answer() -> dict[str, Any] | None:
            status, report = scrape.ready()
            broker = report["checks"].get("broker", {})
            settled = "within" not in broker.get("detail", "") and report["checks"]["relay"]["ok"]
            return report if status == want and settled else None

        report = wait_until(
            answer,
            timeout=30,
            what=f"/readyz {want}",
            explain=lambda: f"{scrape.ready()}\n{log_path.read_text(errors='replace')[-3000:]}",
        )
        assert isinstance(report, dict)
        checks = report["checks"]
        assert checks["database"]["ok"] is True and checks["relay"]["ok"] is True, checks
        if security == "PLAINTEXT":
            assert checks["broker"] == {"ok": True}
        else:
            assert checks["broker"]["ok"] is False
            assert "completes no handshake" in checks["broker"]["detail"], checks
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
