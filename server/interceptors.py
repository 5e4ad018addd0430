"""Server interceptors (grpc.aio): observability (outermost) and authentication.

The server is a grpc.aio server: Watch is a coroutine (thousands per replica, no thread each),
every other handler is a plain function run on the handler threads. Both interceptors wrap a
handler's behavior in kind: a plain function stays plain, an async generator stays async.

``ObservabilityInterceptor`` gives every API call one SERVER span (streams: for their whole
life), the grpc_server_* metrics and one canonical ``rpc`` log line with its status code. The
code is captured as OpenTelemetry's grpc instrumentation does it: the handler gets a wrapped
context that records ``abort``/``set_code``. It also turns ``ApiError`` into its status and
any other exception into INTERNAL (logged with its traceback). A call that ended while it
waited for a handler thread is logged (CANCELLED, ``queued_ms``) though it never runs; one
that gets a thread after its deadline is answered DEADLINE_EXCEEDED without running.

``AuthInterceptor`` resolves the API key or end-user token to a tenant (``current_tenant``) and
user (``current_user``, "" for the API key) or answers UNAUTHENTICATED; scopes: server/scopes.py.
"""
from __future__ import annotations

import asyncio
import inspect
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterator

import grpc
import structlog
from grpc import aio

from core.identity import Identity, TokenError
from mp4totext.contracts import TERMINAL_STATES
from mp4totext.v1 import transcription_pb2 as tpb
from observability import metrics, tracing
from server.auth import Authenticator, current_tenant, current_user
from server.errors import ApiError, unavailable
from server.load import HandlerLoad
from server.requests import check_request, checked_stream, safe_deserializer
from server.scopes import scope_for
from server.status_map import status_for
from server.watch import in_thread
from storage.db import call_scope

log = structlog.get_logger(__name__)

PUBLIC_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
_TERMINAL = {tpb.TranscriptionState.Value(f"TRANSCRIPTION_STATE_{s}") for s in TERMINAL_STATES}
# Server streams whose last message ends the call: the client may close the call as soon as
# it has that message, which is a normal end (OK), not a cancellation.
FINAL_MESSAGE: dict[str, Callable[[Any], bool]] = {
    "/mp4totext.v1.TranscriptionService/WatchTranscription": lambda m: m.state in _TERMINAL and not m.heartbeat,
}
Wrapper = Callable[[Callable], Callable]


class RecordingContext:
    """A ServicerContext that remembers the status code the handler set or aborted with."""

    def __init__(self, context: Any, done: threading.Event | None = None) -> None:
        self._context = context
        self.recorded_code: grpc.StatusCode | None = None
        self._done = done or threading.Event()
        self._ended_by_server: Exception | None = None
        self._ending, self._ended = threading.Event(), threading.Event()

    def _raise_if_ended(self) -> None:
        """After end_call the handler must re-raise grpc.aio's own abort error, not abort again."""
        if self._ending.is_set():
            self._ended.wait(10)
            if self._ended_by_server is not None:
                raise self._ended_by_server

    def end_call(self, code: grpc.StatusCode, details: str) -> None:
        """End the call from another thread with ``code``: the handler's pending reads end, and
        what it answers afterwards is dropped."""
        self.recorded_code = code
        self._ending.set()
        try:
            self._context.abort(code, details)
        except aio.AbortError as exc:  # raised once the status is sent; the handler re-raises it
            self._ended_by_server = exc
        finally:
            self._ended.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def is_active(self) -> bool:
        """False once the call has ended (the client cancelled or its deadline ran out)."""
        return not self._done.is_set()

    def ended_within(self, seconds: float) -> bool:
        """Whether the call ends (is cancelled) within ``seconds``: for a handler that has just
        seen the end of a client stream, which grpc.aio also reports when the client cancels
        (its receive path merges the two); the cancellation follows within about a millisecond."""
        return self._done.wait(seconds)

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._raise_if_ended()
        self.recorded_code = code
        self._context.abort(code, details)

    def abort_with_status(self, status: Any) -> None:
        self._raise_if_ended()
        self.recorded_code = status.code
        self._context.set_trailing_metadata(status.trailing_metadata)
        self._context.abort(status.code, status.details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.recorded_code = code
        self._context.set_code(code)


def _wrap(handler: Any, plain: Wrapper, stream: Wrapper, async_stream: Wrapper) -> Any:
    """``handler`` with its behavior wrapped: unary and client streams by ``plain``, server
    streams by ``stream`` (a plain generator) or ``async_stream`` (an async generator)."""
    decode = safe_deserializer(handler.request_deserializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(plain(handler.unary_unary), decode, handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(plain(handler.stream_unary), decode, handler.response_serializer)
    if handler.unary_stream:
        behavior = handler.unary_stream
        wrap = async_stream if inspect.isasyncgenfunction(behavior) else stream
        return grpc.unary_stream_rpc_method_handler(wrap(behavior), decode, handler.response_serializer)
    if handler.stream_stream:  # live captions: a plain generator over the request stream
        return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), decode, handler.response_serializer)
    return handler


def _check_kind(behavior: Callable) -> None:
    if inspect.iscoroutinefunction(behavior):
        raise TypeError(f"{behavior.__qualname__}: async unary handlers are not supported by the interceptors")


class AuthInterceptor(aio.ServerInterceptor):
    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler

        def plain(behavior: Callable) -> Callable:
            _check_kind(behavior)

            def wrapper(request: Any, context: Any) -> Any:
                _bind(self.caller(context.invocation_metadata(), method))
                return behavior(request, context)

            return wrapper

        def async_stream(behavior: Callable) -> Callable:
            async def wrapper(request: Any, context: Any) -> AsyncIterator[Any]:
                _bind(await in_thread(self.caller, context.invocation_metadata(), method))
                async for item in behavior(request, context):
                    yield item

            return wrapper

        return _wrap(handler, plain, plain, async_stream)

    def caller(self, metadata: Any, method: str = "") -> Identity:
        """The caller (blocking: may read the key tables), or an UNAUTHENTICATED ApiError
        (PERMISSION_DENIED for a user token whose scopes do not cover ``method``)."""
        md = dict(metadata or ())
        try:
            caller = self.auth.identify(md.get("authorization"))
        except TokenError as exc:
            raise ApiError(grpc.StatusCode.UNAUTHENTICATED, f"invalid end-user token: {exc}") from None
        except Exception as exc:
            log.warning("auth_backend_error", error=str(exc))
            raise unavailable("authentication backend unavailable; retry shortly") from exc
        if caller is None:
            raise ApiError(grpc.StatusCode.UNAUTHENTICATED,
                           "missing or invalid API key: send metadata 'authorization: Bearer <key>' "
                           "(create keys with `mp4totext create-key`, or an end-user token from "
                           "IdentityService.CreateUserToken)")
        needed = scope_for(method)
        if needed is None:  # default-deny: an RPC missing from server/scopes.py is a server bug, not a door
            raise ApiError(grpc.StatusCode.PERMISSION_DENIED, f"{method} has no scope on this server; refused")
        if caller.user and needed not in caller.scopes:
            raise ApiError(grpc.StatusCode.PERMISSION_DENIED,
                           f"this end-user token lacks the {needed!r} scope this call needs; mint one with it")
        return caller


def _bind(caller: Identity) -> None:
    current_tenant.set(caller.tenant)
    current_user.set(caller.user)
    structlog.contextvars.bind_contextvars(tenant_id=caller.tenant)
    attributes = {"mp4t.tenant_id": caller.tenant}
    if caller.user:
        structlog.contextvars.bind_contextvars(user_id=caller.user)
        attributes["mp4t.user_id"] = caller.user
    tracing.set_attributes(**attributes)


class _Call:
    """One RPC as observed: span, metric labels, start time, recorded status."""

    def __init__(self, method: str, kind: str, context: Any, parent: Callable[[], Any],
                 pending: "_Pending | None" = None) -> None:
        service, _, name = method.lstrip("/").partition("/")
        self.labels = [service, name, kind]
        self.started = time.monotonic()
        self.context = RecordingContext(context, pending.done if pending else None)
        self.span = tracing.start_server_span(method, dict(context.invocation_metadata() or ()), context.peer(),
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

    def status_of(self, exc: BaseException) -> ApiError | None:
        """The status ``exc`` stands for; None when the handler has already aborted."""
        if isinstance(exc, ApiError):
            return exc
        if self.context.recorded_code is not None:  # context.abort raised after setting the code
            return None
        return status_for(exc)

    def fail(self, exc: BaseException) -> None:
        """Abort with the status ``exc`` stands for (raises). Handler threads only."""
        err = self.status_of(exc)
        if err is None:
            raise exc
        if err.rich:
            self.context.abort_with_status(err.status())
        self.context.abort(err.code, err.message)

    async def fail_async(self, exc: BaseException) -> None:
        """``fail`` for coroutine handlers (the aio context's abort is a coroutine)."""
        err = self.status_of(exc)
        if err is None:
            raise exc
        self.context.recorded_code = err.code
        trailing = err.status().trailing_metadata if err.rich else ()
        await self.context._context.abort(err.code, err.message, trailing)  # noqa: SLF001

    def end(self, code: str | None = None, **fields: Any) -> None:
        recorded = self.context.recorded_code
        code = code or (recorded.name if recorded is not None else "OK")
        elapsed = time.monotonic() - self.started
        metrics.RPC_IN_FLIGHT.labels(self.labels[2]).dec()
        metrics.RPC_HANDLED.labels(*self.labels, code).inc()
        metrics.RPC_LATENCY.labels(*self.labels).observe(elapsed)
        tracing.end_server_span(self.span, code)
        log.info("rpc", code=code, duration_ms=round(elapsed * 1000, 2), **fields)


class ObservabilityInterceptor(aio.ServerInterceptor):
    """Span, metrics, status mapping and the canonical log line of every API call.

    ``trace_parent(method, request, metadata)`` gives a stored trace to continue when the client
    sent none (a CreateTranscription continues its own media's upload trace). ``load`` counts the
    handler threads in use and the time calls waited for one.
    """

    def __init__(self, trace_parent: Callable[[str, Any, Any], Any], load: HandlerLoad) -> None:
        self.trace_parent = trace_parent
        self.load = load

    async def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        kind = metrics.rpc_type(handler)
        pending = _Pending(method, kind)
        # The call's task ends as soon as the client cancels, even while a handler thread still
        # runs the call (a thread cannot be cancelled): that is how the thread learns of it.
        asyncio.current_task().add_done_callback(pending.task_done)
        return _wrap(handler, lambda b: self._plain(b, method, kind, pending),
                     lambda b: self._stream(b, method, kind, pending),
                     lambda b: self._async_stream(b, method, kind, pending))

    def _parent(self, method: str, request: Any, context: Any) -> Callable[[], Any]:
        return lambda: self.trace_parent(method, request, context.invocation_metadata())

    def _started(self, arrived: float, call: _Call) -> bool:
        """Record the wait for a thread; False (answered DEADLINE_EXCEEDED) if the deadline ran out in it."""
        waited = call.started - arrived
        self.load.waited(waited)
        remaining = call.context.time_remaining()
        if remaining is None or remaining > 0:
            return True
        call.context.recorded_code = grpc.StatusCode.DEADLINE_EXCEEDED
        call.end(queued_ms=round(waited * 1000, 2), error="the deadline ran out while the call waited for a "
                                                             "handler thread (replica saturated)")
        return False

    def _plain(self, behavior: Callable, method: str, kind: str, pending: "_Pending") -> Callable:
        def wrapper(request: Any, context: Any) -> Any:
            traced = None if kind == "client_stream" else request
            if not pending.start():  # its end is logged already
                context.abort(grpc.StatusCode.CANCELLED, "the call ended while it waited for a handler thread")
            arrived = pending.arrived
            with self.load.held():
                call = _Call(method, kind, context, self._parent(method, traced, context), pending)
                if not self._started(arrived, call):
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while queued")
                try:
                    with tracing.activated(call.span):
                        try:
                            if kind == "client_stream":  # an upload: no connection held while bytes arrive
                                return behavior(checked_stream(request), call.context)
                            # One pooled connection for the whole call, taken when first needed
                            # (storage.db.call_scope): auth, lookups and conversion share it.
                            with call_scope():
                                return behavior(check_request(request), call.context)
                        except Exception as exc:
                            call.fail(exc)
                finally:
                    call.end(queued_ms=round((call.started - arrived) * 1000, 2))

        return wrapper

    def _stream(self, behavior: Callable, method: str, kind: str, pending: "_Pending") -> Callable:
        """A plain server stream (Export) or bidi stream (StreamLive): each message is computed on a
        handler thread."""
        final = FINAL_MESSAGE.get(method, lambda _m: False)

        def wrapper(request: Any, context: Any) -> Iterator[Any]:
            if not pending.start():
                return
            bidi = kind == "bidi_stream"
            call = _Call(method, kind, context, self._parent(method, None if bidi else request, context), pending)
            if not self._started(pending.arrived, call):
                return
            sent, ended, closed = 0, False, False
            items: Any = iter(())
            try:
                # The span is current only while the handler computes a message, never across
                # a yield: the generator may be resumed or closed from another thread.
                with tracing.activated(call.span):
                    items = iter(behavior(checked_stream(request) if bidi else check_request(request), call.context))
                while not ended:
                    with tracing.activated(call.span), self.load.held():
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

    def _async_stream(self, behavior: Callable, method: str, kind: str, pending: "_Pending") -> Callable:
        """A coroutine server stream (Watch): runs on the event loop, holds no thread."""
        final = FINAL_MESSAGE.get(method, lambda _m: False)

        async def wrapper(request: Any, context: Any) -> AsyncIterator[Any]:
            pending.start()
            call = _Call(method, kind, context, self._parent(method, request, context))
            sent, ended, closed = 0, False, False
            items = behavior(request, call.context)
            try:
                check_request(request)
                while not ended:
                    with tracing.activated(call.span):
                        try:
                            item = await anext(items)
                        except StopAsyncIteration:
                            break
                    sent += 1
                    ended = final(item)
                    yield item
            except (GeneratorExit, asyncio.CancelledError):
                closed = not ended  # the client went away before the end: a cancellation
                raise
            except Exception as exc:
                with tracing.activated(call.span):
                    await call.fail_async(exc)
            finally:
                await items.aclose()  # unsubscribe now, also after the final message
                call.end("CANCELLED" if closed else None, messages=sent)

        return wrapper


class _Pending:
    """A call from its arrival until a handler thread takes it.

    A call whose deadline runs out (or whose client cancels) while it waits for a thread never
    runs: grpc.aio drops it from the queue. Half a second after its task ended without the
    handler starting, ``_expire`` writes its ``rpc`` line and metrics, so a saturated
    replica's lost calls are visible; a handler that starts after that only aborts. The
    server cannot tell a client's deadline from its cancel here (grpc.aio exposes neither to
    an interceptor before the handler runs): both show as CANCELLED with ``queued_ms``.
    """

    GRACE_S = 0.5

    def __init__(self, method: str, kind: str) -> None:
        self.method, self.kind = method, kind
        self.arrived = time.monotonic()
        self.started = self.expired = False
        self.done = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> bool:
        """Called by the handler thread first: False when the call was already given up."""
        with self._lock:
            self.started = True
            return not self.expired

    def task_done(self, task: asyncio.Task[Any]) -> None:
        self.done.set()
        if not self.started:
            task.get_loop().call_later(self.GRACE_S, self._expire)

    def _expire(self) -> None:
        with self._lock:
            if self.started:
                return
            self.expired = True
        service, _, name = self.method.lstrip("/").partition("/")
        waited = time.monotonic() - self.arrived - self.GRACE_S
        metrics.RPC_STARTED.labels(service, name, self.kind).inc()
        metrics.RPC_HANDLED.labels(service, name, self.kind, "CANCELLED").inc()
        metrics.RPC_LATENCY.labels(service, name, self.kind).observe(waited)
        log.warning("rpc", rpc=self.method, code="CANCELLED", queued_ms=round(waited * 1000, 2),
                    duration_ms=round(waited * 1000, 2),
                    error="the call ended (client deadline or cancel) while it waited for a handler thread: "
                          "the replica is saturated")


_END = object()
