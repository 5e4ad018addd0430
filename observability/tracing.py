"""OpenTelemetry tracing: one trace per job, from the upload RPC through every Dramatiq stage.

Configured only by the standard OTEL_* variables. Tracing is on when an OTLP endpoint is
set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and not
switched off (``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``). When off, the
API's no-op tracer is used: nothing is recorded, exported or injected, and nothing fails.

Propagation (W3C trace context):
- gRPC: a SERVER span per RPC, child of the client's ``traceparent`` metadata if any. A
  CreateTranscription without one continues the trace of its media's upload, so one job
  is one trace from the upload to the last stage.
- Dramatiq: :class:`TracingMiddleware` starts a PRODUCER span on enqueue and puts its
  context in the message options (``trace_context``); the worker starts a CONSUMER span
  from it. A retry is enqueued from inside the failed attempt's CONSUMER span, so retries
  show as a chain with ``messaging.dramatiq.retries``.
- Jobs keep the context of the RPC that created them (``trace_context`` column) so work
  enqueued later by another stage or by the maintenance sweep stays in the job's trace.
"""
from __future__ import annotations

import atexit
import contextlib
import os
from typing import Any, Iterator, Mapping

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

log = structlog.get_logger(__name__)

TRACER_NAME = "mp4totext"
OPTION_KEY = "trace_context"  # Dramatiq message option holding the W3C carrier
_provider: Any = None


def enabled_by_env(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() in ("none", ""):
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def setup_tracing(service_name: str, **resource_attrs: Any) -> bool:
    """Install the SDK with an OTLP/gRPC exporter if the environment asks for it. Idempotent."""
    global _provider
    if _provider is not None:
        return True
    if not enabled_by_env():
        return False
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol and protocol != "grpc":
        log.warning("otel_protocol_unsupported", protocol=protocol, using="grpc")
    attrs = {"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name,
             **{k: v for k, v in resource_attrs.items() if v is not None}}
    provider = TracerProvider(resource=Resource.create(attrs))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider = provider
    atexit.register(shutdown)
    log.info("tracing_enabled", service=attrs["service.name"],
             endpoint=os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
                 "OTEL_EXPORTER_OTLP_ENDPOINT"))
    return True


def shutdown() -> None:
    """Flush and stop the exporter (at process exit; spans still queued are sent)."""
    global _provider
    if _provider is not None:
        provider, _provider = _provider, None
        try:
            provider.shutdown()
        except Exception:  # never fail a shutdown because the collector is gone
            pass


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


# ---------------------------------------------------------------- context carriers


def inject() -> dict[str, str] | None:
    """The current context as a W3C carrier, or None when there is no recording span."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


def extract(carrier: Mapping[str, str] | None) -> otel_context.Context | None:
    if not carrier:
        return None
    ctx = propagate.extract(dict(carrier))
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


@contextlib.contextmanager
def attached(carrier: Mapping[str, str] | None) -> Iterator[None]:
    """Make a stored context current (e.g. a job's creating RPC) for the block."""
    ctx = extract(carrier)
    if ctx is None:
        yield
        return
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


def set_attributes(**attrs: Any) -> None:
    """Set attributes on the current span (ignored when tracing is off)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({k: v for k, v in attrs.items() if v is not None})


@contextlib.contextmanager
def stage_span(name: str, **attrs: Any) -> Iterator[trace.Span]:
    """An INTERNAL span for one step of a stage (probe, extract audio, transcribe...)."""
    with tracer().start_as_current_span(name, attributes={k: v for k, v in attrs.items() if v is not None},
                                        record_exception=True, set_status_on_exception=True) as span:
        yield span


# ---------------------------------------------------------------- gRPC server spans

# Per the OTel semantic conventions, only these codes mark a SERVER span as an error.
SERVER_ERROR_CODES = {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
GRPC_CODE_NUMBERS = {"OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
                     "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
                     "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
                     "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16}


def start_server_span(method: str, metadata: Mapping[str, str], peer: str,
                      fallback_parent: Any = None) -> trace.Span:
    """Start (not activate) the SERVER span of an RPC. ``method`` is /pkg.Service/Method."""
    service, _, name = method.lstrip("/").partition("/")
    parent = extract({k: v for k, v in metadata.items() if k in ("traceparent", "tracestate")})
    if parent is None and fallback_parent is not None and _provider is not None:
        parent = extract(fallback_parent() if callable(fallback_parent) else fallback_parent)
    return tracer().start_span(
        f"{service}/{name}", context=parent, kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name, "network.peer.address": peer},
    )


def end_server_span(span: trace.Span, code: str) -> None:
    span.set_attribute("rpc.grpc.status_code", GRPC_CODE_NUMBERS.get(code, 2))
    if code in SERVER_ERROR_CODES:
        span.set_status(Status(StatusCode.ERROR, code))
    span.end()


@contextlib.contextmanager
def activated(span: trace.Span) -> Iterator[None]:
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield
    finally:
        otel_context.detach(token)
