"""In-process delivery: run registered handlers on a bounded pool of worker threads.

A handler that takes a session runs inside one transaction that also writes the message's delivered mark
(fenced by the lease token): its database work, the messages it adds and the mark commit together, and
if the lease was lost meanwhile the whole transaction rolls back. Each attempt is run by
:func:`consumers.attempt.run_attempt`, the attempt runner ``outbox consume`` uses too. What this module
promises, and the test that would catch a violation:

- **Each delivery is reported exactly once**: finished (delivered, failed, or released by a database
  outage), timed out, or released without an attempt (a stop came first, or its lease had expired).
- **No handler takes a worker away.** Whatever a handler raises, ``BaseException`` included
  (``sys.exit()``, ``KeyboardInterrupt``), is a failed attempt with its error; the worker goes on.
  ``tests/test_handler_faults.py::test_handler_that_raises_a_base_exception_fails_its_attempt_and_the_worker_lives_on``
- **A timed-out attempt frees its worker.** Past its topic's timeout an attempt is reported failed
  (retried, then dead, like any failure) and its handler interrupted (:class:`consumers.attempt.
  HandlerTimeout` raised in its thread). A handler still running :data:`~consumers.attempt.HANDOFF_GRACE`
  seconds later is blocked where Python cannot interrupt it (``time.sleep``, a socket read): its thread
  is handed off (a daemon left to finish on its own, its outcome already written) and a fresh thread
  takes its place, so that the pool keeps ``workers`` threads free to run the next attempts.
  ``tests/test_handler_faults.py::test_handler_busy_in_python_past_its_timeout_is_interrupted_and_its_worker_freed``,
  ``tests/test_handler_faults.py::test_handler_blocked_in_c_past_its_timeout_is_handed_off_and_the_pool_keeps_its_workers``
- **A timed-out session handler never commits.** Interrupted, its transaction rolls back; returning
  late, it finds that it was reported timed out and rolls back. Its worker takes the right to report
  (one atomic ``dict.pop``) before it commits, so a transaction that commits was never reported timed
  out. ``tests/test_handler_faults.py::test_timed_out_session_handler_never_commits``
- **Stuck threads are bounded.** With more handed-off threads still running than ``max_stuck``
  (``max_stuck_handlers``, default twice ``workers``), the relay stops claiming, logs why (ERROR), says
  so in ``outbox_relay_claiming_stopped`` and ``outbox_relay_stuck_handlers`` and fails ``/readyz``
  (``handlers``), so that it gets restarted; it claims again if they end meanwhile.
  ``tests/test_handler_faults.py::test_relay_with_more_stuck_handlers_than_its_bound_stops_claiming_and_says_why``,
  ``tests/test_handler_faults.py::test_relay_process_survives_every_faulty_handler_and_readyz_tells_the_truth``
- **No handler starts on a lease known to be lost.** A worker about to start a task checks its lease's
  deadline by the relay's own clock (no round trip: :class:`relay._completer.InFlight`, the claim's or
  last renewal's time plus the lease, less a margin); past it, the task is released (not an attempt)
  instead of run: another relay may hold it, and may have started the next message of its key.
  ``tests/test_crash.py::test_relay_thawed_after_its_leases_expired_starts_none_of_their_handlers``

Stop releases the tasks not started and waits (``stop_timeout``) for the running ones, but not for
those that timed out (their outcome is written; their threads may never return).

With OpenTelemetry, each attempt runs inside a CONSUMER span continuing the writer's trace
(:func:`outbox._tracing.process_span`), so spans a handler starts belong to that trace.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import orm

from consumers._registry import Registry
from consumers.attempt import (
    HANDOFF_GRACE,
    Handled,
    HandlerFailed,
    Interruption,
    Outage,
    Transaction,
    run_attempt,
)
from relay.publishers import Delivered, Delivery, DoneCallback, Failed, Outcome, Released

log = logging.getLogger("outbox.relay")

#: writes the fenced delivered mark inside a handler's transaction; returns False when fenced off
MarkInSession = Callable[[orm.Session, Delivery], bool]


#: the monotonic time until which the relay knows a lease (by its token) to be held
LeaseDeadline = Callable[[str], float]

#: a function and its arguments, run by a worker
_Job = tuple[Callable[..., None], tuple[Any, ...]]


class _WorkerPool:
    """A fixed set of daemon threads running callables from one shared queue.

    Daemon threads, unlike ``concurrent.futures``' workers, never keep the process alive: a handler
    still running after the stop timeout is abandoned (its lease expires) instead of blocking exit.

    Wake-ups are rationed: :meth:`submit_many` wakes one idle worker, and a worker that takes a job
    while more wait wakes one more before running it. A batch of quick handlers then wakes each worker
    once, not once per message (a worker woken per job, eight threads fighting for the GIL, cost
    several times the CPU per quick message: BENCHMARKS.md, "Figures behind the code"). Slow handlers
    still spread over every worker: each worker that starts a job while others wait has woken a helper
    first.
    """

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self.name = name
        self._jobs: collections.deque[_Job] = collections.deque()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._idle = 0
        self._closed = False
        self._started = 0  # threads started so far, to name the next one
        self._members: set[threading.Thread] = set()  # every thread started (handed off ones too)
        #: threads handed off by hand_off(): they leave the pool when their job ends
        self._handed_off: set[threading.Thread] = set()
        for _ in range(size):
            self._start_thread()

    def _start_thread(self) -> None:
        self._started += 1
        thread = threading.Thread(target=self._work, name=f"{self.name}-{self._started}", daemon=True)
        self._members.add(thread)
        thread.start()

    def hand_off(self, thread: threading.Thread) -> bool:
        """Give up on ``thread`` (stuck in a job) and start a fresh worker in its place, so that the pool
        keeps ``size`` workers; the handed-off thread leaves the pool if its job ever ends. False when
        it was already handed off."""
        with self._lock:
            if thread in self._handed_off or not thread.is_alive():
                return False
            self._handed_off.add(thread)
            if not self._closed:
                self._start_thread()
            return True

    def stuck(self) -> int:
        """Handed-off threads still running their job."""
        with self._lock:
            self._handed_off = {t for t in self._handed_off if t.is_alive()}
            return len(self._handed_off)

    def submit_many(self, jobs: Sequence[_Job]) -> None:
        self._jobs.extend(jobs)
        me = threading.current_thread()
        if len(jobs) == 1 and me in self._members and me not in self._handed_off:
            # one job from a worker finishing its own (a run's next message, handed out as the one
            # before is reported): that worker takes it next; waking another would cost a thread
            # switch per message and find nothing to do
            return
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
        every job taken meanwhile notify again (measured: BENCHMARKS.md, "Figures behind the code")."""
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
        me = threading.current_thread()
        while me not in self._handed_off and (job := self._take()) is not None:
            try:
                job[0](*job[1])
            except BaseException:  # pragma: no cover - _run reports every outcome itself
                log.exception("unexpected error in a handler worker")


class _Task:
    """One delivery's state (see :class:`HandlerPublisher` for who changes what)."""

    __slots__ = ("committing", "delivery", "done", "interruption", "started_at", "thread", "timed_out_at")

    def __init__(self, delivery: Delivery, done: DoneCallback) -> None:
        self.delivery = delivery
        #: the callback it was delivered with: its outcome goes there, whoever decides it (its worker,
        #: the timeout check, stop), so that a run or the lane of reclaimed messages hears of it
        self.done = done
        self.started_at: float | None = None
        #: the worker running it (set when it starts), and how the timeout check interrupts it
        self.thread: threading.Thread | None = None
        self.interruption = Interruption() if delivery.policy.timeout is not None else None
        #: when the timeout check reported it timed out and interrupted it
        self.timed_out_at: float | None = None
        #: its worker took the right to report it, to commit its handler's transaction
        self.committing = False


class HandlerPublisher:
    """Delivers messages whose topic has a handler in ``registry``.

    Task state needs no lock: a task's start and its report are each decided by one atomic
    ``dict.pop``. The worker and :meth:`stop` race for the start (``_unstarted``): the loser does not
    run it, resp. does not cancel it. The worker, the timeout check and :meth:`stop` race for the
    report (``_unreported``): only the winner reports, so each delivery is reported exactly once. (A lock
    taken three times per message made eight workers queue on it; the cost is in BENCHMARKS.md,
    "Figures behind the code".)
    """

    decodes_payload = True
    #: a ``counted`` delivery's start mark is written by the worker that runs it, right before its handler
    marks_starts = True

    def __init__(
        self,
        registry: Registry,
        *,
        workers: int,
        session_factory: Callable[[], AbstractContextManager[orm.Session]],
        mark_in_session: MarkInSession,
        lease_deadline: LeaseDeadline | None = None,
        max_stuck: int | None = None,
        mark_started: Callable[[Delivery], bool] | None = None,
    ) -> None:
        self.registry = registry
        #: the durable start mark of a ``counted`` delivery, written by its worker right before the
        #: handler starts (``relay._claim``, invariant 10); False: the lease is lost
        self._mark_started = mark_started
        self.workers = workers
        #: handed-off (stuck) handler threads tolerated before the relay stops claiming
        self.max_stuck = 2 * workers if max_stuck is None else max_stuck
        self._lease_deadline = lease_deadline
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

    def routed_topics(self) -> list[str]:
        """Every topic this publisher accepts: the registry's names and patterns (the relay claims
        only those, unless another publisher takes any topic)."""
        return self.registry.topics()

    def deliver(self, deliveries: Sequence[Delivery], done: DoneCallback) -> None:
        tasks = dict.fromkeys([_Task(delivery, done) for delivery in deliveries], True)
        self._tasks.update(tasks)
        self._unreported.update(tasks)
        self._unstarted.update(tasks)
        self._pool.submit_many([(self._run, (task,)) for task in tasks])

    # -- task state (each change is one atomic dict operation) --------------------------------------------

    def _start(self, task: _Task) -> bool:
        if not self._unstarted.pop(task, False):
            return False  # cancelled by stop()
        task.thread = threading.current_thread()
        task.started_at = time.monotonic()
        return True

    def _lease_expired(self, task: _Task) -> bool:
        """Whether the task's lease may have expired by this relay's clock (no round trip)."""
        return self._lease_deadline is not None and time.monotonic() > self._lease_deadline(
            task.delivery.token
        )

    def _report(self, task: _Task, outcome: Outcome) -> bool:
        """Report ``outcome`` unless something (timeout, stop) already did; exactly once per task."""
        if not (task.committing or self._unreported.pop(task, False)):
            return False
        task.done(task.delivery, outcome)
        return True

    def _commit_wanted(self, task: _Task) -> bool:
        """Take the right to report ``task`` before committing its handler's transaction: False when the
        timeout check reported it first (the transaction must roll back). Once taken, the timeout check
        can no longer fail the attempt, so a transaction that commits was never reported timed out."""
        task.committing = self._unreported.pop(task, False)
        return task.committing

    def _run(self, task: _Task) -> None:
        try:
            if not self._start(task):
                return
            if self._lease_expired(task):
                # Its lease may be another relay's by now (this one was frozen, or starved): running it
                # could run it twice at once, out of its key's order. Not an attempt: give it back.
                log.warning(
                    "message %s: its lease expired before its handler could start; released",
                    task.delivery.message.id,
                )
                self._report(task, Released("lease expired before the handler started"))
                return
            delivery = task.delivery
            if delivery.counted and self._mark_started is not None and not self._mark_started(delivery):
                self._report(task, Released("lease lost before the handler started"))
                return
            self._report(task, self._attempt(task))
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
        transaction = None
        if entry.takes_session:

            def before_commit(session: orm.Session) -> str | None:
                if not self._commit_wanted(task):  # timed out meanwhile: its retry will run it again
                    return "handler ran past its timeout"
                if not self._mark_in_session(session, delivery):
                    return "lease lost before commit"
                return None

            transaction = Transaction(self._session_factory, before_commit=before_commit)
        result = run_attempt(entry, delivery.message, transaction=transaction, interruption=task.interruption)
        if isinstance(result, Handled):
            return Delivered(marked=entry.takes_session)
        if isinstance(result, HandlerFailed):
            return Failed(result.error)
        if isinstance(result, Outage):
            return Released(f"database unavailable: {result.error}", retry_after=1.0)
        log.warning("message %s: %s; its transaction was rolled back", delivery.message.id, result.reason)
        return Released(result.reason)

    def check_timeouts(self, done: DoneCallback) -> None:
        """Fail the attempts past their timeout and interrupt their handlers; hand off the threads of
        those that a grace period later are still running (blocked where Python cannot interrupt)."""
        now = time.monotonic()
        for task in list(self._tasks):
            timeout = task.delivery.policy.timeout
            started = task.started_at
            if timeout is None or started is None or now - started <= timeout:
                continue
            if task.committing:
                continue  # its handler returned in time and its transaction is committing
            error = f"HandlerTimeout: handler ran longer than {timeout:g}s"
            if task.timed_out_at is None:
                if not self._report(task, Failed(error)):
                    continue  # it finished meanwhile
                task.timed_out_at = now
                log.warning("message %s: handler timed out after %gs", task.delivery.message.id, timeout)
            if task.interruption is not None:  # once, and only while the handler itself runs
                task.interruption.interrupt(error)
            if now - task.timed_out_at > HANDOFF_GRACE and task.thread is not None:
                self._hand_off(task, task.thread)

    def _hand_off(self, task: _Task, thread: threading.Thread) -> None:
        if task not in self._tasks or not self._pool.hand_off(thread):
            return  # it ended meanwhile (its thread, if handed off in that instant, serves one more job)
        stuck = self._pool.stuck()
        log.warning(
            "message %s: its timed-out handler did not stop (blocked where Python cannot interrupt it, "
            "e.g. in a C call); thread %s handed off and replaced by a fresh worker (%d stuck, at most %d)",
            task.delivery.message.id,
            thread.name,
            stuck,
            self.max_stuck,
        )

    def stuck_count(self) -> int:
        """Handler threads handed off after a timeout and still running."""
        return self._pool.stuck()

    def stuck_problem(self) -> str | None:
        """Why this relay must stop claiming (too many stuck handler threads), or ``None``."""
        stuck = self._pool.stuck()
        if stuck <= self.max_stuck:
            return None
        return (
            f"{stuck} handler threads are stuck past their timeout (at most {self.max_stuck}: "
            "max_stuck_handlers)"
        )

    def stop(self, timeout: float, done: DoneCallback) -> None:
        self._stopping = True
        for task in list(self._unstarted):
            if self._unstarted.pop(task, False):  # won: its worker will skip it
                self._tasks.pop(task, None)
                if self._unreported.pop(task, False):
                    task.done(task.delivery, Released("relay stopping"))
        deadline = time.monotonic() + timeout
        with self._finished:
            while True:  # every task left has started: wait for them, but those that timed out
                # (reported failed already: their threads may never return)
                running = [task for task in list(self._tasks) if task.timed_out_at is None]
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
