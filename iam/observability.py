"""Logs, metrics, traces and audit events, set up once per process.

- Logs are JSON lines on stderr, one event per line, with the trace and span ids of the request.
- Metrics are Prometheus text at /metrics, with low-cardinality labels only: route templates, never raw
  paths; configured client ids, never users or tokens.
- Traces are OpenTelemetry spans (one per request, one per store statement), exported over OTLP when the
  standard OTEL_* variables ask for it, and propagated with W3C trace context on calls between roles.
  Off (the default), no tracing code runs at all.
- Audit events go to the `iam.audit` logger in a stable schema (see AUDIT_SCHEMA), on their own stream.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from iam import __version__
from iam.http import client_address

# -- logs ------------------------------------------------------------------------------------------------
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName",
                                                                           "color_message"}  # uvicorn's, for terminals


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        event.update(_trace_ids())
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                event[key] = value
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str, separators=(",", ":"))


QUIET_LOGGERS = ("sqlalchemy", "aiosqlite", "asyncpg", "httpx", "httpcore", "alembic")


def setup_logging(level: str = "info", audit_log: str = "stderr") -> None:
    """JSON logs on stderr; audit events on their own handler (stderr, stdout or a file path)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # Whatever the level, no line may carry a token, code, secret, cookie or password (ASVS 5 V16.2.5). The
    # database drivers log statements with their parameters (aiosqlite at DEBUG, SQLAlchemy's engine at INFO,
    # which is what `echo` turns on), and their parameters are token JWTs and password hashes; httpx logs request
    # URLs at INFO, and internal URLs carry user codes and subjects; alembic is chatty. Pinned, so log_level
    # never reaches them.
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)

    audit_handler: logging.Handler
    if audit_log == "stdout":
        audit_handler = logging.StreamHandler(sys.stdout)
    elif audit_log == "stderr":
        audit_handler = logging.StreamHandler(sys.stderr)
    else:
        audit_handler = logging.FileHandler(audit_log)
    audit_handler.setFormatter(JsonFormatter())
    AUDIT.handlers[:] = [audit_handler]
    AUDIT.setLevel(logging.INFO)
    AUDIT.propagate = False


# -- audit -----------------------------------------------------------------------------------------------
AUDIT = logging.getLogger("iam.audit")
AUDIT_SCHEMA = 1
# The events iam writes; their names and fields are a contract for log pipelines (README, "Audit events").
AUDIT_EVENTS = {
    "login.succeeded", "login.failed", "login.locked", "mfa.enrolled", "mfa.failed", "session.ended",
    "token.issued", "token.refreshed", "token.revoked", "refresh.reuse_detected", "code.replayed",
    "client.auth_failed", "introspection.refused", "user.created", "user.changed", "user.disabled", "user.deleted",
    "device.approved", "device.denied", "key.rotated", "key.removed", "password.changed", "reauthentication.failed",
    "access.removed", "mfa.reset", "user.signed_out", "consent.granted", "consent.denied", "user.linked",
    "mfa.recovery_codes_created", "mfa.recovery_code_used", "password.reset_requested", "password.reset",
    "email.verification_sent", "email.verified", "mfa.removed",
    "client.created", "client.updated", "client.secret_rotated", "client.deleted", "client.registered",
    "client.initial_token_issued", "client.initial_token_revoked",
}


def audit(event: str, outcome: str = "success", *, actor: str | None = None, client_id: str | None = None,
          source: str | None = None, **details) -> None:
    """Record a security-relevant action: who (actor), what (event), when, client, source address, outcome."""
    assert event in AUDIT_EVENTS, event
    AUDIT.info(event, extra={"audit": {
        "schema": AUDIT_SCHEMA, "event": event, "outcome": outcome, "actor": actor, "client_id": client_id,
        "source": source, "details": details,
    }})


def source_of(request) -> str | None:
    """The client address of a request, as the configured proxies vouch for it."""
    return client_address(request, request.app.state.iam.settings.trusted_proxies)


# -- metrics ---------------------------------------------------------------------------------------------
disable_created_metrics()  # no `_created` series: they double the exposition for no alerting value
REGISTRY = CollectorRegistry(auto_describe=True)
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

HTTP_REQUESTS = Counter("iam_http_requests_total", "HTTP requests by route template and status",
                        ["route", "method", "status"], registry=REGISTRY)
HTTP_DURATION = Histogram("iam_http_request_duration_seconds", "HTTP request latency by route template",
                          ["route", "method"], buckets=_BUCKETS, registry=REGISTRY)
TOKENS_ISSUED = Counter("iam_tokens_issued_total", "Token responses by grant type and client",
                        ["grant_type", "client_id"], registry=REGISTRY)
INTROSPECTIONS = Counter("iam_introspections_total", "Introspections and forward-auth checks by result",
                         ["endpoint", "result"], registry=REGISTRY)
AUDIT_DROPPED = Counter("iam_audit_dropped_total", "Audit events dropped from the store queue (audit_store: true) "
                        "while a store was unreachable; the audit log stream still has them", registry=REGISTRY)
LOGINS = Counter("iam_logins_total", "Sign-in attempts by result (success, failure, locked, mfa_failure)",
                 ["result"], registry=REGISTRY)
CONNECTOR_SIGN_INS = Counter("iam_connector_sign_ins_total", "Sign-ins through an upstream connector by result",
                             ["connector", "result"], registry=REGISTRY)
CONNECTOR_FAILURES = Counter("iam_connector_failures_total", "Failed connector sign-ins and re-checks by reason",
                             ["connector", "reason"], registry=REGISTRY)
UPSTREAM_DURATION = Histogram("iam_connector_upstream_duration_seconds", "Calls to an upstream provider",
                              ["connector", "operation"], buckets=_BUCKETS + (5.0, 10.0), registry=REGISTRY)
REFRESH_REUSE = Counter("iam_refresh_token_reuse_total", "Spent refresh tokens presented again, by outcome",
                        ["outcome"], registry=REGISTRY)
CLIENT_AUTH_FAILURES = Counter("iam_client_auth_failures_total", "Failed client authentications",
                               registry=REGISTRY)
MAIL_MESSAGES = Counter("iam_mail_messages_total", "Mail messages by template and result (sent, retried: an attempt "
                        "failed and another follows, failed: dropped after the last attempt, dropped: queue full)",
                        ["template", "result"], registry=REGISTRY)
BACKCHANNEL_LOGOUTS = Counter("iam_backchannel_logouts_total", "Logout tokens POSTed to clients by result "
                              "(delivered, retried: an attempt failed and another follows, failed: refused or "
                              "dropped after the last attempt, dropped: queue full)",
                              ["client_id", "result"], registry=REGISTRY)
SSO_SESSIONS = Gauge("iam_sso_sessions_active", "Live SSO sessions", registry=REGISTRY)
STORE_DURATION = Histogram("iam_store_query_duration_seconds", "Store statement latency", ["store"],
                           buckets=_BUCKETS, registry=REGISTRY)
POOL_IN_USE = Gauge("iam_store_pool_connections_in_use", "Store connections checked out", ["store"],
                    registry=REGISTRY)
POOL_SIZE = Gauge("iam_store_pool_size", "Store connection pool size", ["store"], registry=REGISTRY)
BUILD = Info("iam_build", "Build information", registry=REGISTRY)
BUILD.info({"version": __version__, "python": platform.python_version()})


def metrics_response():
    from fastapi import Response

    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def instrument_store(store) -> None:
    """Time every statement of a store (and trace it when tracing is on); export its pool's saturation."""
    from sqlalchemy import event

    engine = store.engine.sync_engine
    histogram = STORE_DURATION.labels(store.name)
    pool = engine.pool
    if hasattr(pool, "size"):
        POOL_SIZE.labels(store.name).set(pool.size())
    in_use = POOL_IN_USE.labels(store.name)
    event.listen(engine, "checkout", lambda *_: in_use.inc())
    event.listen(engine, "checkin", lambda *_: in_use.dec())

    def before(conn, cursor, statement, parameters, context, executemany):
        conn.info.setdefault("iam_started", []).append(time.perf_counter())
        span = store_span(store.name, engine.dialect.name, statement)
        if span is not None:
            conn.info.setdefault("iam_spans", []).append(span)

    def after(conn, cursor, statement, parameters, context, executemany):
        started = conn.info.get("iam_started")
        if started:
            histogram.observe(time.perf_counter() - started.pop())
        spans = conn.info.get("iam_spans")
        if spans:
            spans.pop().end()

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)


# -- traces ----------------------------------------------------------------------------------------------
_tracer = None


def store_span(store: str, system: str, statement: str):
    """A started span for one store statement (named by its verb), or None while tracing is off."""
    if _tracer is None:
        return None
    return _tracer.start_span("db " + statement.split(None, 1)[0].upper(),
                              attributes={"db.system": system, "iam.store": store})


@contextlib.contextmanager
def upstream_call(connector: str, operation: str) -> Iterator[None]:
    """Time a call to an upstream provider (and trace it when tracing is on): its latency per connector."""
    started = time.perf_counter()
    span = None
    if _tracer is not None:
        from opentelemetry import trace

        span = _tracer.start_as_current_span(f"connector {operation}", kind=trace.SpanKind.CLIENT,
                                             attributes={"iam.connector": connector})
        span.__enter__()
    try:
        yield
    finally:
        UPSTREAM_DURATION.labels(connector, operation).observe(time.perf_counter() - started)
        if span is not None:
            span.__exit__(*sys.exc_info())


def tracing_requested(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    exporter = env.get("OTEL_TRACES_EXPORTER", "")
    if exporter == "none" or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return bool(exporter or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup_tracing(service_name: str) -> None:
    """Turn tracing on when OTEL_* asks for it (OTLP over HTTP, or `console`); otherwise do nothing."""
    global _tracer
    if _tracer is not None or not tracing_requested():
        return
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": service_name,
                                                        "service.version": __version__}))
    exporter: SpanExporter
    if os.environ.get("OTEL_TRACES_EXPORTER") == "console":
        exporter = ConsoleSpanExporter(out=sys.stderr)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("iam")


def shutdown_tracing() -> None:
    if _tracer is not None:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider

        provider = trace.get_tracer_provider()
        if isinstance(provider, TracerProvider):  # the one setup_tracing installed
            provider.force_flush()


def inject_trace_context(headers: dict[str, str]) -> None:
    """Add `traceparent` to a call to another role, so one sign-in is one trace through the roles."""
    if _tracer is not None:
        from opentelemetry import propagate

        propagate.inject(headers)


def _trace_ids() -> dict:
    if _tracer is None:
        return {}
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


# -- the request middleware ------------------------------------------------------------------------------
class Observability:
    """Pure ASGI middleware: per request, one counter and one histogram sample (and a span when tracing), and the
    headers every response carries (`headers`, computed once: iam.pages.every_response)."""

    def __init__(self, app, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        self.app = app
        self.headers = list(headers)
        self._children: dict[tuple, tuple] = {}

    def _metrics(self, route: str, method: str, status: int):
        key = (route, method, status)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = (HTTP_REQUESTS.labels(route, method, str(status)),
                                           HTTP_DURATION.labels(route, method))
        return found

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *self.headers]
            await send(message)

        span = None
        if _tracer is not None:
            from opentelemetry import context as otel_context
            from opentelemetry import propagate, trace

            carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
            span = _tracer.start_span(f"{scope['method']} request", context=propagate.extract(carrier),
                                      kind=trace.SpanKind.SERVER)
            token = otel_context.attach(trace.set_span_in_context(span))
        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            counter, histogram = self._metrics(route, scope["method"], status)
            counter.inc()
            histogram.observe(time.perf_counter() - started)
            if span is not None:
                span.update_name(f"{scope['method']} {route}")
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                span.end()
                otel_context.detach(token)
