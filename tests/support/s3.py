"""A real S3 server for the tests (SeaweedFS), which fault tests can kill and bring back."""
from __future__ import annotations

import io
import os
import pathlib
import signal
from typing import Any

from minio import Minio

from tests.support.common import free_port, port_open, wait_for
from tests.support.procs import Proc


class SeaweedS3:
    """``weed server -s3`` on free ports with its data in ``data``; the same ports and data on restart."""

    def __init__(self, weed: str, data: pathlib.Path, log_dir: pathlib.Path) -> None:
        self.weed, self.data, self.log_dir = weed, data, log_dir
        ports: dict[str, int] = {}
        for name in ("master", "volume", "filer", "s3"):
            while True:  # weed also listens on port+10000 for gRPC
                p = free_port()
                if p + 10000 < 65535 and not port_open("127.0.0.1", p + 10000) and p not in ports.values():
                    ports[name] = p
                    break
        self.ports = ports
        self.info = {"endpoint": f"127.0.0.1:{ports['s3']}", "access_key": "test", "secret_key": "testsecret",
                     "bucket": "mp4t-test"}
        self.client = Minio(self.info["endpoint"], access_key=self.info["access_key"],
                            secret_key=self.info["secret_key"], secure=False)
        self.proc: Proc | None = None

    def _args(self) -> list[str]:
        p = self.ports
        return [self.weed, "server", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
                f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
                f"-s3.port={p['s3']}", "-volume.max=20", "-master.volumeSizeLimitMB=256",
                # weed's Iceberg and Lance listeners default to fixed ports (8181, 9101): off, so
                # parallel runs (and our own ports) never collide
                "-s3.port.iceberg=0", "-s3.port.lance=0"]

    def _ready(self) -> bool:
        try:
            if not self.client.bucket_exists(self.info["bucket"]):
                self.client.make_bucket(self.info["bucket"])
            self.client.put_object(self.info["bucket"], "probe", io.BytesIO(b"x"), 1)
            self.client.remove_object(self.info["bucket"], "probe")
            return True
        except Exception:
            return False

    def start(self) -> None:
        self.proc = Proc("weed", self._args(), dict(os.environ), self.log_dir)
        wait_for(self._ready, 90, "SeaweedFS S3 to accept writes", interval=0.5)

    def kill(self) -> None:
        """An outage: the server dies (connections are refused until ``start``)."""
        assert self.proc is not None
        self.proc.kill(signal.SIGKILL)
        wait_for(lambda: not port_open("127.0.0.1", self.ports["s3"]), 30, "the S3 port to close")

    def stop(self) -> None:
        """The end of a session: weed takes ~27 s to shut down on SIGTERM, and its data is thrown away."""
        if self.proc is not None:
            self.proc.stop(timeout=2)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.info)
