"""A real OTLP/gRPC trace endpoint for the processes under test."""
from __future__ import annotations

import threading
from typing import Any

import grpc


class OtlpReceiver:
    """A real OTLP/gRPC trace endpoint (opentelemetry-proto's TraceService) that keeps every span."""

    def __init__(self) -> None:
        from concurrent import futures

        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        receiver = self
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC API
                receiver._add(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @staticmethod
    def _value(v: Any) -> Any:
        kind = v.WhichOneof("value")
        return getattr(v, kind) if kind else None

    def _add(self, request: Any) -> None:
        rows = []
        for rs in request.resource_spans:
            resource = {a.key: self._value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    rows.append({
                        "service": resource.get("service.name"),
                        "resource": resource,
                        "name": sp.name,
                        "kind": sp.kind,  # 1 internal, 2 server, 3 client, 4 producer, 5 consumer
                        "trace_id": sp.trace_id.hex(),
                        "span_id": sp.span_id.hex(),
                        "parent_id": sp.parent_span_id.hex(),
                        "attributes": {a.key: self._value(a.value) for a in sp.attributes},
                        "start": sp.start_time_unix_nano,
                        "end": sp.end_time_unix_nano,
                        "status": sp.status.code,
                    })
        with self.lock:
            self.spans.extend(rows)

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def find(self, **attrs: Any) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if all(s["attributes"].get(k) == v for k, v in attrs.items())]

    def stop(self) -> None:
        self.server.stop(0)
