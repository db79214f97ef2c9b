"""`make demo` keeps its promises: it runs by itself, rolled-back orders never produce a message, and the
summary it prints adds up. The demo runs as a subprocess, exactly as `make demo` runs it."""

from __future__ import annotations

import json
import re
import shlex
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_demo(output_dir: Path) -> str:
    result = subprocess.run(
        [sys.executable, "examples/demo.py", "--output-dir", str(output_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"demo exited {result.returncode}:\n{output}"
    return result.stdout


def test_demo_delivers_what_committed_and_nothing_that_rolled_back(tmp_path: Path) -> None:
    out = run_demo(tmp_path)

    committed = [int(n) for n in re.findall(r"order #(\d+) .* committed$", out, re.MULTILINE)]
    rolled_back = [int(n) for n in re.findall(r"order #(\d+) .* ROLLED BACK", out, re.MULTILINE)]
    assert len(committed) + len(rolled_back) == 20
    assert rolled_back, "the demo should roll some orders back"
    assert "=> 16 committed, 4 rolled back with their messages" in out

    # What the summary says.
    assert re.search(r"send_confirmation\s+order\.created\s+16 delivered$", out, re.MULTILINE)
    assert re.search(r"record_payment\s+order\.paid\s+5 delivered$", out, re.MULTILINE)
    assert re.search(r"ask_for_review\s+review\.requested\s+1 delivered$", out, re.MULTILINE)
    assert re.search(r"render_invoice\s+invoice\.requested\s+0 delivered, 1 dead$", out, re.MULTILINE)
    assert "Dead: invoice.requested (customer-2) after 3 attempts:" in out
    assert "Payments ledger: 5 rows for 5 delivered order.paid messages" in out
    assert "waited for its 1.0s delay: yes" in out
    assert '"order.created" messages about them in the outbox: 0' in out
    assert "handled in the order they were written: yes" in out
    assert "NOT AS PROMISED" not in out
    assert "5. $ outbox status" in out

    # What the database says, read independently of the demo's own code.
    with sqlite3.connect(tmp_path / "shop.db") as db:
        announced = [
            json.loads(payload)["order_id"]
            for (payload,) in db.execute("SELECT payload FROM outbox WHERE topic = 'order.created'")
        ]
        orders = [n for (n,) in db.execute("SELECT id FROM orders ORDER BY id")]
        statuses = dict(db.execute("SELECT status, COUNT(*) FROM outbox GROUP BY status").fetchall())
    assert sorted(announced) == committed == orders
    assert not set(rolled_back) & set(announced)
    assert statuses == {"delivered": 22, "dead": 1}


def test_demo_ends_with_the_commands_to_run_about_its_dead_message(tmp_path: Path) -> None:
    """Issue 17: the demo ended on a dead message without saying what to do. Its last lines are the
    `outbox show`, `replay` and `status` commands for that message, on the demo's database, and they run."""
    out = run_demo(tmp_path)
    with sqlite3.connect(tmp_path / "shop.db") as db:
        (dead,) = db.execute("SELECT id FROM outbox WHERE status = 'dead'").fetchone()
    dead_id = str(uuid.UUID(bytes=dead) if isinstance(dead, bytes) else uuid.UUID(dead))
    tail = out.rstrip().splitlines()[-7:]
    assert tail[0].startswith("6. Next: a dead message is kept"), "\n".join(tail)
    commands = [shlex.split(line.strip()[2:]) for line in tail if line.strip().startswith("$ ")]
    url = f"sqlite:///{(tmp_path / 'shop.db').resolve()}"
    assert [c[1:] for c in commands] == [
        ["show", dead_id, "--database-url", url],
        ["replay", dead_id, "--database-url", url],
        ["status", "--database-url", url],
    ]
    shown = subprocess.run(commands[0], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "status:           dead" in shown.stdout and "invoice.requested" in shown.stdout
