"""Optional OpenTelemetry tracing: the writer's trace continues in the relay and the consumer.

The trace context travels in the message headers as W3C Trace Context (``traceparent``, and
``tracestate`` when there is one):

- **write side**: :func:`inject_current` (called by ``outbox.add``) stores the active span's context in
  the new message's headers, unless the caller already gave a ``traceparent``;
- **relay, in-process handler**: :func:`process_span` runs the handler inside a CONSUMER span that is a
  child of the message's ``traceparent``, so the handler's own spans (and the ``outbox.add`` calls it
  makes) belong to the same trace;
- **relay, Kafka**: :func:`publish_span` opens a PRODUCER span (child of the message's
  ``traceparent``) around the send; its context replaces ``traceparent``/``tracestate`` in the record's
  headers, and it ends when the broker acknowledges (or refuses) the record;
- **consumer**: :func:`process_span` around the handler, exactly as in the relay.

OpenTelemetry is an optional extra (``sqla-outbox[otel]``, i.e. ``opentelemetry-api``). Without it every
function here is a no-op and nothing is imported: :func:`inject_current` returns the headers it was
given, the span helpers yield a handle whose methods do nothing. With the API but no SDK configured,
spans are non-recording and a valid incoming ``traceparent`` passes through unchanged. A ``traceparent``
that is not valid W3C is never replaced: it is the user's header.

Spans come from the globally configured tracer provider (``opentelemetry.trace.set_tracer_provider``),
looked up again whenever it changes, under the instrumentation name ``sqla-outbox``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from outbox._message import Message

#: W3C Trace Context header names (lower case, as the specification writes them)
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
INSTRUMENTATION_NAME = "sqla-outbox"

_UNLOADED: Any = object()
_otel: Any = _UNLOADED
_load_lock = threading.Lock()


class _Otel:
    """The OpenTelemetry pieces we use, imported once, and a tracer cached per provider."""

    def __init__(self) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.trace = trace
        self.propagator = TraceContextTextMapPropagator()
        self._provider: Any = None
        self._tracer: Any = None
        self._recording = False
        self._global: Any = _UNLOADED

    def tracer(self) -> Any:
        # Until a provider is set, the API's get_tracer_provider() reads os.environ on every call (5 % of
        # the Kafka publisher's GIL time, once per span): skipped while the API's global, which every
        # set_tracer_provider() replaces, is the one seen last time.
        seen = getattr(self.trace, "_TRACER_PROVIDER", _UNLOADED)
        if seen is self._global and seen is not _UNLOADED:
            return self._tracer
        provider = self.trace.get_tracer_provider()
        self._global = getattr(self.trace, "_TRACER_PROVIDER", _UNLOADED)
        if provider is not self._provider:  # a provider set (or replaced) since the last span
            from outbox import __version__

            self._tracer = self.trace.get_tracer(INSTRUMENTATION_NAME, __version__, tracer_provider=provider)
            # Without an SDK (the API's proxy or no-op provider) every span is non-recording: the callers
            # then skip the span entirely unless a trace context has to be passed on.
            self._recording = not isinstance(
                provider, (self.trace.ProxyTracerProvider, self.trace.NoOpTracerProvider)
            )
            self._provider = provider
        return self._tracer

    def recording(self) -> bool:
        """True when a real tracer provider (an SDK) is installed, so spans are recorded."""
        self.tracer()
        return self._recording

    def parent_context(self, headers: Mapping[str, str]) -> Any:
        """The context carried by ``headers`` (an empty context, hence a root span, when there is none)."""
        return self.propagator.extract(dict(headers))

    def valid_headers(self, context: Any) -> dict[str, str]:
        """``traceparent`` (and ``tracestate``) of the span in ``context``; empty when it has none."""
        if not self.trace.get_current_span(context).get_span_context().is_valid:
            return {}
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=context)
        return carrier


def _load() -> _Otel | None:
    """OpenTelemetry, imported at the first use; ``None`` when it is not installed."""
    global _otel
    if _otel is _UNLOADED:
        with _load_lock:
            if _otel is _UNLOADED:
                try:
                    _otel = _Otel()
                except ImportError:
                    _otel = None
    return _otel  # type: ignore[no-any-return]


def enabled() -> bool:
    """True when ``opentelemetry-api`` is installed (spans may still be non-recording without an SDK)."""
    return _load() is not None


def _has_traceparent(headers: Mapping[str, str]) -> bool:
    return any(name.lower() == TRACEPARENT for name in headers)


def inject_current(headers: dict[str, str] | None) -> dict[str, str] | None:
    """``headers`` plus the active span's ``traceparent`` (and ``tracestate``), for a new message.

    Unchanged when OpenTelemetry is missing, when no valid span is active, or when the caller already set
    a ``traceparent`` (theirs wins, and so does any other header of theirs).
    """
    if headers and _has_traceparent(headers):
        return headers
    otel = _load()
    if otel is None:
        return headers
    current = otel.trace.get_current_span()
    if not current.get_span_context().is_valid:
        return headers
    carrier = otel.valid_headers(otel.trace.set_span_in_context(current))
    if not carrier:
        return headers
    return {**carrier, **(headers or {})}


def _attributes(message: Message, system: str, operation: str, destination: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "messaging.system": system,
        "messaging.operation.type": operation,
        "messaging.destination.name": destination,
        "messaging.message.id": str(message.id),
        "outbox.topic": message.topic,
        "outbox.attempt": message.attempt,
    }
    if message.key is not None:
        attributes["outbox.key"] = message.key
    return attributes


class DeliverySpan:
    """A handle on one delivery's span: mark it failed, read its headers, end it. No-op without a span."""

    __slots__ = ("_ended", "_lock", "_otel", "span")

    def __init__(self, otel: _Otel | None = None, span: Any = None) -> None:
        self._otel = otel
        self.span = span
        self._ended = False
        self._lock = threading.Lock()

    def fail(self, error: str) -> None:
        """Record that the delivery failed (span status ERROR with ``error`` as its description)."""
        if self._otel is not None and self.span is not None:
            self.span.set_status(self._otel.trace.Status(self._otel.trace.StatusCode.ERROR, error[:500]))

    def headers(self) -> dict[str, str]:
        """``traceparent`` (and ``tracestate``) naming this span, to pass on downstream; empty without one."""
        if self._otel is None or self.span is None:
            return {}
        return self._otel.valid_headers(self._otel.trace.set_span_in_context(self.span))

    def end(self, error: str | None = None) -> None:
        """End the span (at most once, from any thread), failed when ``error`` is given."""
        if self.span is None:
            return
        with self._lock:
            if self._ended:
                return
            self._ended = True
        if error is not None:
            self.fail(error)
        self.span.end()


#: the span handle of every delivery that has no span (shared: all its methods are no-ops)
_NO_SPAN = DeliverySpan()


class _SpanScope:
    """``with`` scope of :func:`process_span`: the span is current inside and ended on exit."""

    __slots__ = ("_handle", "_scope")

    def __init__(self, otel: _Otel, span: Any) -> None:
        self._handle = DeliverySpan(otel, span)
        self._scope = otel.trace.use_span(span, end_on_exit=True)

    def __enter__(self) -> DeliverySpan:
        self._scope.__enter__()
        return self._handle

    def __exit__(self, *exc: Any) -> Any:
        return self._scope.__exit__(*exc)


class _NoSpanScope:
    """``with`` scope that does nothing: no OpenTelemetry, or no SDK and no trace context to pass on."""

    __slots__ = ()

    def __enter__(self) -> DeliverySpan:
        return _NO_SPAN

    def __exit__(self, *exc: Any) -> None:
        return None


_NO_SCOPE = _NoSpanScope()


def process_span(
    message: Message, *, system: str = "outbox", destination: str | None = None
) -> AbstractContextManager[DeliverySpan]:
    """Run the block (a handler) inside a CONSUMER span, child of the message's ``traceparent``.

    The span is current in the block, so spans the handler starts are its children. An exception
    leaving the block is recorded on the span; call ``span.fail(error)`` for a failure reported without
    one. ``system`` is ``"outbox"`` in the relay and ``"kafka"`` in the consumer; ``destination``
    defaults to the message's topic.

    Without an SDK the span would be non-recording: it is skipped (this costs nothing per message)
    unless the message carries a trace context, which is then still made current for the handler.
    """
    otel = _load()
    if otel is None or not (otel.recording() or message.headers):
        return _NO_SCOPE
    span = _start(otel, message, "process", system, destination or message.topic)
    return _SpanScope(otel, span)


def publish_span(message: Message, *, destination: str, system: str = "kafka") -> DeliverySpan:
    """Start a PRODUCER span for sending ``message`` to ``destination``; the caller ends it.

    Put ``span.headers()`` into the outgoing record in place of the message's own trace headers (see
    :func:`trace_headers`), and call ``span.end()`` (or ``span.end(error)``) when the broker answers.
    Without an SDK nothing is started (the message's own trace headers then pass on unchanged).
    """
    otel = _load()
    if otel is None or not otel.recording():
        return _NO_SPAN
    return DeliverySpan(otel, _start(otel, message, "send", system, destination))


def _start(otel: _Otel, message: Message, operation: str, system: str, destination: str) -> Any:
    """A span of ``operation`` ("process": CONSUMER, "send": PRODUCER), child of the message's trace."""
    kind = otel.trace.SpanKind.CONSUMER if operation == "process" else otel.trace.SpanKind.PRODUCER
    return otel.tracer().start_span(
        f"{operation} {destination}",
        context=otel.parent_context(message.headers),
        kind=kind,
        attributes=_attributes(message, system, operation, destination),
    )


def trace_headers(headers: Mapping[str, str], span: DeliverySpan) -> dict[str, str]:
    """``headers`` with their trace context replaced by ``span``'s (unchanged when it has none, or when
    the incoming ``traceparent`` is not valid W3C and so is not ours to replace)."""
    new = span.headers()
    if not new:
        return dict(headers)
    otel = _load()
    theirs_invalid = otel is not None and not otel.valid_headers(otel.parent_context(headers))
    if theirs_invalid and _has_traceparent(headers):
        return dict(headers)
    kept = {name: value for name, value in headers.items() if name.lower() not in (TRACEPARENT, TRACESTATE)}
    return {**kept, **new}
