"""The worker side of the line protocol, and the pacing every writer shares.

A worker (``python -m bench.worker ROLE CONFIG``) prints ``ready`` once set up, waits for ``go`` on stdin,
reports ``progress COUNT MONOTONIC`` while it works (``done MONOTONIC`` when it finishes by itself), and
on ``stop`` prints ``result JSON`` and exits; :class:`bench.processes.Worker` is the other end. The
events :data:`go` and :data:`stop` are set by :func:`read_commands`, which ``bench.worker`` starts.
"""

from __future__ import annotations

import asyncio
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

go = threading.Event()
stop = threading.Event()


def say(*words: object) -> None:
    print(*words, flush=True)


def read_commands() -> None:
    """Set :data:`go` and :data:`stop` from the parent's lines on stdin (both when stdin closes)."""
    for line in sys.stdin:
        word = line.strip()
        if word == "go":
            go.set()
        elif word == "stop":
            go.set()
            stop.set()
    go.set()
    stop.set()  # the parent went away: stop too


def memory_kb() -> dict[str, int]:
    """Peak and current resident memory of this process (``VmHWM``/``VmRSS``, kB)."""
    values: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            values[name] = int(rest.split()[0])
    values.setdefault("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return values


def cpu_seconds() -> float:
    """User plus system CPU time this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def latency_summary(latencies: list[float], by_id: list[list[float]] | None = None) -> dict[str, Any]:
    """p50/p99/max in milliseconds of a list of seconds; ``by_id`` (``[i, seconds]`` of each message) is
    passed on for :func:`from_commit`."""
    from bench.harness import percentile

    values = sorted(latencies)
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "p50_ms": percentile(values, 0.50) * 1000,
        "p99_ms": percentile(values, 0.99) * 1000,
        "max_ms": values[-1] * 1000,
        **({"by_id": by_id} if by_id is not None else {}),
    }


class Reporter:
    """Prints ``progress COUNT MONOTONIC`` whenever ``count()`` changes (checked every 20 ms: the end of a
    drain is known to 20 ms, and the reporting costs the measured process about 1 % of its samples)."""

    def __init__(self, count: Callable[[], int]) -> None:
        self.count = count
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._halt = threading.Event()

    def start(self) -> Reporter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._halt.set()
        self._thread.join()
        say("progress", self.count(), time.monotonic())

    def _run(self) -> None:
        last = -1
        while not self._halt.wait(0.02):
            n = self.count()
            if n != last:
                last = n
                say("progress", n, time.monotonic())


def summary(commits: list[tuple[int, float]], lags: list[float], elapsed: float) -> dict[str, Any]:
    """The pacing writer's figures; ``commit_s``: ``[i, seconds]`` of each message's own transaction."""
    durations = sorted(d for _, d in commits)
    return {
        "written": len(commits),
        "seconds": elapsed,
        "rate": len(commits) / elapsed if elapsed else 0.0,
        "commit_p50_ms": durations[len(durations) // 2] * 1000 if durations else None,
        "worst_lag_ms": max(lags, default=0.0) * 1000,
        "commit_s": [list(c) for c in commits],
    }


def from_commit(latencies: list[list[float]], commit_s: list[list[float]]) -> list[float]:
    """Latencies from each message's commit: its latency from the writer's time (taken just before the
    INSERT) minus its transaction's own duration (INSERT and COMMIT). ``latencies``: ``[i, seconds]``."""
    took = {int(i): d for i, d in commit_s}
    return [lat - took[int(i)] for i, lat in latencies if int(i) in took]


def paced(rate: float, duration: float, lanes: int, write: Callable[[int, int], float]) -> dict[str, Any]:
    """Call ``write(i, lane)`` on a schedule of ``rate`` per second (0: flat out) for ``duration`` seconds.

    ``lanes`` threads share the schedule (message ``i`` is due at ``start + i / rate``; lane ``k`` writes
    ``i = k, k + lanes, ...``), so that a transaction slower than ``1 / rate`` does not lower the rate.
    ``write`` returns the seconds its own transaction took (from just before the INSERT to the commit).
    """
    commits: list[tuple[int, float]] = []
    lags: list[float] = []
    started = time.monotonic()
    end = started + duration

    def lane(k: int) -> None:
        i = k
        while not stop.is_set():
            now = time.monotonic()
            due = started + i / rate if rate else now
            if due >= end:
                return
            if due > now:
                time.sleep(due - now)
            else:
                lags.append(now - due)
            commits.append((i, write(i, k)))
            i += lanes

    threads = [threading.Thread(target=lane, args=(k,)) for k in range(lanes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summary(commits, lags, time.monotonic() - started)


async def paced_async(
    rate: float, duration: float, lanes: int, write: Callable[[int, int], Any]
) -> dict[str, Any]:
    """:func:`paced` with asyncio tasks as the lanes."""
    commits: list[tuple[int, float]] = []
    lags: list[float] = []
    started = time.monotonic()
    end = started + duration

    async def lane(k: int) -> None:
        i = k
        while not stop.is_set():
            now = time.monotonic()
            due = started + i / rate if rate else now
            if due >= end:
                return
            if due > now:
                await asyncio.sleep(due - now)
            else:
                lags.append(now - due)
            commits.append((i, await write(i, k)))
            i += lanes

    await asyncio.gather(*(lane(k) for k in range(lanes)))
    return summary(commits, lags, time.monotonic() - started)


async def wait_go() -> None:
    say("ready")
    await asyncio.get_running_loop().run_in_executor(None, go.wait)


def run_async(coro: Any, *, uvloop: bool) -> dict[str, Any]:
    if uvloop:
        import uvloop as _uvloop

        result: dict[str, Any] = _uvloop.run(coro)
        return result
    finished: dict[str, Any] = asyncio.run(coro)
    return finished
