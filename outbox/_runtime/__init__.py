"""What the long-running processes share: the relay (:mod:`relay`) and the Kafka consumer runner
(:mod:`consumers._kafka`) both use these, so they sit below both, next to the write path.

- :mod:`outbox._runtime.kafka_settings`: a Kafka connection's settings (:class:`KafkaConnection`) and
  the record headers every outbox record carries (``outbox-message-id``, ...);
- :mod:`outbox._runtime.broker_health`: whether the broker is usable (its last answer, or a real
  handshake), for ``/readyz``;
- :mod:`outbox._runtime.ops_server`: the one HTTP port serving ``/metrics``, ``/healthz`` and ``/readyz``.

Internal: nothing here is part of the documented surface; business code never imports it.
"""
