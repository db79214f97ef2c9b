"""One attempt of a handler: the single place where the relay and ``outbox consume`` run handler code.

:func:`run_attempt` calls a registered handler on one message, in its own transaction when the handler
takes a session, and says what the attempt came to (:data:`AttemptResult`). The relay's handler
publisher (``relay.publishers._handlers``) and the consumer's record processor
(:mod:`consumers._processing`) both run every handler through it; each turns the result into its own
bookkeeping (a row's outcome, a record's retry or dead letter). What it promises, and the test that
would catch a violation:

- **Nothing a handler raises escapes the attempt.** Any exception, ``BaseException`` included
  (``SystemExit`` from ``sys.exit()``, ``KeyboardInterrupt``, ``GeneratorExit``, a bare
  ``BaseException``, :class:`HandlerTimeout`), is a :class:`HandlerFailed` with its error; the thread
  that ran the handler lives on. ``SystemExit`` and ``KeyboardInterrupt`` raised *by a handler* are not
  stop signals: a real SIGINT or SIGTERM reaches the main thread (the CLI's stop), never a handler's
  thread; they are logged (WARNING, with the traceback) and the attempt fails.
  ``tests/test_handler_faults.py::test_handler_that_raises_a_base_exception_fails_its_attempt_and_the_worker_lives_on``,
  ``tests/test_handler_faults.py::test_consumer_handler_that_calls_sys_exit_fails_and_the_consumer_lives_on``
- **An outage is not an attempt.** Only the attempt's own database (the session of a session handler,
  its ``before`` and ``before_commit`` work and its commit) failing with an outage
  (:func:`outbox._dialects.is_outage`) is an :class:`Outage`; anything else a handler raises, about any
  other system too (SMTP down, an HTTP timeout), is its failure.
- **A session handler's transaction commits only when the handler returned and ``before_commit``
  agreed.** A handler that raised, was interrupted, or ran past its time (``before_commit`` says so)
  leaves its transaction rolled back.
  ``tests/test_handler_faults.py::test_timed_out_session_handler_never_commits``
- **A timeout interrupts only the handler.** :class:`Interruption` raises :class:`HandlerTimeout` in
  the handler's thread (an asynchronous exception, as dramatiq's time limit does) at most once per
  attempt and only while the handler itself runs (between :meth:`Interruption.arm` and
  :meth:`Interruption.disarm`): never in the relay's or consumer's own code around it. It derives from
  ``BaseException`` so that a handler's ``except Exception`` does not swallow it. Python raises it at
  the handler's next bytecode: a handler blocked in C (``time.sleep``, a blocking socket read, a lock)
  is not interrupted until that call returns; the caller then hands its thread off (see
  ``relay.publishers._handlers``).
  ``tests/test_handler_faults.py::test_handler_busy_in_python_past_its_timeout_is_interrupted_and_its_worker_freed``,
  ``tests/test_handler_faults.py::test_consumer_handler_past_its_timeout_is_interrupted_or_abandoned_and_the_consumer_lives_on``
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import orm

from consumers._registry import Handler
from outbox._dialects import is_outage
from outbox._message import Message
from outbox._tracing import process_span

log = logging.getLogger("outbox.handler")

#: seconds a timed-out handler gets, after its interruption, to give its thread back; one still running
#: then is blocked where Python cannot interrupt it (in C), and its thread is handed off
HANDOFF_GRACE = 1.0


class HandlerTimeout(BaseException):
    """Raised in a handler's thread when its attempt ran past its topic's timeout.

    A ``BaseException``, like ``SystemExit``: a handler's ``except Exception`` does not catch it.
    """


def describe_error(exc: BaseException) -> str:
    """``Type: message`` for storing as a message's last error, a dead letter's error, or a log line."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- what an attempt came to -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Handled:
    """The handler returned (and, with a session, its transaction committed)."""


@dataclass(frozen=True, slots=True)
class Skipped:
    """``before`` refused: the handler did not run, its transaction was rolled back unused."""

    reason: str


@dataclass(frozen=True, slots=True)
class RolledBack:
    """The handler returned but ``before_commit`` refused: its transaction was rolled back."""

    reason: str


@dataclass(frozen=True, slots=True)
class HandlerFailed:
    """The handler raised (anything, ``BaseException`` included) or was interrupted: a failed attempt."""

    error: str


@dataclass(frozen=True, slots=True)
class Outage:
    """The attempt's own database was unreachable: not an attempt, try again later."""

    error: str


AttemptResult = Handled | Skipped | RolledBack | HandlerFailed | Outage
HANDLED = Handled()


@dataclass(frozen=True, slots=True)
class Transaction:
    """The transaction a session handler runs in, and what its caller does in it around the handler.

    ``before`` runs first (the consumer claims its inbox row): a reason returned means "do not run the
    handler". ``before_commit`` runs after the handler and its flush (the relay checks the attempt is
    still wanted and writes the fenced delivered mark): a reason returned rolls the transaction back.
    """

    sessions: Callable[[], AbstractContextManager[orm.Session]]
    before: Callable[[orm.Session], str | None] | None = None
    before_commit: Callable[[orm.Session], str | None] | None = None


class _Refused(Exception):
    """A hook refused: leave the transaction block by an exception, which rolls it back."""

    def __init__(self, result: Skipped | RolledBack) -> None:
        self.result = result


# --- interrupting a handler ---------------------------------------------------------------------------------


class Interruption:
    """Lets another thread raise :class:`HandlerTimeout` in the thread running one attempt's handler.

    :meth:`interrupt` acts only while the handler is armed, and at most once: a call before
    :meth:`arm`, after :meth:`disarm`, or a second call, does nothing and returns False. :meth:`disarm`
    also cancels an interruption not yet raised, so that it can never surface in the code after the
    handler. (The exception is raised at the handler's next bytecode; it may therefore surface just
    after the handler returned, inside :meth:`disarm` itself, which :func:`run_attempt` treats as the
    timeout it is.)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread_id: int | None = None
        self._fired = False
        #: the error the attempt fails with once interrupted
        self.reason = "HandlerTimeout"

    @property
    def fired(self) -> bool:
        return self._fired

    def arm(self) -> None:
        # No lock: an interrupt() that runs before this assignment finds nothing armed and returns
        # False; the relay's timeout check calls it again at its next round.
        self._thread_id = threading.get_ident()

    def disarm(self) -> None:
        with self._lock:
            thread_id, self._thread_id = self._thread_id, None
            if thread_id is not None and self._fired:
                _raise_in_thread(thread_id, None)  # cancel it if it has not been raised yet

    def interrupt(self, reason: str) -> bool:
        """Raise :class:`HandlerTimeout` in the handler's thread, failing the attempt with ``reason``."""
        with self._lock:
            if self._thread_id is None or self._fired:
                return False
            self._fired = True
            self.reason = reason
            _raise_in_thread(self._thread_id, HandlerTimeout)
            return True


def _raise_in_thread(thread_id: int, exc_type: type[BaseException] | None) -> None:
    """Schedule ``exc_type`` in the thread (``None``: cancel what was scheduled), as dramatiq does."""
    exc = ctypes.py_object(exc_type) if exc_type is not None else None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), exc)


# --- the attempt --------------------------------------------------------------------------------------------


def run_attempt(
    handler: Handler,
    message: Message,
    *,
    transaction: Transaction | None = None,
    interruption: Interruption | None = None,
    system: str = "outbox",
) -> AttemptResult:
    """Run ``handler`` on ``message`` once (see the module docstring); never raises.

    A session handler needs ``transaction``. ``interruption``, when given (an attempt with a timeout),
    is armed around the handler call so that the timeout can interrupt it. The attempt runs in a
    CONSUMER span (``system``: ``outbox`` in the relay, ``kafka`` in the consumer) started once
    ``before`` let the handler run.
    """
    try:
        if not handler.takes_session:
            with process_span(message, system=system) as span:
                result = _plain(handler, message, interruption)
                if isinstance(result, HandlerFailed):
                    span.fail(result.error)
            return result
        if transaction is None:
            return HandlerFailed(f"handler {handler.name} takes a session: no database to give it")
        return _in_transaction(handler, message, transaction, interruption, system)
    except BaseException as exc:  # a timeout landing in the span's or a hook's code; nothing escapes
        return _failed(handler, message, exc, interruption)


def run_in_batch(
    handler: Handler, message: Message, session: orm.Session | None, *, flush: bool = True
) -> HandlerFailed | None:
    """Run ``handler`` once inside a transaction its caller owns (a batch of ``outbox consume``).

    ``None``: the handler returned (and, with ``flush``, its work is flushed to ``session``, given to
    session handlers only). A :class:`HandlerFailed` otherwise, the caller rolling back whatever the
    handler did. An outage of the session's database is raised (the batch waits it out, no attempt is
    used up). No timeout here: handlers with one run alone, through :func:`run_attempt`.
    """
    with process_span(message, system="kafka") as span:
        try:
            handler(message, session)
            if session is not None and flush:
                session.flush()
        except BaseException as exc:
            if isinstance(exc, sa.exc.SQLAlchemyError) and is_outage(exc):
                raise
            failed = _failed(handler, message, exc, None)
            span.fail(failed.error)
            return failed
    return None


def _plain(handler: Handler, message: Message, interruption: Interruption | None) -> AttemptResult:
    try:
        _call(handler, message, None, interruption)
    except BaseException as exc:
        return _failed(handler, message, exc, interruption)
    return HANDLED


def _in_transaction(
    handler: Handler,
    message: Message,
    transaction: Transaction,
    interruption: Interruption | None,
    system: str,
) -> AttemptResult:
    failed: HandlerFailed | None = None
    try:
        with transaction.sessions() as session, session.begin():
            if transaction.before is not None and (reason := transaction.before(session)) is not None:
                raise _Refused(Skipped(reason))
            with process_span(message, system=system) as span:
                try:
                    _call(handler, message, session, interruption)
                    session.flush()
                except BaseException as exc:
                    failed = _failed(handler, message, exc, interruption)
                    span.fail(failed.error)
                    raise  # leaving the block by an exception rolls the transaction back
                check = transaction.before_commit
                if check is not None and (reason := check(session)) is not None:
                    raise _Refused(RolledBack(reason))
        return HANDLED
    except _Refused as refused:
        return refused.result
    except BaseException as exc:
        # Only this attempt's own database failing (in the handler's session, a hook, the flush, the
        # commit or the rollback) is an outage to wait out; anything else the handler raises, about
        # other systems too (SMTP down, HTTP timeout), is its failure.
        if isinstance(exc, sa.exc.SQLAlchemyError) and is_outage(exc):
            return Outage(describe_error(exc))
        return failed if failed is not None else HandlerFailed(describe_error(exc))


def _call(
    handler: Handler, message: Message, session: orm.Session | None, interruption: Interruption | None
) -> None:
    if interruption is None:  # no timeout: nothing to arm (the common case costs nothing more)
        handler(message, session)
        return
    interruption.arm()
    try:
        handler(message, session)
    finally:
        interruption.disarm()


def _failed(
    handler: Handler, message: Message, exc: BaseException, interruption: Interruption | None
) -> HandlerFailed:
    """The failed attempt ``exc`` makes; a ``BaseException`` that is not an ``Exception`` is logged."""
    if isinstance(exc, HandlerTimeout) and interruption is not None:
        return HandlerFailed(interruption.reason)
    error = describe_error(exc)
    if not isinstance(exc, Exception):
        log.warning(
            "handler %s raised %s on message %s: a failed attempt (not a stop signal); the worker goes on",
            handler.name,
            error,
            message.id,
            exc_info=exc,
        )
    return HandlerFailed(error)
