"""The offsets of ``outbox consume``: which records are finished, committing them, and rebalances.

:class:`Offsets` keeps, per partition, the offset one past the last finished record (a partition worker
says so after each batch's commit, :meth:`Offsets.finished`) and commits them to the group
(:meth:`Offsets.commit`, after each round and before a retry's backoff). It knows kafka-python and
nothing of SQL. The rules, and the test that would catch a violation:

- **An offset is committed only past finished records**, after their database commit: a consumer killed
  between the two reads them again and the inbox skips them.
  ``tests/test_consumer_batches.py::test_killed_mid_batch_twice_every_effect_exactly_once``
- **Nothing is skipped across a rebalance.** The rebalance listener (:func:`rebalance_listener`) waits
  for the round in flight, then sends the revoked partitions' finished offsets (``commit_async``: it
  runs on kafka-python's IO thread, where a blocking commit is refused). The records gathered for a
  revoked partition and not started are dropped (:meth:`Offsets.forget_revoked`); when the partition
  comes back to this consumer, it is sought back to the first of them, since kafka-python keeps the
  position of a partition a member keeps across a rebalance.
  ``tests/test_consumer_batches.py::test_a_second_consumer_joining_skips_nothing_and_doubles_nothing``
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from consumers._processing import Counters
from consumers.attempt import describe_error
from outbox._runtime.broker_health import BrokerHealth

log = logging.getLogger("outbox.consumer")


class Offsets:
    """The finished offsets of one consumer (thread-safe: partition workers report, the poll thread
    and the rebalance listener commit). ``consumer`` is the kafka-python consumer, set once joined."""

    def __init__(self, counters: Counters, broker: BrokerHealth, *, timeout_ms: int) -> None:
        self.consumer: Any = None
        self._counters = counters
        self._broker = broker
        self._timeout_ms = timeout_ms
        self._lock = threading.RLock()
        #: per partition: the offset to commit (one past the last finished record), not committed yet
        self._done: dict[Any, int] = {}
        #: partitions revoked by a rebalance since the last poll
        self._revoked: set[Any] = set()

    def finished(self, partition: Any, record: Any) -> None:
        """``record`` of ``partition`` and every record before it are finished."""
        with self._lock:
            self._done[partition] = record.offset + 1

    def commit(self) -> None:
        """Commit the offsets of finished records (synchronously); keep them for later on a failure."""
        from kafka.errors import CommitFailedError, KafkaError
        from kafka.structs import OffsetAndMetadata

        with self._lock:
            if not self._done or self.consumer is None:
                return
            offsets = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in self._done.items()}
            try:
                self.consumer.commit(offsets, timeout_ms=self._timeout_ms)
            except CommitFailedError as exc:
                self._counters.add("commit_failures")
                self._done.clear()
                log.warning(
                    "offsets not committed, the group rebalanced (%s): those records will be read again "
                    "and skipped through the inbox",
                    describe_error(exc),
                )
                return
            except KafkaError as exc:
                self._counters.add("commit_failures")
                self._broker.failed(f"could not commit offsets: {describe_error(exc)}")
                log.warning("could not commit offsets (%s); will try again", describe_error(exc))
                return
            self._broker.answered()
            self._counters.add("commits")
            for tp, meta in offsets.items():
                if self._done.get(tp) == meta.offset:
                    del self._done[tp]

    def revoked(self, partitions: set[Any]) -> None:
        """A rebalance revokes ``partitions`` (nothing of theirs in flight): send their offsets."""
        from kafka.structs import OffsetAndMetadata

        with self._lock:
            self._revoked |= partitions
            done = {tp: OffsetAndMetadata(o, "", -1) for tp, o in self._done.items() if tp in partitions}
        if done:
            try:  # on kafka-python's IO thread: only the non-blocking commit is allowed
                self.consumer.commit_async(done)
            except Exception as exc:
                log.warning("could not commit the revoked partitions' offsets: %s", describe_error(exc))

    def forget_revoked(self, gathered: dict[Any, list[Any]]) -> None:
        """Drop the gathered records of partitions revoked since the last call (see the module
        docstring); seek a partition that came back to its first dropped record."""
        with self._lock:
            revoked, self._revoked = self._revoked, set()
            for partition in revoked:
                self._done.pop(partition, None)
        if not revoked:
            return
        assigned = self.consumer.assignment()
        for partition in revoked & set(gathered):
            first = gathered.pop(partition)[0].offset
            if partition in assigned:
                self.consumer.seek(partition, first)


def rebalance_listener(on_revoked: Callable[[set[Any]], None]) -> Any:
    """A kafka-python rebalance listener calling ``on_revoked`` with the revoked partitions."""
    from kafka import ConsumerRebalanceListener

    class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
        def on_partitions_revoked(self, revoked: Any) -> None:
            on_revoked(set(revoked))

        def on_partitions_assigned(self, assigned: Any) -> None:
            pass

    return Listener()
