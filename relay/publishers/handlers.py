"""In-process delivery: run registered handlers on a bounded pool of worker threads.

A handler that takes a session runs inside one transaction that also writes the message's delivered mark
(fenced by the lease token): its database work, the messages it adds and the mark commit together, and
if the lease was lost meanwhile the whole transaction rolls back.

Each delivery is reported exactly once: finished, timed out (the handler thread is abandoned; a session
handler's transaction is then rolled back instead of committed), or released because it never started.

With OpenTelemetry, each attempt runs inside a CONSUMER span continuing the writer's trace
(:func:`outbox.tracing.process_span`), so spans a handler starts belong to that trace.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm

from consumers.registry import Registry
from outbox.dialects import is_outage
from outbox.tracing import process_span
from relay.publishers import Delivered, Delivery, DoneCallback, Failed, Outcome, Released, describe_error

log = logging.getLogger("outbox.relay")

#: writes the fenced delivered mark inside a handler's transaction; returns False when fenced off
MarkInSession = Callable[[orm.Session, Delivery], bool]


class LeaseLost(Exception):
    """The delivered mark found no row under our token: another relay has taken the message over."""


#: a function and its arguments, run by a worker
_Job = tuple[Callable[..., None], tuple[Any, ...]]


class _WorkerPool:
    """A fixed set of daemon threads running callables from a queue.

    Daemon threads, unlike ``concurrent.futures``' workers, never keep the process alive: a handler
    still running after the stop timeout is abandoned (its lease expires) instead of blocking exit.
    """

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{n}", daemon=True) for n in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, func: Callable[..., None], *args: Any) -> None:
        self._queue.put((func, args))

    def shutdown(self) -> None:
        for _ in self._threads:
            self._queue.put(None)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                job[0](*job[1])
            except Exception:  # pragma: no cover - _run reports every outcome itself
                log.exception("unexpected error in a handler worker")


class _Task:
    """One delivery's state. Guarded by the publisher's lock (one lock for all: cheaper than a lock and
    an event per message, which showed up at 10 % of the relay's CPU in profiles)."""

    __slots__ = ("delivery", "done", "reported", "started_at")

    def __init__(self, delivery: Delivery) -> None:
        self.delivery = delivery
        self.started_at: float | None = None
        self.reported = False
        self.done = False


class HandlerPublisher:
    """Delivers messages whose topic has a handler in ``registry``."""

    decodes_payload = True

    def __init__(
        self,
        registry: Registry,
        *,
        workers: int,
        session_factory: Callable[[], AbstractContextManager[orm.Session]],
        mark_in_session: MarkInSession,
    ) -> None:
        self.registry = registry
        self.workers = workers
        self._pool = _WorkerPool(workers, "outbox-handler")
        self._session_factory = session_factory
        self._mark_in_session = mark_in_session
        self._tasks: dict[tuple[str, int], _Task] = {}
        self._lock = threading.Lock()
        self._finished = threading.Condition(self._lock)
        self._stopping = False

    def accepts(self, topic: str) -> bool:
        return self.registry.route(topic) is not None

    def deliver(self, deliveries: Sequence[Delivery], done: DoneCallback) -> None:
        tasks = [_Task(delivery) for delivery in deliveries]
        with self._lock:
            for task in tasks:
                self._tasks[(task.delivery.token, task.delivery.seq)] = task
        for task in tasks:
            self._pool.submit(self._run, task, done)

    # -- task state (all under self._lock) ----------------------------------------------------------------

    def _start(self, task: _Task) -> bool:
        with self._lock:
            if task.reported:
                return False
            task.started_at = time.monotonic()
            return True

    def _report(self, task: _Task, outcome: Outcome, done: DoneCallback) -> bool:
        """Report ``outcome`` unless something (timeout, stop) already did; exactly once per task."""
        with self._lock:
            if task.reported:
                return False
            task.reported = True
        done(task.delivery, outcome)
        return True

    def _still_wanted(self, task: _Task) -> bool:
        with self._lock:
            return not task.reported

    def _run(self, task: _Task, done: DoneCallback) -> None:
        try:
            if not self._start(task):
                return
            with process_span(task.delivery.message) as span:  # a no-op without OpenTelemetry
                outcome = self._attempt(task)
                if isinstance(outcome, Failed):
                    span.fail(outcome.error)
            self._report(task, outcome, done)
        finally:
            with self._lock:
                task.done = True
                self._tasks.pop((task.delivery.token, task.delivery.seq), None)
                if self._stopping:
                    self._finished.notify_all()

    def _attempt(self, task: _Task) -> Outcome:
        delivery = task.delivery
        entry = self.registry.route(delivery.message.topic)
        if entry is None:
            return Failed(f"no route for topic {delivery.message.topic}")
        try:
            if not entry.takes_session:
                entry(delivery.message)
                return Delivered()
            with self._session_factory() as session, session.begin():
                entry(delivery.message, session)
                session.flush()
                if not self._still_wanted(task):  # timed out meanwhile: its retry will run it again
                    raise LeaseLost("handler ran past its timeout")
                if not self._mark_in_session(session, delivery):
                    raise LeaseLost("lease lost before commit")
            return Delivered(marked=True)
        except LeaseLost as exc:
            log.warning("message %s: %s; its transaction was rolled back", delivery.message.id, exc)
            return Released(str(exc))
        except Exception as exc:
            # Only the relay's own database failing under a session handler is an outage to wait out;
            # anything a handler raises about other systems (SMTP down, HTTP timeout) is its failure.
            if entry.takes_session and isinstance(exc, sa.exc.SQLAlchemyError) and is_outage(exc):
                return Released(f"database unavailable: {describe_error(exc)}", retry_after=1.0)
            return Failed(describe_error(exc))

    def check_timeouts(self, done: DoneCallback) -> None:
        now = time.monotonic()
        with self._lock:
            tasks = list(self._tasks.values())
        for task in tasks:
            timeout = task.delivery.policy.timeout
            started = task.started_at
            expired = timeout is not None and started is not None and now - started > timeout
            if expired and self._report(
                task, Failed(f"HandlerTimeout: handler ran longer than {timeout:g}s"), done
            ):
                log.warning("message %s: handler timed out after %gs", task.delivery.message.id, timeout)

    def stop(self, timeout: float, done: DoneCallback) -> None:
        cancelled: list[_Task] = []
        with self._lock:
            self._stopping = True
            for task in self._tasks.values():
                if task.started_at is None and not task.reported:
                    task.reported = True  # a worker picking it up later skips it
                    cancelled.append(task)
        for task in cancelled:
            done(task.delivery, Released("relay stopping"))
        deadline = time.monotonic() + timeout
        with self._lock:
            running = [t for t in self._tasks.values() if t.started_at is not None and not t.done]
            while any(not t.done for t in running):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._finished.wait(remaining)
            left = [t for t in running if not t.done]
        if left:
            log.warning(
                "stop timeout: %d handler(s) still running; their leases will expire and the messages "
                "will be retried: %s",
                len(left),
                ", ".join(str(t.delivery.message.id) for t in left[:20]),
            )
        self._pool.shutdown()

    def running_count(self) -> int:
        """Handlers executing right now (started, not finished)."""
        with self._lock:
            return sum(1 for t in self._tasks.values() if t.started_at is not None and not t.done)
