"""Our servers and workers as processes over one set of services (the session's e2e stack)."""
from __future__ import annotations

import pathlib
import time

from tests.support.common import CLI, wait_for
from tests.support.metrics import Samples, scrape
from tests.support.procs import Proc, grpc_ready, log_event


class Stack:
    """Two gRPC servers, a critical worker and a high worker over RabbitMQ + S3 + PostgreSQL.

    Every process serves /metrics on its own port (``http_ports[proc]``); servers also answer
    /healthz and the HAProxy agent check. Spans go to the session's OTLP receiver.
    """

    MAX_UPLOAD = 120 * 1024 * 1024

    def __init__(self, env: dict[str, str], log_dir: pathlib.Path, s3: dict[str, str]) -> None:
        self.env = env
        self.log_dir = log_dir
        self.s3 = s3
        self.servers: list[Proc] = []
        self.targets: list[str] = []
        self.workers: dict[str, Proc] = {}
        self.http_ports: dict[Proc, int] = {}
        self.agent_ports: dict[Proc, int] = {}

    def launch_server(self, port: int = 0, http_port: int = 0, agent_port: int = 0,
                      **extra_env: str) -> tuple[Proc, str]:
        """Start a server process (not registered in ``servers``) and wait until it is SERVING.

        Port 0 lets the server pick free ports and report them in its ``server_started`` line:
        a port picked here and bound later can be taken in between (ephemeral ports of
        outgoing connections come from the same range). Given ports (a restart behind a
        proxy) are retried while something else briefly holds them.
        """
        for attempt in range(5):
            env = {**self.env, "MP4T_GRPC_LISTEN": f"127.0.0.1:{port}", "MP4T_HTTP_LISTEN": f"127.0.0.1:{http_port}",
                   "MP4T_AGENT_LISTEN": f"127.0.0.1:{agent_port}", **extra_env}
            proc = Proc("server", [*CLI, "serve"], env, self.log_dir)
            line = wait_for(lambda: log_event(proc, "server_started") or (not proc.alive() and {"dead": True}), 60,
                            "server_started")
            if "dead" in line:
                if "in use" in proc.log() and attempt < 4:
                    time.sleep(1)
                    continue
                raise RuntimeError(f"server did not start:\n{proc.log()[-3000:]}")
            target = f"127.0.0.1:{line['port']}"
            try:
                grpc_ready(target)
            except TimeoutError:
                raise RuntimeError(f"server did not become SERVING:\n{proc.log()[-3000:]}") from None
            self.http_ports[proc] = line["http_port"]
            self.agent_ports[proc] = line["agent_port"]
            return proc, target
        raise AssertionError("unreachable")

    def start_server(self) -> str:
        proc, target = self.launch_server()
        self.servers.append(proc)
        self.targets.append(target)
        return target

    def start_worker(self, queues: str, **extra_env: str) -> Proc:
        env = {**self.env, "MP4T_HTTP_LISTEN": "127.0.0.1:0", **extra_env}
        proc = Proc(f"worker-{queues.replace(',', '-')}", [*CLI, "worker", "--queues", queues],
                    env, self.log_dir)
        wait_for(lambda: "worker_started" in proc.log() or not proc.alive(), 60, f"worker {queues}")
        if not proc.alive():
            raise RuntimeError(f"worker {queues} died:\n{proc.log()[-3000:]}")
        self.workers[queues] = proc
        self.http_ports[proc] = log_event(proc, "http_endpoint_started")["port"]
        return proc

    def metrics(self, proc: Proc) -> Samples:
        return scrape(self.http_ports[proc])

    def restart_worker(self, queues: str, **extra_env: str) -> Proc:
        old = self.workers.pop(queues, None)
        if old is not None:
            old.stop()
        return self.start_worker(queues, **extra_env)

    def stop(self) -> None:
        for proc in [*self.servers, *self.workers.values()]:
            proc.stop()

    @property
    def target(self) -> str:
        return self.targets[0]
