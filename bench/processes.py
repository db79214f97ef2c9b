"""The parent side of the worker processes: start them, drive their line protocol, time them.

:class:`Worker` starts ``python -m bench.worker ROLE CONFIG`` (the other side is :mod:`bench.protocol`);
:func:`drain_with` starts several at once and times them to a count; :func:`stop_all` collects results.
Relays, writers and peers run in their own interpreters so that none shares a GIL with the harness or
with another, and ``time.monotonic()`` is one clock for every process on Linux, so the workers'
timestamps and the parent's compare directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from typing import Any

from bench.harness import ROOT, Settings


class WorkerFailed(RuntimeError):
    """A worker process exited or answered ``error`` before giving its result."""


class Worker:
    """One ``python -m bench.worker ROLE CONFIG`` process and its line protocol.

    The worker prints ``ready`` when set up, waits for ``go``, prints ``progress COUNT MONOTONIC`` while it
    works (and ``done MONOTONIC`` if it finishes by itself), and on ``stop`` (or when done) prints
    ``result JSON`` and exits. ``time.monotonic()`` is one clock for every process on Linux, so the parent
    compares the workers' timestamps with its own.
    """

    def __init__(self, role: str, config: dict[str, Any], settings: Settings) -> None:
        self.role = role
        self.log_path = settings.tmp / f"worker-{role}-{secrets.token_hex(3)}.log"
        self._log = self.log_path.open("w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.worker", role, json.dumps(config)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            env=env,
        )
        self._cond = threading.Condition()
        self.ready = False
        self.count = 0
        self.count_at = 0.0
        self.done_at: float | None = None
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self._reader = threading.Thread(target=self._read, name=f"bench-{role}-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            word, _, rest = line.strip().partition(" ")
            with self._cond:
                if word == "ready":
                    self.ready = True
                elif word == "progress":
                    count, at = rest.split()
                    self.count, self.count_at = int(count), float(at)
                elif word == "done":
                    self.done_at = float(rest)
                elif word == "result":
                    self.result = json.loads(rest)
                elif word == "error":
                    self.error = rest
                self._cond.notify_all()
        with self._cond:
            if self.result is None and self.error is None:
                self.error = f"exited with code {self.process.wait()}"
            self._cond.notify_all()

    def _wait_for(self, what: str, predicate: Any, timeout: float) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: predicate() or self.error is not None, timeout)
        if self.error is not None:
            raise WorkerFailed(f"{self.role} worker failed: {self.error}; log: {self.tail()}")
        if not ok:
            raise WorkerFailed(f"{self.role} worker: no {what} within {timeout:.0f}s; log: {self.tail()}")

    def wait_ready(self, timeout: float = 120.0) -> Worker:
        self._wait_for("ready", lambda: self.ready, timeout)
        return self

    def send(self, word: str) -> None:
        assert self.process.stdin is not None
        with contextlib.suppress(BrokenPipeError, OSError):
            self.process.stdin.write(word + "\n")
            self.process.stdin.flush()

    def go(self) -> float:
        started = time.monotonic()
        self.send("go")
        return started

    def finish(self, timeout: float = 120.0) -> dict[str, Any]:
        """Ask the worker to stop (if it has not finished by itself) and return its result."""
        self.send("stop")
        self._wait_for("result", lambda: self.result is not None, timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(30)
        self.close()
        assert self.result is not None
        return self.result

    def wait_result(self, timeout: float) -> dict[str, Any]:
        """Wait for a worker that ends by itself (a writer, a draining peer) and return its result."""
        self._wait_for("result", lambda: self.result is not None, timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(30)
        self.close()
        assert self.result is not None
        return self.result

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()

    def tail(self, lines: int = 15) -> str:
        self._log.flush()
        with contextlib.suppress(OSError):
            return " | ".join(self.log_path.read_text().splitlines()[-lines:])
        return ""


def drain_with(workers: list[Worker], expect: int, timeout: float, *, settle: float = 0.0) -> float:
    """Start ``workers`` at once and return the seconds until together they reported ``expect`` done.

    The end is the worker-side timestamp at which the last of them reached its final count (or said
    ``done``): the parent's polling interval does not enter the figure. ``settle`` seconds pass between
    "all ready" and the start, for connections a worker opens in the background as it sets up.
    """
    for worker in workers:
        worker.wait_ready()
    time.sleep(settle)
    started = time.monotonic()
    for worker in workers:
        worker.send("go")
    deadline = started + timeout
    finished_since: float | None = None
    while True:
        for worker in workers:
            if worker.error is not None:
                raise WorkerFailed(f"{worker.role} worker failed: {worker.error}; log: {worker.tail()}")
        total = sum(w.count for w in workers)
        finished = all(w.done_at is not None for w in workers)
        if (
            finished
            and total < expect
            and time.monotonic() < (finished_since := finished_since or time.monotonic()) + 1
        ):
            time.sleep(0.02)  # a last progress line may still be on its way
            continue
        if total >= expect or finished:
            ends = [w.done_at if w.done_at is not None else w.count_at for w in workers if w.count]
            if total < expect:
                raise WorkerFailed(f"workers finished after {total} of {expect} messages")
            return max(ends) - started
        if time.monotonic() > deadline:
            raise WorkerFailed(f"drain timed out after {timeout:.0f}s at {total} of {expect} messages")
        time.sleep(0.02)


def stop_all(workers: list[Worker]) -> list[dict[str, Any]]:
    """Stop every worker (in parallel) and return their results; kill any that does not answer."""
    for worker in workers:
        worker.send("stop")
    try:
        return [worker.finish() for worker in workers]
    finally:
        for worker in workers:
            worker.close()
