"""Dispatch: a claimed batch becomes deliveries, each handed to the publisher that routes its topic.

The in-process handlers come first (a topic with a registered handler is theirs), then the relay's
other publishers in order (Kafka takes every topic); a topic nobody takes fails with "no route". Each
delivery carries its topic's policy: the relay's defaults (retry, handler timeout, strict order for the
``strict_order_topics``) under what the handler's registration sets. A row is never handed out when:

- it cannot be decoded (its JSON payload or headers are corrupt): it fails permanently, since no retry
  would change it;
- it has been claimed more than ``CRASH_ALLOWANCE`` times past its policy's attempts without any outcome
  (each relay handling it died or lost its lease): it fails permanently ("abandoned"), so that a
  message that kills relays cannot loop forever;
- the relay is stopping: it is released at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from consumers.registry import Registry
from outbox.message import Message
from outbox.policy import TopicPolicy
from outbox.serialization import decode_headers, decode_payload
from relay.claim import ClaimedRow
from relay.publishers import Delivery, Failed, Outcome, Released, describe_error

#: attempts beyond a topic's max_attempts that may end with no outcome (relay killed mid-handler, lease
#: lost) before the message is declared dead, so that a message that crashes relays cannot loop forever
CRASH_ALLOWANCE = 3


class Dispatcher:
    """Routes claimed rows to ``publishers`` (asked in order) and reports the rows it cannot hand out."""

    def __init__(
        self,
        registry: Registry,
        publishers: Sequence[Any],
        *,
        default_policy: TopicPolicy,
        strict_order_topics: Iterable[str] = (),
        report: Callable[[Delivery, Outcome], None],
    ) -> None:
        self.registry = registry
        self.publishers = publishers
        self.default_policy = default_policy
        self.strict_order_topics = frozenset(strict_order_topics)
        self.report = report
        # topic -> (its handler, the defaults, the policy they make): looked up for every message
        self._policies: dict[str, tuple[Any, TopicPolicy, TopicPolicy]] = {}

    def dispatch(self, rows: list[ClaimedRow], *, stopping: bool = False) -> None:
        """Hand each row to the publisher of its topic, or report it: released when ``stopping``, failed
        when undecodable, abandoned or without a route."""
        if stopping:
            for row in rows:
                self.report(self.delivery(row, fallback=True), Released("relay stopping"))
            return
        routed: dict[int, tuple[Any, list[Delivery]]] = {}
        # topic -> (publisher, policy, decode?): looked up once per topic and batch, not once per row
        routes: dict[str, tuple[Any, TopicPolicy, bool]] = {}
        for row in rows:
            route = routes.get(row.topic)
            if route is None:
                found = self._route(row.topic)
                route = routes[row.topic] = (
                    found,
                    self.policy(row.topic),
                    found is None or found.decodes_payload,
                )
            publisher, policy, decode = route
            try:
                delivery = self.delivery(row, policy, decode=decode)
            except Exception as exc:  # undecodable row: nothing a retry would change
                delivery = self.delivery(row, policy, fallback=True)
                self.report(delivery, Failed(f"cannot decode stored message: {describe_error(exc)}", True))
                continue
            if row.attempts > policy.retry.max_attempts + CRASH_ALLOWANCE:
                # Every attempt past the policy's ended with no outcome at all: the relay handling it
                # was killed (OOM, segfault) or stalled each time. Stop feeding it to relays.
                self.report(
                    delivery,
                    Failed(
                        f"abandoned at attempt {delivery.message.attempt}: at least {CRASH_ALLOWANCE + 1} "
                        "attempts ended without any outcome (a relay died or lost its lease handling it)",
                        permanent=True,
                    ),
                )
                continue
            if publisher is None:
                self.report(delivery, Failed(f"no route for topic {delivery.message.topic}"))
                continue
            routed.setdefault(id(publisher), (publisher, []))[1].append(delivery)
        for publisher, deliveries in routed.values():
            publisher.deliver(deliveries, self.report)

    def _route(self, topic: str) -> Any:
        for publisher in self.publishers:
            if publisher.accepts(topic):
                return publisher
        return None

    def delivery(
        self,
        row: ClaimedRow,
        policy: TopicPolicy | None = None,
        *,
        fallback: bool = False,
        decode: bool = True,
    ) -> Delivery:
        """``row`` as a delivery: its payload decoded when ``decode`` (a broker gets the stored bytes),
        or as stored with no headers when ``fallback`` (a row that cannot be decoded)."""
        if fallback:
            payload: Any = row.payload
            headers: dict[str, str] = {}
        else:
            payload = decode_payload(row.payload, row.content_type) if decode else row.payload
            headers = decode_headers(row.headers)
        message = Message(
            id=row.id,
            topic=row.topic,
            key=row.key,
            payload=payload,
            headers=headers,
            attempt=row.attempts,
            created_at=row.created_at,
            content_type=row.content_type,
            body=row.payload,
        )
        if policy is None:
            policy = self.policy(row.topic)
        return Delivery(seq=row.seq, token=row.token, message=message, policy=policy)

    def policy(self, topic: str) -> TopicPolicy:
        """The topic's policy: its handler's settings over the relay's defaults (cached per topic)."""
        entry = self.registry.route(topic)
        cached = self._policies.get(topic)
        if cached is not None and cached[0] is entry and cached[1] is self.default_policy:
            return cached[2]
        policy = self._merged_policy(topic, entry)
        if len(self._policies) >= 10_000:
            self._policies.clear()
        self._policies[topic] = (entry, self.default_policy, policy)
        return policy

    def _merged_policy(self, topic: str, entry: Any) -> TopicPolicy:
        base = self.default_policy
        if topic in self.strict_order_topics:
            base = TopicPolicy(retry=base.retry, timeout=base.timeout, strict_order=True)
        policy = entry.policy(base) if entry is not None else base
        if topic in self.strict_order_topics and not policy.strict_order:
            policy = TopicPolicy(retry=policy.retry, timeout=policy.timeout, strict_order=True)
        return policy
