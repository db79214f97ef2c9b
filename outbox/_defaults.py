"""The default of every relay setting, written once.

Three places show these values and must never disagree: the keyword defaults of :class:`relay.Relay`
(and :class:`relay.maintenance.Maintenance`, :class:`relay.metrics.RelayMetrics`, the Kafka publishers'
``KafkaSettings``), the CLI's :class:`~outbox.cli._config.Settings` (flags, ``OUTBOX_*``, config file),
and the ``(default ...)`` of each ``outbox relay --help`` line. All three read this module;
``tests/test_defaults.py`` checks that they agree.

It sits at the bottom of the layers (``docs/architecture.md``) so that the CLI can read it without
loading the relay. The retry defaults are :class:`~outbox._policy.RetryPolicy`'s own and the payload
limit is ``outbox.add``'s: they are named here, not written again.
"""

from __future__ import annotations

import datetime as dt

from outbox._policy import RetryPolicy
from outbox.writer import DEFAULT_MAX_PAYLOAD_BYTES

# --- claiming and handling ----------------------------------------------------------------------------------

#: messages a claim asks for
BATCH_SIZE = 200
#: what claims grow to while a backlog lasts and the handlers keep up (``max_batch_size=None``: this,
#: or ``batch_size`` if larger)
MAX_BATCH_SIZE = 2000
#: handler threads
WORKERS = 8
#: ``max_in_flight=None`` with a Kafka publisher: messages claimed and not yet recorded, at most (about
#: twice what is in flight at full speed; BENCHMARKS.md, "Figures behind the code")
BROKER_IN_FLIGHT = 2000
#: payload bytes a relay holds claimed and not yet recorded, at most: its memory follows this
MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024
#: the largest payload the relay hands out (bytes, as stored): ``outbox.add``'s limit
MAX_PAYLOAD_BYTES = DEFAULT_MAX_PAYLOAD_BYTES
#: seconds a claim holds a message before another relay may take it
LEASE_SECONDS = 30.0
#: seconds between polls when idle
POLL_INTERVAL = 1.0
#: seconds running handlers get to finish on stop
STOP_TIMEOUT = 30.0

# --- retries (RetryPolicy's own defaults) -------------------------------------------------------------------

_RETRY = RetryPolicy()
#: attempts before a message is dead, unless its handler's policy says otherwise
MAX_ATTEMPTS = _RETRY.max_attempts
#: seconds before the first retry, doubling after
BACKOFF_INITIAL = _RETRY.backoff_initial
#: longest wait between retries, in seconds
BACKOFF_MAX = _RETRY.backoff_max

# --- maintenance, metrics -----------------------------------------------------------------------------------

#: delivered messages (and consumer inbox rows) older than this are deleted
RETENTION = dt.timedelta(days=7)
#: messages and keys waiting longer than this past their due time are reported
STUCK_AFTER = dt.timedelta(minutes=5)
#: seconds between two maintenance runs (retention, stuck monitor)
MAINTENANCE_INTERVAL = 60.0
#: seconds between two relay heartbeats (relay._heartbeat), and the age past which a relay whose last
#: heartbeat is older is no longer called alive (three beats missed)
HEARTBEAT_INTERVAL = 5.0
ALIVE_WITHIN = 3 * HEARTBEAT_INTERVAL
#: seconds between two reads of the metrics' gauges computed from the table
METRICS_INTERVAL = 15.0
#: the address the metrics port listens on
METRICS_HOST = "0.0.0.0"

# --- Kafka publishing ---------------------------------------------------------------------------------------

#: the relay's Kafka client id
KAFKA_CLIENT_ID = "outbox-relay"
#: milliseconds the producer waits to fill a batch
KAFKA_LINGER_MS = 5
#: producer batch size in bytes
KAFKA_BATCH_SIZE = 256 * 1024
#: milliseconds a send may take before it is given up (the message is released, not failed)
KAFKA_DELIVERY_TIMEOUT_MS = 120_000
#: milliseconds a Kafka request may take (any client of ours: relay, consumer, dlq replay)
KAFKA_REQUEST_TIMEOUT_MS = 30_000
