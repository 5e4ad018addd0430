"""Helpers for the tests and the benchmark (no pytest fixtures here: those live in tests/conftest.py).

    from tests.support import CLI, Proc, Stack, wait_for
"""
from tests.support.common import CLI, IN_CI, ROOT, SPEECH_TEXT, free_port, need, port_open, wait_for
from tests.support.haproxy import haproxy_config
from tests.support.metrics import Samples, metric, metric_delta, scrape
from tests.support.otlp import OtlpReceiver
from tests.support.procs import PeakRss, Proc, grpc_ready, log_event, log_lines
from tests.support.rabbit import broker_outage, broker_restart, dead_letters, queue_counts, queues_drained, vhost_of
from tests.support.stack import Stack

__all__ = [
    "CLI", "IN_CI", "ROOT", "SPEECH_TEXT", "OtlpReceiver", "PeakRss", "Proc", "Samples", "Stack", "broker_outage",
    "broker_restart", "dead_letters",
    "free_port", "grpc_ready", "haproxy_config", "log_event", "log_lines", "metric", "metric_delta", "need",
    "port_open", "queue_counts", "queues_drained", "scrape", "vhost_of", "wait_for",
]
