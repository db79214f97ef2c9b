"""Dispatch: a claimed batch becomes deliveries, each handed to the publisher that routes its topic.

The in-process handlers come first (a topic with a registered handler is theirs), then the relay's
other publishers in order (Kafka takes every topic). A relay claims only the topics it can route
(:meth:`Dispatcher.claimable`, ``relay._claim``'s invariant 15); a row that has no publisher here anyway
is released, its attempt not counted, due again after :data:`UNROUTABLE_PAUSE`, for a relay that routes
it. Each
delivery carries its topic's policy: the relay's defaults (retry, handler timeout, strict order for the
``strict_order_topics``) under what the handler's registration sets. A row is never handed out when:

- it cannot be decoded (its JSON payload or headers are corrupt): it fails permanently, since no retry
  would change it;
- its payload is larger than the relay's ``max_payload_bytes`` (written by a writer allowed more): it
  fails permanently ("payload of N bytes exceeds max_payload_bytes M"), before anything decodes it or
  hands it to a handler or a broker; replay it with a relay allowed that size;
- it has been claimed more than ``CRASH_ALLOWANCE`` times past its policy's attempts without any outcome
  (each relay handling it died or lost its lease): it fails permanently ("abandoned"), so that a
  message that kills relays cannot loop forever;
- the relay is stopping: it is released at once.

**Runs.** A claim may take several consecutive messages of one key (a run, in ``seq`` order; see
``relay._claim``). The dispatcher hands a run out a group at a time: the next group goes to its
publisher only once every message before it was delivered, so a key's groups never overlap and a hot
key holds at most one worker. A group is one message, except for a publisher that keeps the order of
what it has in flight (``keeps_order_in_flight``: the Kafka publishers, whose idempotent producer keeps
a partition's order): it gets the run's next messages of one topic (one partition) at once, pipelined.
A group's outcomes are reported together, in ``seq`` order: the delivered prefix as delivered, the
first other outcome as it is, each later message of the group as released (one the broker took anyway
is published again later: a duplicate). When a message of a run ends any way but delivered (failed,
dead, released, not routable), the rest of the run is released (attempt not counted) and the key
waits for that message exactly as it would have without runs; a message that cannot be handed out
(oversized, undecodable, abandoned) is reported only once the messages before it were delivered.
-- ``tests/test_runs.py``, ``tests/test_kafka_publish.py::test_a_hot_key_reaches_kafka_complete_and_in_order``

**Chained runs** (``relay._claim``, invariant 12). Right after each claim, on the fetcher's thread,
:meth:`Dispatcher.register` records every run of several messages as its key's lane, and appends a
chained run (its first row's ``after`` is the lane's last row) to the lane it follows, so the run
hands it out after its own last row was delivered, on the same worker, with no pause. The lane's
answer to :meth:`Dispatcher.chainable` lets the next claim chain again. A chained run whose lane ended
delivered goes out as a run of its own; one whose lane broke, or that nobody here knows, is released
unattempted. A lane whose key has more rows waiting (the claim said so: ``ClaimResult.deep``) is a
**pull** candidate (:meth:`Dispatcher.pulls`): the next claim takes the key's next run straight from
the key's rows behind the lane's last row, queued or not. A key whose queued rows a promotion
brought back (:meth:`Dispatcher.contended`: another relay's claim queued them, out of this relay's
sight) makes the next runs of that key candidates too, for queued rows only, until a pull finds none. A
key has at most two runs in a relay, the one going on and one chained: a lane is a candidate again once
its chained run has started, and then the dispatcher wakes the fetcher (``wake``), which claims the run
after it while that one goes on. A keyed message handed out alone (a run of one, which needs no lane)
is remembered too, with its outcome once known (``_Single``): a claim may chain the key's next run
behind it as behind a lane (``chainable``), and the message's outcome then starts that run, on the
publisher's thread, or releases it (the message did not go through, was refused, or the relay stopped).
So a key written at a moderate rate, whose next message is committed while the one before is still in
flight, goes on with no wait for a mark and a promotion, and nothing is set aside.
-- ``tests/test_runs.py::test_chained_runs_keep_order_through_failures_in_a_relay``,
``tests/test_runs.py::test_a_keys_next_message_is_chained_behind_its_one_message_in_flight``
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

from consumers._registry import Registry
from outbox._key_queue import RUN_LENGTH
from outbox._message import Message
from outbox._policy import TopicPolicy
from outbox._serialization import decode_headers, decode_payload
from outbox.writer import DEFAULT_MAX_PAYLOAD_BYTES
from relay._claim import ClaimedRow
from relay._topics import Topics
from relay.publishers import Delivered, Delivery, Failed, Outcome, Publisher, Released, describe_error

log = logging.getLogger("outbox.relay")

#: attempts beyond a topic's max_attempts that may end with no outcome (relay killed mid-handler, lease
#: lost) before the message is declared dead, so that a message that crashes relays cannot loop forever
CRASH_ALLOWANCE = 3

#: seconds before a message this relay has no publisher for may be claimed again: the claim leaves such
#: topics alone (relay._claim, invariant 15), so this is for the rows its SQL lets through (a pattern's
#: character class, a publisher of one's own that refuses a topic), not a loop
UNROUTABLE_PAUSE = 5.0


class Dispatcher:
    """Routes claimed rows to ``publishers`` (asked in order) and reports the rows it cannot hand out."""

    def __init__(
        self,
        registry: Registry,
        publishers: Sequence[Publisher],
        *,
        default_policy: TopicPolicy,
        strict_order_topics: Iterable[str] = (),
        report: Callable[[Delivery, Outcome], None],
        stopping: threading.Event | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        mark_started: Callable[[Delivery], bool] | None = None,
        report_and_wait: Callable[[Delivery, Outcome], None] | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.registry = registry
        #: wakes the fetcher: a deep lane's chained run has started, so the run after it can be pulled
        self.wake = wake
        self.max_payload_bytes = max_payload_bytes
        #: set when the relay stops: a run's next message is then released instead of handed out
        self.stopping = stopping or threading.Event()
        #: the durable start mark of a message taken back from an expired lease (``relay._claim``,
        #: invariant 10); False when the lease is lost. None: no marks (the lane still runs them one by one)
        self.mark_started = mark_started
        self._suspects = _SuspectLane(self)
        self.publishers = publishers
        self.default_policy = default_policy
        self.strict_order_topics = frozenset(strict_order_topics)
        self.report = report
        #: ``report``, returning once the outcome is written: the lane of reclaimed messages starts the
        #: next one only then (``relay._claim``, invariant 10)
        self.report_and_wait = report_and_wait or report
        # topic -> (its handler, the defaults, the policy they make): looked up for every message
        self._policies: dict[str, tuple[Any, TopicPolicy, TopicPolicy]] = {}
        # Chained runs (relay._claim, invariant 12), kept by the fetcher's thread alone (register and
        # chainable run there): each key's latest run of several messages, and what register decided
        # for a claimed key's rows (by the seq of its first row), for dispatch to carry out.
        self._lanes: dict[str, _Run] = {}
        self._plans: dict[int, _Run | None] = {}  # a run to start; None: attached to an earlier run
        #: each key's latest message handed out alone (a run of one, no lane), by key: a claim may chain
        #: the key's next run behind it as behind a lane, which its outcome then starts or releases
        self._singles: dict[str, _Single] = {}
        self._singles_lock = threading.Lock()
        #: the lanes whose key has rows waiting behind them (pull candidates), by key
        self._deep: dict[str, _Run] = {}
        #: keys whose rows were lately queued where this relay's scan could not see them (by another
        #: relay's claim): a promotion brought some back. Their runs pull queued rows (a guess).
        self._contended: set[str] = set()
        self._newly_contended: collections.deque[str] = collections.deque()  # from other threads
        self._claimable: tuple[tuple[str, ...], Topics] | None = None
        self._unroutable_logged: dict[str, float] = {}  # topic -> when last logged (rate limit)

    def claimable(self) -> Topics | None:
        """The topics this relay can route, for its claims (``relay._claim``, invariant 15): the topics
        its publishers list (``routed_topics``), or None when one of them may take any topic (Kafka,
        or a publisher of one's own that does not list its topics)."""
        listed: list[str] = []
        for publisher in self.publishers:
            routed = getattr(publisher, "routed_topics", None)
            topics = routed() if routed is not None else None
            if topics is None:
                return None
            listed += topics
        key = tuple(listed)
        if self._claimable is None or self._claimable[0] != key:  # the registry changed
            self._claimable = (key, Topics.of(listed))
        return self._claimable[1]

    def chainable(self, key: str, seq: int) -> bool:
        """Whether this relay's run of ``key`` ends with row ``seq`` and has not broken: a claim may take
        the key's next rows as a run chained behind it (from the fetcher's thread)."""
        lane = self._lanes.get(key)
        if lane is not None and lane.last == seq:
            return lane.state is not False
        single = self._singles.get(key)
        return single is not None and single.seq == seq and single.state is not False and not single.followed

    def contended(self, keys: Iterable[str]) -> None:
        """A promotion brought back queued rows of ``keys`` (any thread): rows of theirs were queued,
        by this relay's claims or another's. This relay's next runs of those keys are pull candidates
        for queued rows, so that the key goes on behind them without waiting for the next promotion."""
        self._newly_contended.extend(keys)

    def not_deep(self, keys: Iterable[str]) -> None:
        """The claim found nothing to pull behind the runs of ``keys``: no longer pull candidates."""
        self._contended.difference_update(keys)
        for key in keys:
            lane = self._deep.pop(key, None)
            if lane is not None:
                lane.deep = False

    def pulls(self) -> list[tuple[str, int, bool]]:
        """The runs a claim may pull the key's next run behind, as ``(key, last row, guessed)``: this
        relay's runs going on whose key has rows waiting (or may have: ``guessed``, a contended key or a
        run grown to ``RUN_LENGTH``, whose rows another relay may have queued), and whose chained run
        (if any) has started (from the fetcher's thread)."""
        found: list[tuple[str, int, bool]] = []
        for key, lane in list(self._deep.items()):
            if lane.state is not None or self._lanes.get(key) is not lane:
                del self._deep[key]  # ended, broke, or replaced: rows behind it come back by promotion
            elif lane.boundary is None or lane.reported >= lane.boundary[0]:
                found.append((key, lane.last, lane.guessed))
        return found

    def chaining(self) -> bool:
        """Whether a run of several messages is going on, that a claim could chain a run behind."""
        return any(run.state is None for run in self._lanes.values())

    def register(self, rows: list[ClaimedRow], deep: Iterable[str] = ()) -> None:
        """Right after a claim, on the fetcher's thread (before the next claim asks :meth:`chainable`):
        make the claim's runs of several messages known, and attach each chained run to the run it
        follows (or, that run having ended, start it as a run of its own; broken, release it). ``deep``:
        the keys whose next rows wait behind what the claim took (their lanes become pull candidates)."""
        deep = set(deep)
        while self._newly_contended:
            self._contended.add(self._newly_contended.popleft())
        by_key: dict[str, list[ClaimedRow]] = {}
        for row in rows:
            if row.key is not None:
                by_key.setdefault(row.key, []).append(row)
        for key, keyed in by_key.items():
            first = keyed[0]
            if any(row.reclaimed for row in keyed):
                continue  # the suspects' lane hands these out, one at a time: never chained
            single: _Single | None = None
            if first.after:
                lane = self._lanes.get(key)
                if lane is not None and lane.extend(keyed, first.after, deep=key in deep):
                    self._plans[first.seq] = None
                    if lane.deep:
                        self._deep[key] = lane
                    else:
                        self._deep.pop(key, None)
                    continue
                single = self._singles.get(key)
                if single is None or single.seq != first.after:
                    single = None
                    if lane is None or lane.state is not True or lane.last != first.after:
                        continue  # its run broke (or is unknown): dispatch releases the chained rows
            elif len(keyed) < 2 and key not in deep:
                self._singles[key] = _Single(first.seq)
                continue
            lane = _Run(self, keyed)
            started: bool | None = True
            if single is not None:  # chained behind a message handed out alone
                with self._singles_lock:
                    started = single.state
                    if started is None:
                        single.then = lane  # its outcome starts the run, or releases it
                single.followed = True  # the lane goes on from here
                if started is False:
                    continue  # it did not go through: dispatch releases the chained rows
            self._plans[first.seq] = lane if started else None
            self._lanes[key] = lane
            lane.deep = key in deep or key in self._contended
            lane.guessed = key not in deep
            if lane.deep:
                self._deep[key] = lane
            else:
                self._deep.pop(key, None)
        for key in deep.difference(by_key):
            # rows of a key this claim did not take were queued: behind this relay's run of the key,
            # if it has one going on, which becomes a pull candidate
            lane = self._lanes.get(key)
            if lane is not None and lane.state is None and (not lane.deep or lane.guessed):
                lane.deep, lane.guessed = True, False
                self._deep[key] = lane
        if len(self._singles) > MAX_LANES:  # forget finished ones with nothing behind them, oldest first
            with self._singles_lock:
                finished = [k for k, one in self._singles.items() if one.state is not None and not one.then]
            for k in finished[: len(self._singles) // 2]:
                del self._singles[k]
        if len(self._lanes) > MAX_LANES:  # forget ended runs, oldest first
            for key in [k for k, run in self._lanes.items() if run.state is not None][
                : len(self._lanes) // 2
            ]:
                del self._lanes[key]
                self._deep.pop(key, None)

    def dispatch(self, rows: list[ClaimedRow], *, stopping: bool = False) -> None:
        """Hand each row to the publisher of its topic, or report it: released when ``stopping``, failed
        when oversized, undecodable, abandoned or without a route."""
        if stopping:
            for row in rows:
                self._plans.pop(row.seq, None)
                self._done(self.delivery(row, fallback=True), Released("relay stopping"))
            return
        routed: dict[int, tuple[Any, list[Delivery]]] = {}
        # topic -> (publisher, policy, decode?): looked up once per topic and batch, not once per row
        routes: dict[str, tuple[Any, TopicPolicy, bool]] = {}
        # Taken back from an expired lease: maybe what killed the relay that held them. They (and the
        # other rows of their keys) go one at a time through the suspects' lane (invariant 10).
        suspect_keys = {row.key for row in rows if row.reclaimed and row.key is not None}
        suspect_keys -= {row.key for row in rows if row.after}  # (never both in one claim)
        suspects = [row for row in rows if row.reclaimed or (row.key is not None and row.key in suspect_keys)]
        if suspects:
            self._suspects.add(suspects)
            rows = [row for row in rows if not (row.reclaimed or row.key in suspect_keys)]
        runs: dict[str, list[ClaimedRow]] = {}  # key -> its rows after the first, in seq order
        firsts: set[int] = set()
        for row in rows:  # the claim returns rows in seq order
            if row.key is not None:
                run = runs.get(row.key)
                if run is None:
                    runs[row.key] = []
                    firsts.add(row.seq)
                else:
                    run.append(row)
        for row in rows:
            if row.key is not None and row.seq not in firsts:
                continue  # handed out by its run, after the one before it
            if row.key is not None and row.seq in self._plans:
                planned = self._plans.pop(row.seq)
                if planned is not None:
                    planned.next()
                continue  # else: attached to the run it follows, which hands it out
            if row.after:  # chained behind a run that did not go through (or unknown here)
                for chained in [row, *runs.get(row.key or "", [])]:
                    self.report(self.delivery(chained, fallback=True), Released(_EARLIER_UNFINISHED))
                continue
            route = routes.get(row.topic)
            if route is None:
                route = routes[row.topic] = self.route(row.topic)
            publisher, policy, decode = route
            rest = runs.get(row.key) if row.key is not None else None
            if rest:
                _Run(self, [row, *rest]).next()
                continue
            delivery = self.ready(row, publisher, policy, decode)
            if delivery is not None:
                routed.setdefault(id(publisher), (publisher, []))[1].append(delivery)
        for publisher, deliveries in routed.values():
            publisher.deliver(deliveries, self._done)

    def _done(self, delivery: Delivery, outcome: Outcome) -> None:
        """The outcome of a message handed out alone (any publisher thread): reported; for a keyed one, a
        run chained behind it (:meth:`register`) then starts, or is released if it did not go through."""
        key = delivery.message.key
        single = self._singles.get(key) if key is not None else None
        if single is None or single.seq != delivery.seq:
            self.report(delivery, outcome)
            return
        delivered = isinstance(outcome, Delivered)
        with self._singles_lock:
            single.state = delivered
            then, single.then = single.then, None
        if then is not None and delivered:
            delivery = replace(delivery, run_end=False)  # the chained run goes on: no promotion
        self.report(delivery, outcome)
        if then is None:
            return
        if delivered:
            then.next()
        else:
            then._release_rest(_EARLIER_UNFINISHED)

    def ready(
        self,
        row: ClaimedRow,
        publisher: Publisher | None,
        policy: TopicPolicy,
        decode: bool,
        *,
        run_end: bool = True,
    ) -> Delivery | None:
        """``row`` as a delivery for ``publisher``, or None after reporting why it cannot be handed out."""
        delivery, refusal = self.prepare(row, publisher, policy, decode, run_end=run_end)
        if refusal is not None:
            self._done(delivery, refusal)
            return None
        return delivery

    def prepare(
        self,
        row: ClaimedRow,
        publisher: Publisher | None,
        policy: TopicPolicy,
        decode: bool,
        *,
        run_end: bool = True,
    ) -> tuple[Delivery, Failed | Released | None]:
        """``row`` as a delivery for ``publisher``, with the outcome to report instead of handing it
        out (None: it may be handed out). Reports nothing: a run reports a refusal only once every
        message before it was delivered."""
        if (size := len(row.payload)) > self.max_payload_bytes:  # no decoding, no handler, no broker
            error = f"payload of {size} bytes exceeds max_payload_bytes {self.max_payload_bytes}"
            return self.delivery(row, policy, fallback=True), Failed(error, permanent=True)
        try:
            delivery = self.delivery(row, policy, decode=decode, run_end=run_end)
        except Exception as exc:  # undecodable row: nothing a retry would change
            delivery = self.delivery(row, policy, fallback=True)
            return delivery, Failed(f"cannot decode stored message: {describe_error(exc)}", True)
        if row.attempts >= policy.retry.max_attempts + CRASH_ALLOWANCE:
            # Attempts are counted with their outcome, or before they start for a message taken back
            # from an expired lease: past the policy's attempts, the rest started and ended with no
            # outcome at all: it was running when its relay was killed (OOM, segfault, os._exit) or
            # stalled, each time. Stop feeding it to relays.
            return delivery, Failed(
                f"abandoned after {row.attempts} attempts: at least {CRASH_ALLOWANCE + 1} of them "
                "ended without any outcome, with the relay running it killed or stalled (it kills "
                "or hangs relays)",
                permanent=True,
            )
        if publisher is None:  # for a relay that routes it: no attempt counted (relay._claim, inv. 15)
            self._log_unroutable(row.topic)
            return delivery, Released(f"no route for topic {row.topic}", retry_after=UNROUTABLE_PAUSE)
        return delivery, None

    def _log_unroutable(self, topic: str) -> None:
        now = time.monotonic()
        if now - self._unroutable_logged.get(topic, -60.0) >= 60.0:
            self._unroutable_logged[topic] = now
            log.warning(
                "claimed a message of topic %s, which no handler or publisher of this relay takes: "
                "released without counting an attempt, for a relay that routes it (again every %gs)",
                topic,
                UNROUTABLE_PAUSE,
            )

    def route(self, topic: str) -> tuple[Publisher | None, TopicPolicy, bool]:
        """The publisher of ``topic`` (None: no route), its policy, and whether payloads are decoded."""
        found = self._route(topic)
        return found, self.policy(topic), found is None or found.decodes_payload

    def _route(self, topic: str) -> Publisher | None:
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
        run_end: bool = True,
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
            attempt=row.attempts + 1,  # the attempts counted so far, and this one
            created_at=row.created_at,
            content_type=row.content_type,
            body=row.payload,
        )
        if policy is None:
            policy = self.policy(row.topic)
        return Delivery(seq=row.seq, token=row.token, message=message, policy=policy, run_end=run_end)

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


#: why the messages of a run after one that did not go through are given back
_EARLIER_UNFINISHED = "an earlier message of its key did not finish"
#: runs the dispatcher remembers for chaining (one per key, the latest) before it forgets ended ones
MAX_LANES = 4096


class _Single:
    """A keyed message handed out alone (``Dispatcher._singles``): its outcome so far (None while in
    flight, then whether it was delivered), the run chained behind it, waiting for that outcome, and
    whether a run was chained behind it (the key's lane then goes on from that run)."""

    __slots__ = ("followed", "seq", "state", "then")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.state: bool | None = None
        self.then: _Run | None = None
        self.followed = False


class _Run:
    """One key's run, handed out in order, a group at a time: the next group only once every message
    before it was delivered; the rest released as soon as one ends otherwise (or the relay stops).

    A group is one message, or, for a publisher that keeps the order of what it has in flight
    (``keeps_order_in_flight``: Kafka's idempotent producer, per partition, so per topic and key), the
    run's next messages that share one topic. A group's outcomes are reported together, in ``seq``
    order, once all are in: the delivered prefix as delivered, the first other outcome as it is, and
    every later message of the group as released (a record the broker took anyway is published again
    later: a duplicate, never a message delivered before an earlier one of its key was).
    """

    __slots__ = (
        "boundary",
        "deep",
        "dispatcher",
        "group",
        "guessed",
        "last",
        "length",
        "lock",
        "outcomes",
        "reported",
        "rows",
        "state",
    )

    def __init__(self, dispatcher: Dispatcher, rows: list[ClaimedRow]) -> None:
        self.dispatcher = dispatcher
        self.rows = rows
        self.lock = threading.Lock()
        #: the group handed out and not yet reported, by seq, and the outcomes come back so far
        self.group: dict[int, Delivery] = {}
        self.outcomes: dict[int, Outcome] = {}
        #: the run's last row (chained runs extend it); None while it goes on, True once every row was
        #: delivered, False once it broke (a row ended otherwise, or the relay stopped)
        self.last = rows[-1].seq
        self.state: bool | None = None
        #: the greatest seq whose outcome is reported (or being reported)
        self.reported = 0
        #: (the seq after which a chained run follows, that chained run's last seq): once the former is
        #: reported the chained run has started, and a deep lane may have the run after it pulled
        self.boundary: tuple[int, int] | None = None
        #: the key has rows waiting behind the lane's last row (``ClaimResult.deep``), or may have: the
        #: lane has grown to ``RUN_LENGTH`` rows (other relays may have queued the key's next rows)
        self.deep = False
        #: ``deep`` is a guess (a contended key, a long run), not what a claim found: a pull takes
        #: queued rows only
        self.guessed = False
        self.length = len(rows)

    def extend(self, rows: list[ClaimedRow], after: int, *, deep: bool = False) -> bool:
        """Chain ``rows`` (a run of the key, following row ``after``) behind this run, if it still goes
        on and ends with ``after``; False otherwise. ``deep``: more rows of the key wait behind them."""
        with self.lock:
            if self.state is not None or self.last != after:
                return False
            self.rows.extend(rows)
            self.last = rows[-1].seq
            self.length += len(rows)
            self.deep = deep or self.length >= RUN_LENGTH
            self.guessed = not deep
            if after > self.reported:
                self.boundary = (after, self.last)
            return True

    def next(self) -> None:
        """Hand out the run's next group (its outcomes come back through :meth:`done`)."""
        dispatcher = self.dispatcher
        if dispatcher.stopping.is_set():
            self._release_rest("relay stopping")
            return
        refused: tuple[Delivery, Failed | Released] | None = None
        with self.lock:
            if not self.rows:
                self.state = True  # every message delivered
                return
            first = self.rows[0]
            publisher, policy, decode = dispatcher.route(first.topic)
            size = 1
            if getattr(publisher, "keeps_order_in_flight", False):
                while size < len(self.rows) and self.rows[size].topic == first.topic:
                    size += 1
            group: list[Delivery] = []
            for index, row in enumerate(self.rows[:size]):
                last = index + 1 == len(self.rows)
                delivery, refusal = dispatcher.prepare(row, publisher, policy, decode, run_end=last)
                if refusal is not None:
                    if not group:  # the head: refused now, the run ends with it
                        refused = (delivery, refusal)
                        del self.rows[0]
                    # else: the group ends before it; it is refused once the group was delivered
                    break
                group.append(delivery)
            del self.rows[: len(group)]
            self.group = {delivery.seq: delivery for delivery in group}
            self.outcomes = {}
        if refused is not None:
            dispatcher.report(*refused)
            self._release_rest(_EARLIER_UNFINISHED)
            return
        assert publisher is not None  # prepare refuses every row that has no publisher
        publisher.deliver(group, self.done)

    def done(self, delivery: Delivery, outcome: Outcome) -> None:
        with self.lock:
            if delivery.seq not in self.group or delivery.seq in self.outcomes:
                return  # not this group's, or already in (a publisher reports each delivery once)
            self.outcomes[delivery.seq] = outcome
            if len(self.outcomes) < len(self.group):
                return  # a group's outcomes are reported together, in seq order
            group, outcomes = self.group, self.outcomes
            self.group, self.outcomes = {}, {}
            before = self.reported
            self.reported = max(self.reported, max(group))
            boundary = self.boundary
        report = self.dispatcher.report
        broken = False
        for seq in sorted(group):
            if broken:
                report(group[seq], Released(_EARLIER_UNFINISHED))
                continue
            delivery, outcome = group[seq], outcomes[seq]
            if boundary is not None and seq == boundary[0] and isinstance(outcome, Delivered):
                delivery = replace(delivery, run_end=False)  # the chained run goes on: no promotion
            report(delivery, outcome)
            broken = not isinstance(outcome, Delivered)
        if broken:
            self._release_rest(_EARLIER_UNFINISHED)
            return
        chained_started = boundary is not None and before < boundary[0] <= self.reported
        if chained_started and self.deep and self.dispatcher.wake is not None:
            self.dispatcher.wake()  # the run after the chained one may be pulled now
        self.next()

    def _release_rest(self, reason: str) -> None:
        with self.lock:
            rest, self.rows = self.rows, []
            self.state = False
        for row in rest:
            self._release(row, reason)

    def _release(self, row: ClaimedRow, reason: str) -> None:
        self.dispatcher.report(self.dispatcher.delivery(row, fallback=True), Released(reason))


class _SuspectLane:
    """Messages taken back from an expired lease, run one at a time for the whole relay, each after a
    durable start mark: if a relay dies again, only the one that was running has an attempt counted
    (``relay._claim``, invariant 10). Rows of one key keep their order; after one of them ends
    otherwise than delivered, the later ones of its key are released."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.rows: collections.deque[ClaimedRow] = collections.deque()
        self.held: set[str] = set()  # keys whose earlier row did not go through
        self.lock = threading.Lock()
        self.busy = False

    def add(self, rows: list[ClaimedRow]) -> None:
        with self.lock:
            self.rows.extend(sorted(rows, key=lambda r: r.seq))
            if self.busy:
                return
            self.busy = True
        self.next()

    def next(self) -> None:
        """Hand out the next suspect (its outcome comes back through :meth:`done`)."""
        try:
            self._next()
        except Exception:  # pragma: no cover - a bug: never leave the lane busy with rows held in flight
            log.exception("the relay's lane for reclaimed messages failed; releasing what it held")
            with self.lock:
                rest, self.rows, self.busy = list(self.rows), collections.deque(), False
            for row in rest:
                self.dispatcher.report(self.dispatcher.delivery(row, fallback=True), Released("relay error"))

    def _next(self) -> None:
        dispatcher = self.dispatcher
        while True:
            with self.lock:
                if not self.rows:
                    self.busy = False
                    self.held.clear()
                    return
                row = self.rows.popleft()
                held = row.key is not None and row.key in self.held
                last_of_key = row.key is None or all(r.key != row.key for r in self.rows)
            if dispatcher.stopping.is_set() or held:
                reason = "relay stopping" if not held else "an earlier message of its key did not finish"
                dispatcher.report(dispatcher.delivery(row, fallback=True), Released(reason))
                continue
            publisher, policy, decode = dispatcher.route(row.topic)
            delivery = dispatcher.ready(row, publisher, policy, decode, run_end=last_of_key)
            if delivery is None:
                self._hold(row.key)
                continue
            if dispatcher.mark_started is not None:
                # in-process handlers: their worker marks it right before the handler starts (not while it
                # waits behind other work); other publishers: now, before it is sent
                own = getattr(publisher, "marks_starts", False)
                if not own and not dispatcher.mark_started(delivery):
                    dispatcher.report(delivery, Released("lease lost before it started"))
                    self._hold(row.key)
                    continue
                delivery = replace(delivery, counted=True)
            assert publisher is not None  # ready refuses every row that has no publisher
            publisher.deliver([delivery], self.done)
            return

    def done(self, delivery: Delivery, outcome: Outcome) -> None:
        # its outcome durable before the next suspect starts: were that one to kill the relay, this
        # one's attempt must not be counted again
        self.dispatcher.report_and_wait(delivery, outcome)
        if not isinstance(outcome, Delivered):
            self._hold(delivery.message.key)
        self.next()

    def _hold(self, key: str | None) -> None:
        if key is not None:
            with self.lock:
                self.held.add(key)
