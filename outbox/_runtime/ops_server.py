"""The operations endpoint of a long-running process: ``/metrics``, ``/healthz`` and ``/readyz`` on one port.

Shared by ``outbox relay`` and ``outbox consume`` (``--metrics-port``, off by default). Served by the
standard library's ``http.server`` on daemon threads, so it never keeps a stopping process alive:

- ``GET /metrics``: the Prometheus text format of one ``prometheus_client`` registry;
- ``GET /healthz``: ``200 ok`` while the process can work (liveness: restart it when this fails): it
  answers, and its ``liveness`` check, if any, finds nothing wrong; else ``503`` and the reason;
- ``GET /readyz``: runs the readiness checks, each a callable returning ``None`` (fine) or a one-line
  reason; ``200`` when all pass, else ``503``. Both carry a JSON body naming every check::

      {"ready": false, "checks": {"database": {"ok": false, "detail": "OperationalError: ..."},
                                  "progress": {"ok": true}}}

Every body goes through :func:`outbox.redaction.scrub` on its way out: no password, whatever a check's
detail quotes. Readiness checks must be quick (a probe has a timeout of a second or two):
:class:`DatabaseCheck` runs its query on a thread of its own and gives up waiting after ``timeout``
seconds.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import sqlalchemy as sa

from outbox import _defaults as defaults
from outbox._errors import ConfigError, first_line
from outbox.redaction import scrub_bytes

log = logging.getLogger("outbox.ops")

#: a readiness check: ``None`` when fine, else why not (one line)
Check = Callable[[], str | None]


class OpsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` for ``registry`` and ``checks`` on ``host:port``.

    ``port=0`` picks a free port (see :attr:`port`). ``checks`` maps names to checks, or is a callable
    returning that mapping (read at each request, for checks that change with the process's state).
    ``liveness`` is the check behind ``/healthz``: cheap (no I/O), failing only when the process cannot
    work any more (a thread it needs died), as an orchestrator restarts a process that fails it.
    :meth:`start` binds the port (raising :class:`ConfigError` when it cannot) and serves; :meth:`stop`.
    """

    def __init__(
        self,
        registry: Any,
        checks: Mapping[str, Check] | Callable[[], Mapping[str, Check]],
        *,
        host: str = defaults.METRICS_HOST,
        port: int = 0,
        liveness: Check | None = None,
    ) -> None:
        self.registry = registry
        self.checks = checks
        self.liveness = liveness
        self.host = host
        self.requested_port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port served (the one chosen by the system when started with ``port=0``)."""
        if self._server is None:
            return self.requested_port
        return int(self._server.server_address[1])

    def start(self) -> OpsServer:
        ops = self

        class Handler(_OpsHandler):
            server_ops = ops

        try:
            server = ThreadingHTTPServer((self.host, self.requested_port), Handler)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {self.host}:{self.requested_port}: {exc.strerror or exc} "
                "(choose another --metrics-port)"
            ) from None
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="outbox-ops-http", daemon=True)
        self._thread.start()
        log.info("serving /metrics, /healthz and /readyz on http://%s:%d", self.host, self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> OpsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Run every check: ``(ready, JSON body)``. A check that raises fails with its error."""
        checks = self.checks() if callable(self.checks) else self.checks
        results: dict[str, dict[str, Any]] = {}
        for name, check in checks.items():
            try:
                problem = check()
            except Exception as exc:
                problem = f"check failed: {type(exc).__name__}: {first_line(exc)}"
            results[name] = {"ok": True} if problem is None else {"ok": False, "detail": problem}
        ready = all(r["ok"] for r in results.values())
        return ready, {"ready": ready, "checks": results}

    def metrics(self) -> tuple[bytes, str]:
        from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _OpsHandler(BaseHTTPRequestHandler):
    server_ops: OpsServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, content_type = self.server_ops.metrics()
            self._send(200, body, content_type)
        elif path == "/healthz":
            problem = self.server_ops.liveness() if self.server_ops.liveness is not None else None
            if problem is None:
                self._send(200, b"ok\n", "text/plain; charset=utf-8")
            else:
                self._send(503, f"not alive: {problem}\n".encode(), "text/plain; charset=utf-8")
        elif path == "/readyz":
            ready, report = self.server_ops.readiness()
            if not ready:
                failed = ", ".join(n for n, r in report["checks"].items() if not r["ok"])
                log.debug("not ready: %s", failed)
            self._send(200 if ready else 503, json.dumps(report).encode() + b"\n", "application/json")
        else:
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain; charset=utf-8")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        body = scrub_bytes(body)  # a check's detail may quote a driver's error (outbox.redaction)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes and probes every few seconds are not events: keep them out of the log."""


class DatabaseCheck:
    """Readiness check: the database answers ``SELECT 1`` within ``timeout`` seconds.

    The query runs on a thread of its own, so a hung connection makes the check fail in time instead
    of hanging the probe; while one query is still out, later checks wait for it rather than pile up.
    """

    def __init__(self, engine: sa.Engine, *, timeout: float = 2.0) -> None:
        self.engine = engine
        self.timeout = timeout
        self._lock = threading.Lock()
        self._running: threading.Thread | None = None
        self._result: str | None = None

    def __call__(self) -> str | None:
        with self._lock:
            thread = self._running
            if thread is None:
                thread = self._running = threading.Thread(
                    target=self._query, name="outbox-ready-db", daemon=True
                )
                thread.start()
        thread.join(self.timeout)
        if thread.is_alive():
            return f"the database did not answer within {self.timeout:g}s"
        return self._result

    def _query(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            result = None
        except Exception as exc:
            orig = getattr(exc, "orig", None)
            result = f"{type(orig or exc).__name__}: {first_line(orig or exc)}"
        with self._lock:
            self._result = result
            self._running = None


def metrics_registry(registry: Any = None, *, process: bool = True) -> Any:
    """``registry``, or a new prometheus-client registry of its own; with ``process``, the standard
    process, platform and garbage-collector metrics are added to it (relay and consumer alike)."""
    from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

    if registry is None:
        registry = CollectorRegistry(auto_describe=True)
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry
