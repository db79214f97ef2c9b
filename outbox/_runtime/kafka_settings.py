"""How to reach a Kafka cluster: shared by the relay's publisher and the consumer runner.

Only configuration lives here (no kafka-python import): ``relay.publishers.kafka.KafkaSettings`` adds the
producer's knobs, ``consumers._kafka.ConsumerSettings`` the consumer's. ``repr`` never shows the password.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from outbox import _defaults as defaults
from outbox._errors import ConfigError

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

# Record headers written by the relay and read back by the consumer (documented in docs/kafka.md).
HEADER_ID = "outbox-message-id"
HEADER_TOPIC = "outbox-topic"
HEADER_CREATED_AT = "outbox-created-at"
HEADER_CONTENT_TYPE = "content-type"


@dataclass(frozen=True)
class KafkaConnection:
    """Bootstrap servers, client id, TLS and SASL (PLAIN, SCRAM-SHA-256/512)."""

    bootstrap_servers: str
    client_id: str = "outbox"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    request_timeout_ms: int = defaults.KAFKA_REQUEST_TIMEOUT_MS

    def __post_init__(self) -> None:
        servers = self.bootstrap_servers.split(",") if self.bootstrap_servers else []
        if not servers or not all(s.rpartition(":")[2].isdigit() for s in servers):
            raise ConfigError(
                f"invalid Kafka bootstrap servers {self.bootstrap_servers!r}: "
                "expected HOST:PORT[,HOST:PORT...]"
            )
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise ConfigError(f"Kafka security protocol must be one of {', '.join(SECURITY_PROTOCOLS)}")
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise ConfigError(f"SASL needs a mechanism: one of {', '.join(SASL_MECHANISMS)}")
            if not self.sasl_username or self.sasl_password is None:
                raise ConfigError("SASL needs a username and a password")
        if self.request_timeout_ms <= 0:
            raise ConfigError("Kafka request_timeout_ms must be positive")

    def client_config(self) -> dict[str, Any]:
        """kafka-python keyword arguments common to producers and consumers."""
        config: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
            "reconnect_backoff_max_ms": 2_000,
        }
        if self.security_protocol.startswith("SASL"):
            config.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, name):
                config[name] = getattr(self, name)
        return config
