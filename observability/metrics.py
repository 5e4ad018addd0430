"""Prometheus metrics for servers and workers, and the small HTTP endpoint that serves them.

Every process (server, worker) exposes ``GET /metrics`` on ``MP4T_HTTP_LISTEN`` when it is
set. Servers also answer ``/healthz`` (HAProxy's up/down check) and ``/readyz`` (mirrors
grpc.health.v1 exactly), and an HAProxy agent check on ``MP4T_AGENT_LISTEN`` that says
``drain`` during graceful shutdown, so HAProxy stops sending new RPCs while in-flight
uploads and Watch streams finish.

Names follow Prometheus conventions (``_total`` counters, base units in seconds/bytes);
the RPC metrics use the grpc-ecosystem names so existing dashboards apply.
"""
from __future__ import annotations

import http.server
import socket
import socketserver
import threading
import time
from typing import Any, Callable, Iterable

import pika
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import REGISTRY, GaugeMetricFamily

log = structlog.get_logger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
STAGE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)

# -- gRPC server
RPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.",
                      ["grpc_service", "grpc_method", "grpc_type"])
RPC_HANDLED = Counter("grpc_server_handled_total", "RPCs completed on the server, by status code.",
                      ["grpc_service", "grpc_method", "grpc_type", "grpc_code"])
RPC_LATENCY = Histogram("grpc_server_handling_seconds", "RPC handling time (streams: whole life).",
                        ["grpc_service", "grpc_method", "grpc_type"], buckets=LATENCY_BUCKETS)
RPC_IN_FLIGHT = Gauge("grpc_server_in_flight", "RPCs being handled now.", ["grpc_type"])

# -- uploads
UPLOAD_BYTES = Counter("mp4t_upload_bytes_total", "Bytes of media stored by completed uploads.")
UPLOADS = Counter("mp4t_uploads_total", "Upload attempts by outcome.", ["outcome"])
UPLOADS_IN_PROGRESS = Gauge("mp4t_uploads_in_progress", "Upload streams holding one of this replica's upload slots now.")
LIVE_STREAMS = Gauge("mp4t_live_streams", "Live caption streams this replica decodes now (scale the live group on it).")
LIVE_REFUSED = Counter("mp4t_live_refused_total", "Live streams refused: the replica was at MP4T_LIVE_MAX_STREAMS.")
LIVE_SEGMENTS = Counter("mp4t_live_segments_total", "Final live caption segments sent.")
UPLOAD_THROUGHPUT = Histogram("mp4t_upload_throughput_bytes_per_second", "Throughput of completed uploads.",
                              buckets=tuple(2**i * 1024 * 1024 for i in range(-2, 11)))
UPLOAD_SIZE = Histogram("mp4t_upload_size_bytes", "Size of completed uploads.",
                        buckets=tuple(4**i * 1024 * 1024 for i in range(0, 7)))

# -- jobs and stages (workers)
STAGE_DURATION = Histogram("mp4t_stage_duration_seconds", "Time spent in one run of a pipeline stage.",
                           ["stage", "outcome"], buckets=STAGE_BUCKETS)
REALTIME_FACTOR = Histogram("mp4t_realtime_factor", "Processing time / media duration (lower is faster).",
                            ["stage", "model"], buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5))
MEDIA_SECONDS = Counter("mp4t_media_seconds_processed_total", "Seconds of audio processed.", ["stage", "model"])
MESSAGES = Counter("mp4t_messages_total", "Dramatiq messages processed, by outcome (ok, retry, failed, skipped).",
                   ["actor", "queue", "outcome"])
RETRIES = Counter("mp4t_message_retries_total", "Messages re-enqueued for another attempt.", ["actor"])
DEAD_LETTERS = Counter("mp4t_dead_letters_total", "Messages that failed for good (moved to the dead-letter queue).",
                       ["actor"])
JOBS_FINISHED = Counter("mp4t_jobs_finished_total", "Transcriptions reaching a terminal state.", ["state", "reason"])
AI_ITEMS_FINISHED = Counter("mp4t_ai_items_finished_total", "AI items (clean-up, translation, summary, notes) "
                            "reaching a terminal state.", ["kind", "state", "reason"])
LLM_TOKENS = Counter("mp4t_llm_tokens_total", "LLM tokens used, by model and direction (prompt, completion).",
                     ["model", "direction"])
LLM_REQUESTS = Counter("mp4t_llm_requests_total", "LLM requests by outcome (ok, invalid_output, rate_limited, "
                       "quota_exhausted, server_error, timeout, connection, refused).", ["model", "outcome"])
LLM_RESPONSES = Counter("mp4t_llm_responses_total", "HTTP answers of the LLM server by status code, the client's own "
                        "retries included (429: rate limited; 5xx: server errors).", ["model", "code"])
LLM_LATENCY = Histogram("mp4t_llm_request_seconds", "LLM request latency (client retries included).", ["model"],
                        buckets=LATENCY_BUCKETS)
MODEL_LOAD = Gauge("mp4t_model_load_seconds", "Time the last model load took.", ["kind", "model"])
ENQUEUED = Counter("mp4t_messages_enqueued_total", "Messages published to the broker.", ["actor", "queue"])

_collectors_installed: set[str] = set()


class _Cached:
    """Run an expensive read at most every ``ttl`` seconds; keep the last good value on errors."""

    def __init__(self, fn: Callable[[], Any], ttl: float) -> None:
        self.fn, self.ttl = fn, ttl
        self.value: Any = None
        self.at = 0.0
        self.lock = threading.Lock()

    def get(self) -> Any:
        with self.lock:
            if time.monotonic() - self.at >= self.ttl:
                try:
                    self.value = self.fn()
                except Exception as exc:
                    log.warning("metrics_read_failed", error=str(exc))
                self.at = time.monotonic()
            return self.value


class JobStateCollector:
    """``mp4t_jobs{state}``: transcriptions per state, from ``read_counts`` (cached).

    ``read_counts`` (given by the composition root) returns {state: count}; this module
    reads no tables itself.
    """

    def __init__(self, read_counts: Callable[[], dict[str, int]], ttl: float = 5.0) -> None:
        self.cache = _Cached(read_counts, ttl)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        g = GaugeMetricFamily("mp4t_jobs", "Transcriptions by state (whole system).", labels=["state"])
        for state, n in sorted((self.cache.get() or {}).items()):
            g.add_metric([state], n)
        yield g


class QueueDepthCollector:
    """``mp4t_queue_messages{queue,kind}``: ready, delayed (retry backoff) and dead-letter counts."""

    def __init__(self, broker_url: str, queues: Iterable[str], ttl: float = 5.0) -> None:
        self.url = broker_url
        self.queues = list(queues)
        self.cache = _Cached(self._read, ttl)
        self._conn: Any = None

    def _channel(self) -> Any:
        if self._conn is None or self._conn.is_closed:
            params = pika.URLParameters(self.url)
            params.socket_timeout = 3
            params.blocked_connection_timeout = 3
            self._conn = pika.BlockingConnection(params)
        return self._conn.channel()

    def _read(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for queue in self.queues:
            for kind, name in (("ready", queue), ("delayed", f"{queue}.DQ"), ("dead", f"{queue}.XQ")):
                ch = self._channel()
                try:
                    out[(queue, kind)] = ch.queue_declare(name, passive=True).method.message_count
                    ch.close()
                except pika.exceptions.ChannelClosedByBroker:  # queue not declared yet: empty
                    out[(queue, kind)] = 0
        return out

    def collect(self) -> Iterable[GaugeMetricFamily]:
        g = GaugeMetricFamily("mp4t_queue_messages", "Messages waiting in RabbitMQ, per queue.",
                              labels=["queue", "kind"])
        for (queue, kind), n in sorted((self.cache.get() or {}).items()):
            g.add_metric([queue, kind], n)
        yield g


def install_collector(name: str, collector: Any) -> None:
    if name not in _collectors_installed:
        REGISTRY.register(collector)
        _collectors_installed.add(name)


def rpc_type(handler: Any) -> str:
    if handler.unary_unary:
        return "unary"
    if handler.stream_unary:
        return "client_stream"
    if handler.unary_stream:
        return "server_stream"
    return "bidi_stream"


# ---------------------------------------------------------------- HTTP endpoint + HAProxy agent


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return (host.strip("[]") or "0.0.0.0"), int(port)


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "mp4totext"
    health: Callable[[], tuple[int, str]] | None = None
    ready: Callable[[], tuple[int, str]] | None = None

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            code, text = self.health() if self.health else (200, "ok")
            self._send(code, (text + "\n").encode())
        elif path == "/readyz":
            code, text = self.ready() if self.ready else (200, "ok")
            self._send(code, (text + "\n").encode())
        elif path == "/livez":
            self._send(200, b"ok\n")
        else:
            self._send(404, b"not found: try /metrics, /healthz, /readyz, /livez\n")

    def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - checks every second: stay quiet
        pass


class _ThreadingHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class HttpEndpoint:
    """Serves /metrics, /healthz, /readyz, /livez in a daemon thread."""

    def __init__(self, listen: str, health: Callable[[], tuple[int, str]] | None = None,
                 ready: Callable[[], tuple[int, str]] | None = None) -> None:
        handler = type("Handler", (_Handler,), {"health": staticmethod(health) if health else None,
                                                 "ready": staticmethod(ready) if ready else None})
        try:
            self.httpd = _ThreadingHTTPServer(_split(listen), handler)
        except OSError as exc:
            raise SystemExit(f"cannot listen on {listen} for metrics/health ({exc}); set MP4T_HTTP_LISTEN") from None
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, name="http-metrics", daemon=True).start()
        log.info("http_endpoint_started", listen=listen, port=self.port)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class AgentCheck:
    """HAProxy agent-check responder: one line per connection, e.g. ``up``, ``drain`` or ``down``."""

    def __init__(self, listen: str, state: Callable[[], str]) -> None:
        self.state = state
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind(_split(listen))
        except OSError as exc:
            raise SystemExit(f"cannot listen on {listen} for the HAProxy agent ({exc}); set MP4T_AGENT_LISTEN") \
                from None
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._serve, name="haproxy-agent", daemon=True).start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.sendall((self.state() + "\n").encode())
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.close()
        except OSError:
            pass
