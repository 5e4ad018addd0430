"""Server interceptors: observability (outermost) and authentication.

``ObservabilityInterceptor`` gives every API call one SERVER span (streams: for their whole
life), the grpc_server_* metrics and one canonical ``rpc`` log line with its status code. The
code is captured as OpenTelemetry's grpc instrumentation does it: the handler gets a wrapped
context that records ``abort``/``set_code``. It also turns ``ApiError`` into its status and
any other exception into INTERNAL (logged with its traceback).

``AuthInterceptor`` resolves the API key to a tenant (``current_tenant``) or aborts with
UNAUTHENTICATED. Health and reflection are public.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import grpc
import structlog

from core.failures import is_infrastructure
from mp4totext.contracts import TERMINAL_STATES
from mp4totext.v1 import transcription_pb2 as tpb
from observability import metrics, tracing
from server.auth import Authenticator, current_tenant
from server.errors import ApiError, unavailable

log = structlog.get_logger(__name__)

PUBLIC_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
_TERMINAL = {tpb.TranscriptionState.Value(f"TRANSCRIPTION_STATE_{s}") for s in TERMINAL_STATES}
# Server streams whose last message ends the call: the client may close the call as soon as
# it has that message, which is a normal end (OK), not a cancellation.
FINAL_MESSAGE: dict[str, Callable[[Any], bool]] = {
    "/mp4totext.v1.TranscriptionService/WatchTranscription": lambda m: m.state in _TERMINAL and not m.heartbeat,
}


class RecordingContext:
    """A ServicerContext that remembers the status code the handler set or aborted with."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context
        self.recorded_code: grpc.StatusCode | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.recorded_code = code
        self._context.abort(code, details)

    def abort_with_status(self, status: Any) -> None:
        self.recorded_code = status.code
        self._context.abort_with_status(status)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.recorded_code = code
        self._context.set_code(code)


def _wrap(handler: Any, unary: Callable[[Callable], Callable], stream: Callable[[Callable], Callable]) -> Any:
    """``handler`` with its behavior wrapped (unary/client-stream by ``unary``, server streams by ``stream``)."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), handler.request_deserializer,
                                                   handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), handler.request_deserializer,
                                                    handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), handler.request_deserializer,
                                                    handler.response_serializer)
    return handler


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(PUBLIC_PREFIXES):
            return handler

        def unary(behavior: Callable) -> Callable:
            def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
                self._authenticate(context)
                return behavior(request, context)

            return wrapper

        def stream(behavior: Callable) -> Callable:
            def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                self._authenticate(context)
                yield from behavior(request, context)

            return wrapper

        return _wrap(handler, unary, stream)

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


class _Call:
    """One RPC as observed: span, metric labels, start time, recorded status."""

    def __init__(self, method: str, kind: str, context: grpc.ServicerContext, parent: Callable[[], Any]) -> None:
        service, _, name = method.lstrip("/").partition("/")
        self.labels = [service, name, kind]
        self.started = time.monotonic()
        self.context = RecordingContext(context)
        self.span = tracing.start_server_span(method, dict(context.invocation_metadata()), context.peer(),
                                              fallback_parent=parent)
        metrics.RPC_STARTED.labels(*self.labels).inc()
        metrics.RPC_IN_FLIGHT.labels(kind).inc()
        # Rebind: handler threads are reused.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(rpc=method, peer=context.peer())
        ctx = self.span.get_span_context()
        if ctx.is_valid:
            structlog.contextvars.bind_contextvars(trace_id=format(ctx.trace_id, "032x"),
                                                   span_id=format(ctx.span_id, "016x"))

    def fail(self, exc: BaseException) -> None:
        """Abort with the status ``exc`` stands for (raises), unless the handler already set one."""
        if isinstance(exc, ApiError) and exc.retry_after_s is not None:
            self.context.abort_with_status(exc.status())
        if isinstance(exc, ApiError):
            self.context.abort(exc.code, exc.message)
        if self.context.recorded_code is not None:  # context.abort raised after setting the code
            raise exc
        if is_infrastructure(exc):  # a dependency failed, not the request: the client retries
            log.warning("rpc_dependency_unavailable", error=f"{type(exc).__name__}: {exc}")
            self.fail(unavailable(f"a service this call needs is unreachable ({type(exc).__name__}); retry shortly"))
        log.exception("rpc_internal_error")
        self.context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); it has been logged")

    def end(self, code: str | None = None, **fields: Any) -> None:
        recorded = self.context.recorded_code
        code = code or (recorded.name if recorded is not None else "OK")
        elapsed = time.monotonic() - self.started
        metrics.RPC_IN_FLIGHT.labels(self.labels[2]).dec()
        metrics.RPC_HANDLED.labels(*self.labels, code).inc()
        metrics.RPC_LATENCY.labels(*self.labels).observe(elapsed)
        tracing.end_server_span(self.span, code)
        log.info("rpc", code=code, duration_ms=round(elapsed * 1000, 2), **fields)


class ObservabilityInterceptor(grpc.ServerInterceptor):
    """Span, metrics, status mapping and the canonical log line of every API call.

    ``trace_parent(method, request)`` gives a stored trace to continue when the client sent
    none (a CreateTranscription continues its media's upload trace).
    """

    def __init__(self, trace_parent: Callable[[str, Any], Any]) -> None:
        self.trace_parent = trace_parent

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        kind = metrics.rpc_type(handler)
        return _wrap(handler, lambda b: self._unary(b, method, kind), lambda b: self._stream(b, method, kind))

    def _unary(self, behavior: Callable, method: str, kind: str) -> Callable:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            traced = None if kind == "client_stream" else request
            call = _Call(method, kind, context, lambda: self.trace_parent(method, traced))
            try:
                with tracing.activated(call.span):
                    try:
                        return behavior(request, call.context)
                    except Exception as exc:
                        call.fail(exc)
            finally:
                call.end()

        return wrapper

    def _stream(self, behavior: Callable, method: str, kind: str) -> Callable:
        final = FINAL_MESSAGE.get(method, lambda _m: False)

        def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = _Call(method, kind, context, lambda: self.trace_parent(method, request))
            sent, ended, closed = 0, False, False
            items: Any = iter(())
            try:
                # The span is current only while the handler computes a message, never across
                # a yield: the generator may be resumed or closed from another thread.
                with tracing.activated(call.span):
                    items = iter(behavior(request, call.context))
                while not ended:
                    with tracing.activated(call.span):
                        item = next(items, _END)
                    if item is _END:
                        break
                    sent += 1
                    ended = final(item)
                    yield item
            except GeneratorExit:
                closed = not ended  # closed by the client before the end: a cancellation
                raise
            except Exception as exc:
                with tracing.activated(call.span):
                    call.fail(exc)
            finally:
                if ended:
                    items.close()  # the final message is out: release the handler's resources now
                call.end("CANCELLED" if closed else None, messages=sent)

        return wrapper


_END = object()
