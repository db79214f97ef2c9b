"""Handler registration: plain functions bound to topics, run by the relay or by ``outbox consume``.

A handler takes the :class:`outbox.Message`, and optionally a SQLAlchemy ``Session`` as its second
parameter. With a session, the handler's database work, any ``outbox.add(session, ...)`` it makes, and
the record that the message was handled commit in one transaction::

    from consumers import handler

    @handler("order.created", max_attempts=5)
    def send_confirmation(message):
        ...

    @handler("order.paid")
    def record_payment(message, session):
        session.add(Payment(order_id=message.payload["order_id"]))
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from outbox._errors import ConfigError
from outbox._message import Message
from outbox._policy import PolicyOverrides, TopicPolicy
from outbox.writer import validate_topic

HandlerFunc = Callable[..., Any]


@dataclass(frozen=True)
class Handler:
    """A registered handler: the function, whether it takes a session, and what it says of its policy."""

    topic: str
    func: HandlerFunc
    takes_session: bool
    overrides: PolicyOverrides

    def policy(self, base: TopicPolicy) -> TopicPolicy:
        """The topic's policy: the relay's (or consumer's) ``base`` with this handler's overrides."""
        return self.overrides.apply(base)

    @property
    def name(self) -> str:
        return (
            f"{getattr(self.func, '__module__', '?')}.{getattr(self.func, '__qualname__', repr(self.func))}"
        )

    def __call__(self, message: Message, session: Any = None) -> Any:
        if self.takes_session:
            return self.func(message, session)
        return self.func(message)


def _takes_session(func: HandlerFunc) -> bool:
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2 or any(p.name == "session" for p in params):
        return True
    if not positional and not any(p.kind is p.VAR_POSITIONAL for p in params):
        raise ConfigError(f"handler {func!r} must accept the message as its first parameter")
    return False


#: topics whose route a registry remembers (the relay asks several times per message)
_MAX_CACHED_ROUTES = 10_000


class Registry:
    """Topic -> handler table. Topics are exact names or shell-style patterns (``orders.*``)."""

    def __init__(self) -> None:
        self._exact: dict[str, Handler] = {}
        self._patterns: list[Handler] = []
        # topic -> route, as found (patterns included); replaced by a new dict on every registration
        self._routes: dict[str, Handler | None] = {}

    def handler(
        self,
        topic: str,
        *,
        max_attempts: int | None = None,
        backoff_initial: float | None = None,
        backoff_max: float | None = None,
        jitter: float | None = None,
        timeout: float | None = None,
        strict_order: bool | None = None,
    ) -> Callable[[HandlerFunc], HandlerFunc]:
        """Decorator registering a function for ``topic``.

        Every policy argument left ``None`` takes the relay's setting (``outbox relay --max-attempts``
        and friends); given ones override it for this topic. ``strict_order=True`` parks a key behind a
        dead message until it is replayed or purged.
        """
        overrides = PolicyOverrides(
            max_attempts=max_attempts,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            jitter=jitter,
            timeout=timeout,
            strict_order=strict_order,
        )

        def register(func: HandlerFunc) -> HandlerFunc:
            self.add(topic, func, overrides=overrides)
            return func

        return register

    def add(self, topic: str, func: HandlerFunc, *, overrides: PolicyOverrides | None = None) -> Handler:
        """Register ``func`` for ``topic`` (the non-decorator form)."""
        pattern = is_pattern(topic)
        if not pattern:
            validate_topic(topic)
        if inspect.iscoroutinefunction(func):
            raise ConfigError(f"handler {func.__qualname__} is async; handlers are plain (sync) functions")
        entry = Handler(topic, func, _takes_session(func), overrides or PolicyOverrides())
        existing = self._exact.get(topic) or next((h for h in self._patterns if h.topic == topic), None)
        if existing is not None and existing.func is not func:
            raise ConfigError(f"topic {topic!r} already has a handler ({existing.name})")
        if pattern:
            self._patterns = [h for h in self._patterns if h.topic != topic] + [entry]
        else:
            self._exact[topic] = entry
        self._routes = {}
        return entry

    def route(self, topic: str) -> Handler | None:
        """The handler for ``topic``: an exact registration first, else the first matching pattern."""
        routes = self._routes  # a registration meanwhile replaces the dict: nothing stale is kept
        try:
            return routes[topic]
        except KeyError:
            pass
        found = self._find(topic)
        if len(routes) >= _MAX_CACHED_ROUTES:
            routes.clear()
        routes[topic] = found
        return found

    def _find(self, topic: str) -> Handler | None:
        found = self._exact.get(topic)
        if found is not None:
            return found
        for entry in self._patterns:
            if fnmatch.fnmatchcase(topic, entry.topic):
                return entry
        return None

    def topics(self) -> list[str]:
        return sorted(self._exact) + [h.topic for h in self._patterns]

    def __len__(self) -> int:
        return len(self._exact) + len(self._patterns)


def is_pattern(topic: str) -> bool:
    """Whether a registered topic is a shell-style pattern (``orders.*``) rather than a name."""
    return any(ch in topic for ch in "*?[")


#: the registry that ``@consumers.handler`` registers on
default_registry = Registry()


def handler(
    topic: str,
    *,
    max_attempts: int | None = None,
    backoff_initial: float | None = None,
    backoff_max: float | None = None,
    jitter: float | None = None,
    timeout: float | None = None,
    strict_order: bool | None = None,
) -> Callable[[HandlerFunc], HandlerFunc]:
    """Register a handler for ``topic`` on the default registry. See :meth:`Registry.handler`."""
    return default_registry.handler(
        topic,
        max_attempts=max_attempts,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
        jitter=jitter,
        timeout=timeout,
        strict_order=strict_order,
    )


def load_registry(spec: str) -> Registry:
    """Import ``MODULE[:ATTR]`` and return its registry (``ATTR`` names a Registry; default: the default one).

    Raises :class:`ConfigError` with one clear line when the module or attribute cannot be loaded.
    """
    import importlib
    import os
    import sys

    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise ConfigError(f"invalid --app {spec!r}: expected MODULE or MODULE:ATTR")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`, let the current directory's modules be found
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(
                f"cannot import --app module {module_name!r}: no such module in the current directory "
                f"({os.getcwd()}) or on PYTHONPATH; run the command from your project's root, or set "
                "PYTHONPATH to the directory that holds it"
            ) from None
        raise ConfigError(f"cannot import --app module {module_name!r}: {exc}") from None
    except Exception as exc:
        raise ConfigError(
            f"importing --app module {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    if not attr:
        return default_registry
    if not hasattr(module, attr):
        raise ConfigError(f"--app {spec!r}: module {module_name} has no attribute {attr!r}")
    registry = getattr(module, attr)
    if not isinstance(registry, Registry):
        raise ConfigError(
            f"--app {spec!r}: {module_name}.{attr} is a {type(registry).__name__}, not a consumers.Registry"
        )
    return registry
