"""The public contract: committed stubs match protos/, reflection and health work."""
from __future__ import annotations

import subprocess
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.support import ROOT, Stack


def test_generated_stubs_match_protos() -> None:
    proc = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_reflection_lists_and_describes_services(stack: Stack) -> None:
    with grpc.insecure_channel(stack.target) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"mp4totext.v1.MediaService", "mp4totext.v1.TranscriptionService", "grpc.health.v1.Health"} <= services
        desc = db.FindFileContainingSymbol("mp4totext.v1.TranscriptionService")
        assert desc.package == "mp4totext.v1"
        assert "WatchTranscription" in [m.name for m in desc.service[0].method] + [
            m.name for s in desc.service for m in s.method]


def test_health_reports_serving_for_each_service(stack: Stack) -> None:
    with grpc.insecure_channel(stack.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", "mp4totext.v1.MediaService", "mp4totext.v1.TranscriptionService"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_graceful_shutdown_goes_not_serving_before_stopping(stack: Stack) -> None:
    import signal
    import time

    proc, target = stack.launch_server(MP4T_GRPC_DRAIN_S="3")
    try:
        with grpc.insecure_channel(target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            proc.kill(signal.SIGTERM)
            time.sleep(1)
            # draining: still answering, but telling the proxy to send nothing new
            resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert proc.popen.wait(timeout=20) == 0
        assert "server_stopped" in proc.log()
    finally:
        proc.stop()
