"""gRPC server assembly: services, auth + logging interceptor, health, reflection, shutdown."""
from __future__ import annotations

import signal
import threading
import time
from concurrent import futures
from typing import Any, Callable

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mp4totext import runtime
from mp4totext.v1 import media_pb2, media_pb2_grpc, transcription_pb2, transcription_pb2_grpc
from observability import metrics, tracing
from server.auth import Authenticator
from server.services import ApiError, MediaService, TranscriptionService, current_tenant, trace_parent_for
from storage.db import database

log = structlog.get_logger(__name__)

SERVICE_NAMES = (
    media_pb2.DESCRIPTOR.services_by_name["MediaService"].full_name,
    transcription_pb2.DESCRIPTOR.services_by_name["TranscriptionService"].full_name,
)
PUBLIC_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


class ApiInterceptor(grpc.ServerInterceptor):
    """Authenticates, traces, measures and logs every API call; maps ApiError to status codes.

    One SERVER span per RPC (streams: for their whole life), one canonical log line per RPC
    with its code and duration, and the grpc_server_* metrics.
    """

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        kind = metrics.rpc_type(handler)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method, kind), handler.request_deserializer,
                handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, method, kind), handler.request_deserializer,
                handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method, kind), handler.request_deserializer,
                handler.response_serializer)
        return handler

    def _authenticate(self, context: grpc.ServicerContext) -> None:
        md = dict(context.invocation_metadata())
        try:
            tenant = self.auth.tenant_for(md.get("authorization"))
        except Exception as exc:
            log.warning("auth_backend_error", error=str(exc))
            context.abort(grpc.StatusCode.UNAVAILABLE, "authentication backend unavailable; retry shortly")
        if tenant is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or invalid API key: send metadata 'authorization: Bearer <key>' "
                          "(create keys with `mp4totext create-key`)")
        current_tenant.set(tenant)
        structlog.contextvars.bind_contextvars(tenant_id=tenant)
        tracing.set_attributes(**{"mp4t.tenant_id": tenant})

    @staticmethod
    def _begin(method: str, kind: str, context: grpc.ServicerContext, request: Any) -> tuple[Any, list[str]]:
        """Start the RPC's span and bind its log context (rebinding: handler threads are reused)."""
        service, _, name = method.lstrip("/").partition("/")
        labels = [service, name, kind]
        metrics.RPC_STARTED.labels(*labels).inc()
        metrics.RPC_IN_FLIGHT.labels(kind).inc()
        md = dict(context.invocation_metadata())
        span = tracing.start_server_span(method, md, context.peer(),
                                         fallback_parent=lambda: trace_parent_for(method, request))
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(rpc=method, peer=context.peer())
        ctx = span.get_span_context()
        if ctx.is_valid:
            structlog.contextvars.bind_contextvars(trace_id=format(ctx.trace_id, "032x"),
                                                   span_id=format(ctx.span_id, "016x"))
        return span, labels

    @staticmethod
    def _end(span: Any, labels: list[str], code: str, started: float, **fields: Any) -> None:
        elapsed = time.monotonic() - started
        metrics.RPC_IN_FLIGHT.labels(labels[2]).dec()
        metrics.RPC_HANDLED.labels(*labels, code).inc()
        metrics.RPC_LATENCY.labels(*labels).observe(elapsed)
        tracing.end_server_span(span, code)
        log.info("rpc", code=code, duration_ms=round(elapsed * 1000, 2), **fields)

    @staticmethod
    def _fail(context: grpc.ServicerContext, exc: BaseException) -> None:
        if isinstance(exc, ApiError):
            context.abort(exc.code, exc.message)
        log.exception("rpc_internal_error")
        context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); it has been logged")

    def _unary(self, behavior: Callable, method: str, kind: str) -> Callable:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.monotonic()
            code = "OK"
            span, labels = self._begin(method, kind, context, None if kind == "client_stream" else request)
            try:
                with tracing.activated(span):
                    try:
                        self._authenticate(context)
                        return behavior(request, context)
                    except ApiError as exc:
                        code = exc.code.name
                        self._fail(context, exc)
                    except Exception as exc:
                        code = _code_of(context, exc)
                        if code != "INTERNAL":
                            raise
                        self._fail(context, exc)
            finally:
                self._end(span, labels, code, started)

        return wrapper

    def _stream(self, behavior: Callable, method: str, kind: str) -> Callable:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.monotonic()
            code = "OK"
            sent = 0
            span, labels = self._begin(method, kind, context, request)
            try:
                # The span is current only while the handler computes a message, never across
                # a yield: the generator may be resumed or closed from another thread.
                with tracing.activated(span):
                    self._authenticate(context)
                    items = iter(behavior(request, context))
                while True:
                    with tracing.activated(span):
                        item = next(items, _END)
                    if item is _END:
                        break
                    sent += 1
                    yield item
            except ApiError as exc:
                code = exc.code.name
                self._fail(context, exc)
            except GeneratorExit:
                code = "CANCELLED"
                raise
            except Exception as exc:
                code = _code_of(context, exc)
                if code != "INTERNAL":
                    raise
                self._fail(context, exc)
            finally:
                self._end(span, labels, code, started, messages=sent)

        return wrapper


_END = object()


def _code_of(context: grpc.ServicerContext, exc: BaseException) -> str:
    """context.abort raises a bare Exception after setting the code: keep that code."""
    code = context.code() if hasattr(context, "code") else None
    return code.name if code is not None else "INTERNAL"


class HealthMonitor:
    """Reflects whether DB, broker and storage are usable in grpc.health.v1, every few seconds."""

    def __init__(self, servicer: health.HealthServicer, interval_s: float = 5.0) -> None:
        self.servicer = servicer
        self.interval_s = interval_s
        self.stopping = threading.Event()
        self.problems: list[str] = []

    def check(self) -> list[str]:
        rt = runtime.get()
        problems = []
        try:
            with database.connection_context():
                database.execute_sql("SELECT 1")
        except Exception as exc:
            problems.append(f"database: {exc}")
        try:
            rt.store.ping()
        except Exception as exc:
            problems.append(f"storage: {exc}")
        connected = getattr(rt.bus, "connected", None)
        if connected is not None and not connected.wait(timeout=2.0):
            problems.append("broker: not connected to RabbitMQ")
        return problems

    def update(self) -> None:
        if self.stopping.is_set():
            return
        self.problems = self.check()
        status = health_pb2.HealthCheckResponse.NOT_SERVING if self.problems else health_pb2.HealthCheckResponse.SERVING
        for name in ("", *SERVICE_NAMES):
            self.servicer.set(name, status)
        if self.problems:
            log.warning("health_not_serving", problems=self.problems)

    def run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            try:
                self.update()
            except Exception as exc:  # never let the monitor die
                log.warning("health_check_error", error=str(exc))

    def shutdown(self) -> None:
        self.stopping.set()
        self.servicer.enter_graceful_shutdown()


def release_large_buffers() -> None:
    """Make glibc return big freed buffers (upload parts) to the OS at once.

    glibc raises its mmap threshold after large frees, so later multi-MiB buffers come
    from per-thread heaps that fragment and never shrink: RSS then grows with the number
    of bytes uploaded, not with the buffers in flight. A fixed threshold keeps every
    buffer over 256 KiB in its own mapping. No-op where glibc's mallopt is missing.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 256 * 1024)
    except (OSError, AttributeError):
        pass


class Server:
    def __init__(self, settings: Any | None = None) -> None:
        release_large_buffers()
        rt = runtime.get()
        self.settings = settings or rt.settings
        s = self.settings
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=s.grpc_max_workers, thread_name_prefix="rpc"),
            interceptors=[ApiInterceptor(Authenticator())],
            maximum_concurrent_rpcs=s.grpc_max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", 2 * 1024 * 1024),
                # BDP probing grows the HTTP/2 receive window until gRPC buffers tens of MiB
                # of an upload ahead of the handler; the default window keeps memory flat
                # at the same loopback throughput (bench/bench.py).
                ("grpc.http2.bdp_probe", 0),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.keepalive_time_ms", 30000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10000),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        media_pb2_grpc.add_MediaServiceServicer_to_server(MediaService(), self.grpc_server)
        transcription_pb2_grpc.add_TranscriptionServiceServicer_to_server(TranscriptionService(), self.grpc_server)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server)
        self.port = self.grpc_server.add_insecure_port(s.grpc_listen)
        if self.port == 0:
            raise SystemExit(f"cannot listen on {s.grpc_listen} (address in use?); set MP4T_GRPC_LISTEN")
        self.monitor = HealthMonitor(self.health)
        self._stopped = threading.Event()
        self.http: metrics.HttpEndpoint | None = None
        self.agent: metrics.AgentCheck | None = None

    # -- what HAProxy sees
    def liveness(self) -> tuple[int, str]:
        """/healthz, HAProxy's up/down check: 503 only when a dependency is broken.

        While draining it stays 200: HAProxy's agent check has already set the server to
        DRAIN, and marking it DOWN would cut in-flight uploads (on-marked-down shutdown-sessions).
        """
        if self._stopped.is_set():
            return 200, "DRAINING"
        if self.monitor.problems:
            return 503, "NOT_SERVING: " + "; ".join(self.monitor.problems)
        return 200, "SERVING"

    def readiness(self) -> tuple[int, str]:
        """/readyz: exactly the grpc.health.v1 status of the whole server."""
        if self._stopped.is_set():
            return 503, "NOT_SERVING: draining"
        return self.liveness()

    def agent_state(self) -> str:
        if self._stopped.is_set():
            return "drain"
        return "down" if self.monitor.problems else "up ready"

    def start(self) -> "Server":
        runtime.get().bus.start()
        self.monitor.update()
        threading.Thread(target=self.monitor.run, name="health", daemon=True).start()
        if self.settings.http_listen:
            metrics.install_collector("jobs", metrics.JobStateCollector())
            self.http = metrics.HttpEndpoint(self.settings.http_listen, health=self.liveness, ready=self.readiness)
        if self.settings.agent_listen:
            self.agent = metrics.AgentCheck(self.settings.agent_listen, self.agent_state)
        self.grpc_server.start()
        log.info("server_started", listen=self.settings.grpc_listen, port=self.port,
                 http_port=self.http.port if self.http else None, agent_port=self.agent.port if self.agent else None,
                 health_problems=self.monitor.problems)
        return self

    def stop(self) -> None:
        """Graceful: drain first (agent says "drain", health NOT_SERVING), then stop with a grace period.

        MP4T_GRPC_DRAIN_S must exceed the proxy's agent/check interval so no new RPC arrives
        once we stop accepting; MP4T_GRPC_GRACE_S bounds how long in-flight RPCs may finish.
        """
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("server_draining", drain_s=self.settings.grpc_drain_s, grace_s=self.settings.grpc_grace_s)
        self.monitor.shutdown()
        if self.settings.grpc_drain_s:
            time.sleep(self.settings.grpc_drain_s)
        self.grpc_server.stop(self.settings.grpc_grace_s).wait()
        runtime.get().bus.close()
        if self.agent:
            self.agent.close()
        if self.http:
            self.http.close()
        log.info("server_stopped")
        tracing.shutdown()

    def wait(self) -> None:
        self.grpc_server.wait_for_termination()


def install_signal_handlers(stop: Callable[[], None]) -> None:
    def handler(signum: int, _frame: Any) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        threading.Thread(target=stop, name="shutdown").start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
