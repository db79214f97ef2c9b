"""A poison message, end to end through the CLI: dead with its error shown, the rest flowing, replayed."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import sqlalchemy as sa

import outbox
from tests.apps import RelayLauncher
from tests.conftest import status_counts, wait_until
from tests.test_cli import run_outbox


def test_poison_message_dead_shown_replayed_and_delivered(
    engine: sa.Engine, db_url: str, tmp_path: Path
) -> None:
    fixed = tmp_path / "fixed"
    with engine.begin() as conn:
        poison = outbox.add(conn, "bill", {"order": 7, "poison": True}, key="customer-1")
        for n in range(30):
            outbox.add(conn, "bill", {"order": 100 + n}, key=f"customer-{n % 5 + 2}")
    launcher = RelayLauncher(
        tmp_path, db_url, "tests.apps.poison:registry", env={"OUTBOX_TEST_FIXED": str(fixed)}
    )
    try:
        relay = launcher.start(poll_interval=0.1)
        wait_until(
            lambda: status_counts(engine) == {"delivered": 30, "dead": 1}, timeout=30, what="poison dead"
        )

        shown = run_outbox("show", str(poison), "--database-url", db_url)
        assert shown.returncode == 0, shown.stderr
        assert "dead" in shown.stdout and "unknown currency 'XXX'" in shown.stdout
        as_json = json.loads(run_outbox("show", str(poison), "--database-url", db_url, "--json").stdout)
        assert as_json["status"] == "dead" and as_json["attempts"] == 3
        assert as_json["last_error"] == "ValueError: cannot bill order 7: unknown currency 'XXX'"

        dry = run_outbox(
            "replay", "--status", "dead", "--topic", "bill", "--dry-run", "--database-url", db_url
        )
        assert dry.returncode == 0 and str(poison) in dry.stdout
        assert status_counts(engine)["dead"] == 1  # a dry run changes nothing

        fixed.touch()  # the handler is fixed
        replayed = run_outbox("replay", str(poison), "--database-url", db_url)
        assert replayed.returncode == 0, replayed.stderr
        wait_until(
            lambda: status_counts(engine) == {"delivered": 31}, timeout=30, what="replayed and delivered"
        )
        relay.send(signal.SIGTERM)
        assert relay.wait_exit(30) == 0
    finally:
        launcher.cleanup()
    t = outbox.tables_for().messages
    with engine.connect() as conn:
        row = conn.execute(sa.select(t).where(t.c.id == poison)).one()
    assert row.attempts == 1, "a replayed message starts with fresh attempts"
