"""Is the Kafka broker usable? The bookkeeping behind the ``broker`` check of ``/readyz``.

Shared by the relay's publishers (:mod:`relay.publishers.kafka`, :mod:`relay.publishers.confluent`) and
the consumer runner (:mod:`consumers._kafka`). Each tells its :class:`BrokerHealth` when the broker
answered (:meth:`~BrokerHealth.answered`: an acknowledgement, fetched records, committed offsets) and
when it looked away or busy (:meth:`~BrokerHealth.failed`: a timeout, a refused connection). Then
:meth:`~BrokerHealth.problem` says, within about a second:

- when the latest news is recent (``fresh_for`` seconds, 30 by default): a problem not followed by an
  answer is a problem; an answer means the broker is fine;
- with nothing that recent (an idle client hears nothing), whether a bootstrap server completes a
  handshake with the configured settings (:class:`Handshake`): TCP, then TLS and SASL as configured,
  then a metadata request. A TCP connection alone is not enough: a broker that accepts connections and
  refuses every SASL handshake (a wrong mechanism, a wrong password, TLS expected) cannot be used.
"""

from __future__ import annotations

import socket
import threading
import time

from outbox._errors import first_line
from outbox._runtime.kafka_settings import KafkaConnection

#: seconds a handshake's result is reused: ``/readyz`` probes every few seconds stay cheap
HANDSHAKE_CACHE_SECONDS = 5.0
#: seconds a handshake may take before it counts as failed (it runs on a thread of its own)
HANDSHAKE_TIMEOUT_SECONDS = 5.0


class BrokerHealth:
    """What the client last heard from the brokers of ``connection``, and a handshake when that is old."""

    def __init__(self, connection: KafkaConnection, *, fresh_for: float = 30.0) -> None:
        self.bootstrap_servers = connection.bootstrap_servers
        self.fresh_for = fresh_for
        self.handshake = Handshake(connection)
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
        """Why the broker looks unusable now (``None``: it looks fine); see the module docstring."""
        with self._lock:
            last_answer, last_problem = self._last_answer, self._last_problem
        now = time.monotonic()
        if last_problem is not None and now - last_problem[0] < self.fresh_for:
            if last_answer is None or last_answer < last_problem[0]:
                return last_problem[1]
            return None
        if last_answer is not None and now - last_answer < self.fresh_for:
            return None
        return self.handshake.problem(timeout)


class Handshake:
    """Does a bootstrap server of ``connection`` complete a handshake with its security settings?

    One attempt is a kafka-python admin client's bootstrap: a TCP connection, TLS and SASL as configured,
    and a metadata request, within ``HANDSHAKE_TIMEOUT_SECONDS``; then the client is closed. Attempts run
    on a thread of their own and their result is reused for ``cache_for`` seconds; after that, the last
    result is still given while a new attempt runs, so a caller waits (at most ``wait`` seconds) only for
    the very first one. The confluent publisher is checked the same way: what is checked is the broker
    and the settings, which both clients share.
    """

    def __init__(self, connection: KafkaConnection, *, cache_for: float = HANDSHAKE_CACHE_SECONDS) -> None:
        self.connection = connection
        self.cache_for = cache_for
        #: attempts made so far (the tests check that the cache spares the broker)
        self.attempts = 0
        self._lock = threading.Lock()
        self._running: threading.Thread | None = None
        self._started = 0.0  # monotonic time the running attempt started
        self._result: tuple[float, str | None] | None = None  # (monotonic time, problem)

    def problem(self, wait: float = 1.0) -> str | None:
        """The last handshake's problem (``None``: it completed), refreshed when older than ``cache_for``."""
        with self._lock:
            result, thread = self._result, self._running
            now = time.monotonic()
            if thread is not None and now - self._started > HANDSHAKE_TIMEOUT_SECONDS + 1:
                # an attempt stuck past its own timeout (inside the client): no more threads after it
                return (
                    f"no handshake with Kafka at {self.connection.bootstrap_servers} within "
                    f"{HANDSHAKE_TIMEOUT_SECONDS:g}s"
                )
            if (result is None or now - result[0] >= self.cache_for) and thread is None:
                thread = self._running = threading.Thread(
                    target=self._attempt, name="outbox-kafka-handshake", daemon=True
                )
                self._started = now
                self.attempts += 1
                thread.start()
        if result is not None:
            return result[1]
        if thread is not None:
            thread.join(wait)
        with self._lock:
            if self._result is not None:
                return self._result[1]
        return f"no handshake with Kafka at {self.connection.bootstrap_servers} within {wait:g}s"

    def _attempt(self) -> None:
        problem = _tcp_problem(self.connection.bootstrap_servers, timeout=HANDSHAKE_TIMEOUT_SECONDS)
        if problem is None and self.connection.security_protocol.endswith("SSL"):
            # first, and bounded: kafka-python 3.0 waits for ever for a TLS handshake that never ends
            # (TLS spoken to a plaintext listener, here)
            problem = _tls_problem(self.connection, timeout=HANDSHAKE_TIMEOUT_SECONDS)
        if problem is None:
            problem = _handshake_problem(self.connection, timeout=HANDSHAKE_TIMEOUT_SECONDS)
        with self._lock:
            self._result = (time.monotonic(), problem)
            self._running = None


def _tcp_problem(bootstrap_servers: str, *, timeout: float) -> str | None:
    """``None`` when a bootstrap server accepts a TCP connection, else why none does."""
    errors = []
    for server in bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
            return None
        except OSError as exc:
            errors.append(f"{server.strip()}: {exc.strerror or exc}")
    return f"no Kafka bootstrap server reachable ({'; '.join(errors)})"


def _tls_problem(connection: KafkaConnection, *, timeout: float) -> str | None:
    """``None`` when a bootstrap server completes a TLS handshake with ``connection``'s certificates
    (verified as kafka-python verifies them: the CA file or the system's, and the host name)."""
    import ssl

    try:
        context = ssl.create_default_context(cafile=connection.ssl_cafile)
        if connection.ssl_certfile:
            context.load_cert_chain(connection.ssl_certfile, connection.ssl_keyfile)
    except (OSError, ssl.SSLError) as exc:
        return f"cannot set up TLS for Kafka: {first_line(exc)}"
    errors = []
    for server in connection.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        host = host.strip("[]")
        try:
            with (
                socket.create_connection((host, int(port)), timeout=timeout) as raw,
                context.wrap_socket(raw, server_hostname=host),
            ):
                return None
        except (OSError, ssl.SSLError) as exc:
            errors.append(f"{server.strip()}: {first_line(exc)}")
    return f"no Kafka bootstrap server completes a TLS handshake ({'; '.join(errors)})"


def _handshake_problem(connection: KafkaConnection, *, timeout: float) -> str | None:
    """``None`` when a kafka-python admin client bootstraps with ``connection``'s settings (TLS, SASL,
    then a metadata request) within ``timeout`` seconds, else why not."""
    from kafka import KafkaAdminClient  # lazily: only a relay or consumer with Kafka gets here

    timeout_ms = int(timeout * 1000)
    config = {
        **connection.client_config(),
        "client_id": f"{connection.client_id}-readiness",
        "request_timeout_ms": timeout_ms,
        "bootstrap_timeout_ms": timeout_ms,  # kafka-python 3
        "api_version_auto_timeout_ms": timeout_ms,  # kafka-python 2: its bootstrap is a version check
    }
    known = KafkaAdminClient.DEFAULT_CONFIG
    try:
        client = KafkaAdminClient(**{name: value for name, value in config.items() if name in known})
    except Exception as exc:
        settings = connection.security_protocol
        if connection.security_protocol.startswith("SASL"):
            settings += f", SASL {connection.sasl_mechanism} as {connection.sasl_username!r}"
        return (
            f"Kafka at {connection.bootstrap_servers} accepts connections but completes no handshake "
            f"with the configured settings ({settings}): {_describe(exc)}"
        )
    client.close()
    return None


def _describe(exc: BaseException) -> str:
    text = first_line(exc)
    return text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}"
