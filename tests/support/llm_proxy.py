"""A loopback HTTP proxy in front of the real LLM server that behaves as a busy hosted API does:
answers 429/503 with Retry-After, answers slowly, refuses parameters a model does not take (``refused_params``). Every other request is forwarded unchanged to
the real server (llama-cpp-python), so the answers the workers get are the model's own.

It records each chat completion it saw (arrival time, status sent back) and the most that were
in flight at once, which is what the tests of retries, the concurrency cap and time limits check.
"""
from __future__ import annotations

import dataclasses
import http.client
import http.server
import json
import threading
import time
import urllib.parse


@dataclasses.dataclass
class Seen:
    at: float  # time.monotonic() when the request arrived
    status: int


class LLMProxy:
    """``LLMProxy(upstream_base_url)``; point workers at ``base_url``; ``refuse_next`` and
    ``delay_s`` change what chat completions get; ``seen`` and ``max_in_flight`` say what came."""

    def __init__(self, upstream_base_url: str) -> None:
        up = urllib.parse.urlsplit(upstream_base_url)
        self.upstream = (up.hostname or "127.0.0.1", up.port or 80)
        self.lock = threading.Lock()
        self.delay_s = 0.0
        self._refusals: list[tuple[int, float | None, str, str | None]] = []  # status, Retry-After, message, param
        self.seen: list[Seen] = []
        self.bodies: list[dict] = []  # every chat completion's request body
        # parameter name -> the 400 message a server that does not take it answers with
        self.refused_params: dict[str, str] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                proxy._handle(self)

            def do_POST(self) -> None:  # noqa: N802
                proxy._handle(self)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="llm-proxy", daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}{up.path}"

    def refuse_next(self, n: int, status: int = 429, retry_after_s: float | None = None) -> None:
        """The next ``n`` chat completions are answered ``status`` (with Retry-After when given)."""
        with self.lock:
            self._refusals = [(status, retry_after_s, "", None)] * n

    def reset(self) -> None:
        with self.lock:
            self.delay_s, self._refusals, self.seen, self.max_in_flight = 0.0, [], [], self.in_flight
            self.bodies, self.refused_params = [], {}

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        chat = h.path.rstrip("/").endswith("/chat/completions")
        if not chat:
            self._forward(h, body)
            return
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            refusal = self._refusals.pop(0) if self._refusals else None
            sent = json.loads(body or b"{}")
            self.bodies.append(sent)
            bad = next((name for name in self.refused_params if name in sent), None)
            if refusal is None and bad is not None:
                refusal = (400, None, self.refused_params[bad], bad)
            seen = Seen(time.monotonic(), refusal[0] if refusal else 200)
            self.seen.append(seen)
            delay = self.delay_s
        try:
            if refusal is not None:
                status, retry_after, message, param = refusal
                error = {"message": message or f"injected {status}: slow down", "code": status,
                         "type": "invalid_request_error" if param else "rate_limit_error", "param": param}
                msg = json.dumps({"error": error}).encode()
                h.send_response(status)
                if retry_after is not None:
                    h.send_header("Retry-After", f"{retry_after:g}")
                h.send_header("Content-Type", "application/json")
                h.send_header("Content-Length", str(len(msg)))
                h.end_headers()
                h.wfile.write(msg)
                return
            time.sleep(delay)
            seen.status = self._forward(h, body)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _forward(self, h: http.server.BaseHTTPRequestHandler, body: bytes) -> int:
        conn = http.client.HTTPConnection(*self.upstream, timeout=600)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection")}
            conn.request(h.command, h.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            h.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    h.send_header(k, v)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return resp.status
        finally:
            conn.close()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
