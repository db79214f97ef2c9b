"""Is the Kafka broker reachable? The bookkeeping behind the ``broker`` check of ``/readyz``.

Shared by the relay's publishers (:mod:`relay.publishers.kafka`, :mod:`relay.publishers.confluent`) and
the consumer runner (:mod:`consumers.kafka`). Each tells its :class:`BrokerHealth` when the broker
answered (:meth:`~BrokerHealth.answered`: an acknowledgement, fetched records, committed offsets) and
when it looked away or busy (:meth:`~BrokerHealth.failed`: a timeout, a refused connection). Then
:meth:`~BrokerHealth.problem` says, within about a second:

- when the latest news is recent (``fresh_for`` seconds, 30 by default): a problem not followed by an
  answer is a problem; an answer means the broker is fine;
- with nothing that recent (an idle client hears nothing), whether a bootstrap server accepts a TCP
  connection within ``timeout`` seconds.
"""

from __future__ import annotations

import socket
import threading
import time


class BrokerHealth:
    """What the client last heard from the brokers at ``bootstrap_servers`` (``HOST:PORT[,...]``)."""

    def __init__(self, bootstrap_servers: str, *, fresh_for: float = 30.0) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.fresh_for = fresh_for
        self._lock = threading.Lock()
        #: monotonic times of the last answer and of the last problem (with its reason)
        self._last_answer: float | None = None
        self._last_problem: tuple[float, str] | None = None

    def answered(self) -> None:
        """The broker answered (from any thread)."""
        with self._lock:
            self._last_answer = time.monotonic()

    def failed(self, reason: str) -> None:
        """The broker looked away or busy, for ``reason`` (from any thread)."""
        with self._lock:
            self._last_problem = (time.monotonic(), reason)

    def problem(self, timeout: float = 1.0) -> str | None:
        """Why the broker looks unreachable now (``None``: it looks fine); see the module docstring."""
        with self._lock:
            last_answer, last_problem = self._last_answer, self._last_problem
        now = time.monotonic()
        if last_problem is not None and now - last_problem[0] < self.fresh_for:
            if last_answer is None or last_answer < last_problem[0]:
                return last_problem[1]
            return None
        if last_answer is not None and now - last_answer < self.fresh_for:
            return None
        errors = []
        for server in self.bootstrap_servers.split(","):
            host, _, port = server.strip().rpartition(":")
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
                return None
            except OSError as exc:
                errors.append(f"{server.strip()}: {exc.strerror or exc}")
        return f"no Kafka bootstrap server reachable ({'; '.join(errors)})"
