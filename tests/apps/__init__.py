"""Relays as real subprocesses, for the tests that kill, stop and starve them.

The crash, stop and database-restart tests drive ``python -m outbox relay`` exactly as an operator
would: a separate process, configured by flags, stopped by a signal. :class:`RelayLauncher` starts them
(with the handler modules of this package as ``--app``), keeps their output in a log file per process,
and kills whatever is still running when the test ends, so a failing test never leaves a relay behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import outbox

ROOT = Path(__file__).resolve().parent.parent.parent


def relay_command(database_url: str, app: str, **options: Any) -> list[str]:
    """The ``outbox relay`` command line; ``lease_seconds=2`` in ``options`` becomes ``--lease-seconds 2``."""
    command = [sys.executable, "-m", "outbox", "relay", "--database-url", database_url, "--app", app]
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    return command


@dataclass
class RelayProcess:
    """One running ``outbox relay`` subprocess and the file its stdout and stderr go to."""

    popen: subprocess.Popen[bytes]
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stopped(self) -> bool:
        """The process is stopped by a signal (``SIGSTOP``): state ``T`` in ``/proc/<pid>/stat``."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat.rpartition(")")[2].split()[0] == "T"

    def send(self, sig: signal.Signals) -> None:
        self.popen.send_signal(sig)

    def kill(self) -> None:
        """``kill -9`` and reap: nothing in the relay gets to run after this."""
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def wait_exit(self, timeout: float) -> int:
        """The exit code, failing the test (with the relay's log) if it is still running after ``timeout``."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"relay {self.pid} still running {timeout}s later; its log:\n{self.log_tail()}", pytrace=False
            )

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class RelayLauncher:
    """Starts relays on one database with one ``--app`` and common flags; cleans up after the test."""

    def __init__(
        self, log_dir: Path, database_url: str, app: str, *, env: dict[str, str] | None = None
    ) -> None:
        self.log_dir = log_dir
        self.database_url = database_url
        self.app = app
        self.env = env or {}
        self.started: list[RelayProcess] = []

    def start(self, **options: Any) -> RelayProcess:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")
        }  # flags only, no stray config
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        log_path = self.log_dir / f"relay-{len(self.started) + 1}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                relay_command(self.database_url, self.app, **options),
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # A session of its own: in the caller's process group, a relay stopped by SIGSTOP gets
                # SIGHUP and SIGCONT from the kernel whenever that group becomes orphaned (pytest run
                # under `timeout`, say), and a frozen relay would quietly run on.
                start_new_session=True,
            )
        process = RelayProcess(popen, log_path)
        self.started.append(process)
        return process

    def cleanup(self) -> None:
        """Kill every relay still running (a stopped one is continued first so that SIGKILL is reaped)."""
        for process in self.started:
            if process.alive():
                process.send(signal.SIGCONT)
                process.kill()


def outbox_rows(engine: sa.Engine, table: str = "outbox") -> dict[str, sa.Row[Any]]:
    """Every outbox row by message id (as ``str``), in insertion order."""
    t = outbox.tables_for(table).messages
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t).order_by(t.c.seq)).all()
    return {str(row.id): row for row in rows}
