"""gRPC server assembly: services, interceptors, health, reflection, HTTP endpoints, graceful shutdown."""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import signal
import threading
import time
from concurrent import futures
from typing import Any, Callable, Coroutine, TypeVar

import structlog
from grpc import aio
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from core import jobs, outbox, runtime
from mp4totext.v1 import (
    identity_pb2_grpc,
    live_pb2_grpc,
    media_pb2_grpc,
    transcription_pb2_grpc,
    usage_pb2_grpc,
    webhooks_pb2_grpc,
)
from observability import metrics, tracing
from server.auth import Authenticator
from server.health import SERVICE_NAMES, HealthMonitor
from server.identity_service import IdentityService
from server.interceptors import AuthInterceptor, ObservabilityInterceptor
from server.live_service import DecoderFactory, LiveService
from server.load import HandlerLoad
from server.media_service import MediaService
from server.resources import trace_parent_for
from server.transcription_service import TranscriptionService
from server.usage_service import UsageService
from server.webhook_service import WebhookService

log = structlog.get_logger(__name__)
T = TypeVar("T")


def release_large_buffers() -> None:
    """Make glibc return big freed buffers (upload parts) to the OS at once.

    glibc raises its mmap threshold after large frees, so later multi-MiB buffers come
    from per-thread heaps that fragment and never shrink: RSS then grows with the number
    of bytes uploaded, not with the buffers in flight. A fixed threshold keeps every
    buffer over 256 KiB in its own mapping. No-op where glibc's mallopt is missing.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 256 * 1024)
    except (OSError, AttributeError):
        pass


class Server:
    """The API process: a grpc.aio server on its own event-loop thread.

    Watch streams are coroutines on that loop (thousands per replica); every other handler is
    a plain function run on ``grpc_max_workers`` handler threads, whose load /healthz and the
    HAProxy agent report. ``start``/``stop``/``wait`` are called from ordinary threads.
    """

    def __init__(self, settings: Any | None = None, live_decoders: DecoderFactory | None = None) -> None:
        release_large_buffers()
        rt = runtime.get()
        self.settings = settings or rt.settings
        self.live_decoders = live_decoders  # from the composition root (launch): live captions decode here
        self.load = HandlerLoad(self.settings.grpc_max_workers)
        self.auth = Authenticator()
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name="grpc-loop", daemon=True)
        self._loop_thread.start()
        self.grpc_server, self.health, self.port = self._on_loop(self._build())
        if self.port == 0:
            raise SystemExit(f"cannot listen on {self.settings.grpc_listen} (address in use?); set MP4T_GRPC_LISTEN")
        self.monitor = HealthMonitor(self._set_health)
        self._stopped = threading.Event()
        self._terminated = threading.Event()
        self.http: metrics.HttpEndpoint | None = None
        self.relay: outbox.Relay | None = None
        self.agent: metrics.AgentCheck | None = None

    async def _build(self) -> tuple[aio.Server, Any, int]:
        s = self.settings
        server = aio.server(
            migration_thread_pool=futures.ThreadPoolExecutor(max_workers=s.grpc_max_workers, thread_name_prefix="rpc"),
            interceptors=[ObservabilityInterceptor(self._trace_parent, self.load), AuthInterceptor(self.auth)],
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
                # A burst of new calls (thousands of watchers reconnecting after a deploy) waits in
                # grpc-core until the event loop takes it; past the default 1,000 waiting calls core
                # cancels the rest (the clients see CANCELLED).
                ("grpc.server.max_pending_requests", s.grpc_max_concurrent_rpcs),
                ("grpc.server.max_pending_requests_hard_limit", 2 * s.grpc_max_concurrent_rpcs),
            ],
        )
        media_pb2_grpc.add_MediaServiceServicer_to_server(MediaService(), server)
        transcription_pb2_grpc.add_TranscriptionServiceServicer_to_server(TranscriptionService(), server)
        webhooks_pb2_grpc.add_WebhookServiceServicer_to_server(WebhookService(), server)
        identity_pb2_grpc.add_IdentityServiceServicer_to_server(IdentityService(), server)
        usage_pb2_grpc.add_UsageServiceServicer_to_server(UsageService(), server)
        live_pb2_grpc.add_LiveServiceServicer_to_server(LiveService(s, self.live_decoders), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        return server, health_servicer, server.add_insecure_port(s.grpc_listen)

    def _trace_parent(self, method: str, request: Any, metadata: Any) -> dict[str, str] | None:
        key = dict(metadata or ()).get("authorization")
        return trace_parent_for(method, request, lambda: self.auth.owner_for(key))

    def _on_loop(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _set_health(self, service: str, status: int) -> None:
        self._on_loop(self.health.set(service, status), timeout=10)

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
        # Saturated or degraded, the replica still answers: cutting its calls (503 -> DOWN ->
        # shutdown-sessions) would only move the load; the agent weight steers new calls away.
        busy = self.load.saturation()
        if busy:
            return 200, "SATURATED: " + busy
        if self.monitor.degraded:  # reads keep working: keep receiving traffic
            return 200, "DEGRADED: " + "; ".join(self.monitor.degraded)
        return 200, "SERVING"

    def readiness(self) -> tuple[int, str]:
        """/readyz: exactly the grpc.health.v1 status of the whole server."""
        if self._stopped.is_set():
            return 503, "NOT_SERVING: draining"
        return self.liveness()

    def agent_state(self) -> str:
        if self._stopped.is_set():
            return "drain"
        if self.monitor.problems:
            return "down"
        # Weight in percent of the configured one: a saturated replica gets new calls only
        # when every other one is saturated too (leastconn divides by the weight).
        return "up ready 1%" if self.load.saturation() else "up ready 100%"

    def start(self) -> "Server":
        runtime.get().bus.start()
        self.relay = outbox.Relay(self.settings.outbox_interval_s)
        self.monitor.update()
        threading.Thread(target=self.monitor.run, name="health", daemon=True).start()
        if self.settings.http_listen:
            metrics.install_collector("jobs", metrics.JobStateCollector(jobs.count_by_state))
            self.http = metrics.HttpEndpoint(self.settings.http_listen, health=self.liveness, ready=self.readiness)
        if self.settings.agent_listen:
            self.agent = metrics.AgentCheck(self.settings.agent_listen, self.agent_state)
        self._on_loop(self.grpc_server.start())
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
        self._on_loop(self.health.enter_graceful_shutdown())
        if self.settings.grpc_drain_s:
            time.sleep(self.settings.grpc_drain_s)
        self._on_loop(self.grpc_server.stop(self.settings.grpc_grace_s))
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self.relay:
            self.relay.close()
        runtime.get().bus.close()
        if self.agent:
            self.agent.close()
        if self.http:
            self.http.close()
        log.info("server_stopped")
        tracing.shutdown()
        self._terminated.set()

    def wait(self) -> None:
        while not self._terminated.wait(1.0):  # wakes for signal handlers
            pass


def install_signal_handlers(stop: Callable[[], None]) -> None:
    def handler(signum: int, _frame: Any) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        threading.Thread(target=stop, name="shutdown").start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
