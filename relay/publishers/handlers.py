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

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
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
    """A fixed set of daemon threads running callables from one shared queue.

    Daemon threads, unlike ``concurrent.futures``' workers, never keep the process alive: a handler
    still running after the stop timeout is abandoned (its lease expires) instead of blocking exit.

    Wake-ups are rationed: :meth:`submit_many` wakes one idle worker, and a worker that takes a job
    while more wait wakes one more before running it. A batch of quick handlers then wakes each worker
    once, not once per message: with a worker woken per job (one blocking queue), eight threads
    fighting for the GIL cost 50-70 us of CPU per no-op message here against 13 us for one thread.
    Slow handlers still spread over every worker: each worker that starts a job while others wait has
    woken a helper first.
    """

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self._jobs: collections.deque[_Job] = collections.deque()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._idle = 0
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{n}", daemon=True) for n in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def submit_many(self, jobs: Iterable[_Job]) -> None:
        self._jobs.extend(jobs)
        with self._lock:
            self._wake_one()

    def shutdown(self) -> None:
        """Let the workers end once the jobs already submitted have been taken."""
        with self._lock:
            self._closed = True
            self._idle = 0
            self._wakeup.notify_all()

    def _wake_one(self) -> None:
        """Wake one waiting worker, if any (under the lock). ``_idle`` counts the waiters not yet
        woken: a woken worker may take a while to get the GIL, and counting it as idle until then made
        every job taken meanwhile notify again (7 % of the relay's GIL time in a drain profile)."""
        if self._idle:
            self._idle -= 1
            self._wakeup.notify()

    def _take(self) -> _Job | None:
        """The next job, waiting for one; ``None`` once shut down with nothing left."""
        jobs = self._jobs
        while True:
            try:
                job = jobs.popleft()
            except IndexError:
                with self._lock:
                    if jobs:  # submitted between the pop and the lock: take it
                        continue
                    if self._closed:
                        return None
                    self._idle += 1  # taken back by whoever wakes this worker (_wake_one, shutdown)
                    self._wakeup.wait()
                continue
            if jobs and self._idle:  # more waiting than this worker: bring a helper
                with self._lock:
                    self._wake_one()
            return job

    def _work(self) -> None:
        while (job := self._take()) is not None:
            try:
                job[0](*job[1])
            except Exception:  # pragma: no cover - _run reports every outcome itself
                log.exception("unexpected error in a handler worker")


class _Task:
    """One delivery's state (see :class:`HandlerPublisher` for who changes what)."""

    __slots__ = ("delivery", "started_at")

    def __init__(self, delivery: Delivery) -> None:
        self.delivery = delivery
        self.started_at: float | None = None


class HandlerPublisher:
    """Delivers messages whose topic has a handler in ``registry``.

    Task state needs no lock: a task's start and its report are each decided by one atomic
    ``dict.pop``. The worker and :meth:`stop` race for the start (``_unstarted``): the loser does not
    run it, resp. does not cancel it. The worker, the timeout check and :meth:`stop` race for the
    report (``_unreported``): only the winner reports, so each delivery is reported exactly once. (A lock
    taken three times per message made eight workers queue on it: 50-70 us of CPU per no-op message
    here against 12 for one worker.)
    """

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
        self._tasks: dict[_Task, bool] = {}  # every task not finished (popped as it finishes)
        self._unstarted: dict[_Task, bool] = {}
        self._unreported: dict[_Task, bool] = {}
        self._finished = threading.Condition()
        self._stopping = False

    def accepts(self, topic: str) -> bool:
        return self.registry.route(topic) is not None

    def deliver(self, deliveries: Sequence[Delivery], done: DoneCallback) -> None:
        tasks = dict.fromkeys([_Task(delivery) for delivery in deliveries], True)
        self._tasks.update(tasks)
        self._unreported.update(tasks)
        self._unstarted.update(tasks)
        self._pool.submit_many([(self._run, (task, done)) for task in tasks])

    # -- task state (each change is one atomic dict operation) --------------------------------------------

    def _start(self, task: _Task) -> bool:
        if not self._unstarted.pop(task, False):
            return False  # cancelled by stop()
        task.started_at = time.monotonic()
        return True

    def _report(self, task: _Task, outcome: Outcome, done: DoneCallback) -> bool:
        """Report ``outcome`` unless something (timeout, stop) already did; exactly once per task."""
        if not self._unreported.pop(task, False):
            return False
        done(task.delivery, outcome)
        return True

    def _still_wanted(self, task: _Task) -> bool:
        return task in self._unreported

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
            self._tasks.pop(task, None)
            if self._stopping:  # set before stop() looks for running tasks: it hears of this one
                with self._finished:
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
        for task in list(self._tasks):
            timeout = task.delivery.policy.timeout
            started = task.started_at
            expired = timeout is not None and started is not None and now - started > timeout
            if expired and self._report(
                task, Failed(f"HandlerTimeout: handler ran longer than {timeout:g}s"), done
            ):
                log.warning("message %s: handler timed out after %gs", task.delivery.message.id, timeout)

    def stop(self, timeout: float, done: DoneCallback) -> None:
        self._stopping = True
        for task in list(self._unstarted):
            if self._unstarted.pop(task, False):  # won: its worker will skip it
                self._tasks.pop(task, None)
                if self._unreported.pop(task, False):
                    done(task.delivery, Released("relay stopping"))
        deadline = time.monotonic() + timeout
        with self._finished:
            while True:  # every task left has started: wait for them
                running = list(self._tasks)
                remaining = deadline - time.monotonic()
                if not running or remaining <= 0:
                    break
                self._finished.wait(remaining)
        if running:
            log.warning(
                "stop timeout: %d handler(s) still running; their leases will expire and the messages "
                "will be retried: %s",
                len(running),
                ", ".join(str(t.delivery.message.id) for t in running[:20]),
            )
        self._pool.shutdown()

    def running_count(self) -> int:
        """Handlers executing right now (started, not finished)."""
        return sum(1 for t in list(self._tasks) if t.started_at is not None)
