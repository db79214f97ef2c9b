"""``outbox relay`` configured for Kafka from flags, the environment and a config file."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

import outbox
from outbox.cli._config import Settings
from tests.apps import ROOT
from tests.conftest import status_counts, wait_until
from tests.kafka_check import read_all
from tests.test_cli import _child_env, assert_one_line_error, run_outbox


def test_relay_needs_handlers_or_kafka(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    result = run_outbox("relay", "--database-url", url)
    assert result.returncode == 3
    assert_one_line_error(result.stderr, "nowhere to deliver", "--kafka-bootstrap-servers")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--kafka-bootstrap-servers", "no-port"], "HOST:PORT"),
        (["--kafka-bootstrap-servers", "h:1", "--kafka-security-protocol", "SASL_SSL"], "mechanism"),
        (["--kafka-bootstrap-servers", "h:1", "--kafka-route", "=x"], "invalid Kafka route"),
    ],
)
def test_bad_kafka_settings_give_one_line(
    engine: sa.Engine, db_url: str, args: list[str], fragment: str
) -> None:
    result = run_outbox("relay", "--database-url", db_url, *args)
    assert result.returncode == 3
    assert_one_line_error(result.stderr, fragment)


def test_sasl_password_is_never_echoed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    result = run_outbox(
        "relay", "--database-url", url, "--kafka-bootstrap-servers", "h:1",
        "--kafka-security-protocol", "SASL_SSL", "--kafka-sasl-mechanism", "PLAIN",
        env={"OUTBOX_KAFKA_SASL_PASSWORD": "hunter2-secret"},
    )  # fmt: skip
    assert "hunter2-secret" not in result.stderr + result.stdout
    assert "hunter2-secret" not in repr(
        Settings.load({"database_url": url, "kafka_sasl_password": "hunter2-secret"})
    )


def test_kafka_settings_from_config_file(tmp_path: Path) -> None:
    config = tmp_path / "outbox.toml"
    config.write_text(
        'database_url = "sqlite:///x.db"\n'
        'kafka_bootstrap_servers = "k1:9092,k2:9092"\n'
        'kafka_compression = "gzip"\n'
        'kafka_route = ["audit.*=audit-log", "billing.*=billing"]\n'
    )
    settings = Settings.load({}, config_file=config)
    assert settings.kafka_options() == {
        "bootstrap_servers": "k1:9092,k2:9092",
        "compression_type": "gzip",
        "routes": (("audit.*", "audit-log"), ("billing.*", "billing")),
    }


@pytest.mark.parametrize("backend", ["postgresql"])
def test_relay_command_publishes_to_kafka(
    engine: sa.Engine, db_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = f"cli.{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        ids = {str(outbox.add(conn, topic, {"n": n}, key="k")) for n in range(50)}
    env = _child_env({"OUTBOX_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "OUTBOX_DATABASE_URL": db_url})
    with (tmp_path / "relay.log").open("wb") as log:
        relay = subprocess.Popen(
            [sys.executable, "-m", "outbox", "relay", "--poll-interval", "0.1"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: status_counts(engine) == {"delivered": 50}, timeout=60, what="published")
    finally:
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(30) == 0
    records = read_all(kafka_bootstrap, [topic], expect=50)
    assert {r.headers["outbox-message-id"] for r in records} == ids
