"""Partitions in parallel: the worker pool of ``outbox consume``.

The runner (:mod:`consumers._kafka`) works in *rounds*: it polls Kafka (one thread owns the
``KafkaConsumer``, which is not thread-safe), hands every partition's records of the round to
:meth:`PartitionPool.run_round`, which finishes them on up to ``workers`` threads, one partition per
thread, each in offset order (:mod:`consumers._batches`), and returns when every partition of the round
is done; the runner then commits their offsets and polls again. Why rounds rather than a queue per
partition that the poll thread keeps filling: nothing is in flight while the consumer polls, so a
rebalance (which kafka-python runs inside ``poll``) never finds a batch half done, and no partition has
to be paused (kafka-python 3.0.12 parks the records it fetched for a paused partition, which is easy to
lose); the cost, polling while no handler runs, is a few milliseconds per round.

The invariants, and the test that would catch each violation:

- **A partition is in one worker's hands at a time, its records in offset order.** A round gives each
  partition to one task, which finishes its records in order; the next round starts after it.
  ``tests/test_consumer_batches.py::test_partitions_in_parallel_keep_their_order``
- **A rebalance finds nothing in flight.** :meth:`PartitionPool.drain` waits for the round in flight
  (the runner's rebalance listener calls it before the revoked partitions' offsets are committed).
  ``tests/test_consumer_batches.py::test_a_second_consumer_joining_skips_nothing_and_doubles_nothing``

SQLite allows one writer at a time (:attr:`outbox._dialects.Dialect.single_writer`): one worker there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from consumers._processing import Stopping
from outbox._errors import ConfigError

#: workers when ``--workers`` is not given (fewer are busy when a round has fewer partitions)
DEFAULT_WORKERS = 4

Work = Callable[[Any, Sequence[Any]], None]


def check_workers(workers: int) -> None:
    """ConfigError unless ``workers`` is a whole number of at least 1."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a whole number of at least 1, got {workers!r}")


class PartitionPool:
    """Runs ``work(partition, records)`` for the partitions of a round on up to ``workers`` threads."""

    def __init__(self, workers: int, work: Work) -> None:
        check_workers(workers)
        self.workers = workers
        self._work = work
        self._idle = threading.Event()
        self._idle.set()
        self._executor: ThreadPoolExecutor | None = None
        if workers > 1:
            self._executor = ThreadPoolExecutor(workers, thread_name_prefix="outbox-consumer-partition")

    def run_round(self, round_: Mapping[Any, Sequence[Any]]) -> None:
        """Finish every partition's records; returns when all are done.

        Raises the first error a partition's work raised once the others are done (:class:`Stopping`
        only when nothing else went wrong): a stop leaves the rest of each partition unfinished.
        """
        if not round_:
            return
        self._idle.clear()
        try:
            if self._executor is None or len(round_) == 1:
                errors = [self._inline(partition, records) for partition, records in round_.items()]
            else:
                futures: list[Future[None]] = [
                    self._executor.submit(self._work, partition, records)
                    for partition, records in round_.items()
                ]
                errors = [f.exception() for f in futures]
        finally:
            self._idle.set()
        raised = [e for e in errors if e is not None]
        if raised:
            raise next((e for e in raised if not isinstance(e, Stopping)), raised[0])

    def _inline(self, partition: Any, records: Sequence[Any]) -> BaseException | None:
        try:
            self._work(partition, records)
        except Exception as exc:
            return exc
        return None

    def drain(self, timeout: float) -> bool:
        """Wait until no round is in flight; False when one still is after ``timeout`` seconds."""
        return self._idle.wait(timeout)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
