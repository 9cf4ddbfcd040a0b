"""Start and stop real SGLang servers (ours or stock) for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
READY_LINE = "The server is fired up and ready to roll"
BIND_FAILED = "address already in use"
CPU_ARGS = ("--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
            "--enable-p2p-check", "--mem-fraction-static", "0.5", "--max-total-tokens", "65536")
# The GPU lane (test/gpu_lane): a CUDA machine without sgl-kernel or flashinfer, CUDA graphs on;
# several servers share the GPU, so each KV pool is capped by tokens.
GPU_LANE_ARGS = ("--device", "cuda", "--attention-backend", "triton", "--sampling-backend", "pytorch",
                 "--disable-custom-all-reduce", "--max-total-tokens", "65536", "--cuda-graph-max-bs", "16")
GPU_LANE = os.environ.get("SGLANG_ENHANCED_E2E_DEVICE") == "cuda"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortTaken(RuntimeError):
    """Another process took a port of the server before the server bound it (start it again)."""


class ServerProcess:
    """A server started in its own process group; ``stop()`` kills the whole group."""

    def __init__(self, argv: Sequence[str], port: int, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.env = {**os.environ, **(env or {})}
        self.restarts = 0
        self._spawn(port, log_path)

    def _spawn(self, port: int, log_path: Path) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, env=self.env,
                                     start_new_session=True)  # fmt: skip

    def _restart_on_a_new_port(self) -> None:
        """Start the same server again on a free port (its ``--port`` argument replaced), logging anew."""
        self.stop()
        port = free_port()
        self.argv[self.argv.index("--port") + 1] = str(port)
        self.restarts += 1
        self._spawn(port, self.log_path.with_name(f"{self.log_path.stem}-restart{self.restarts}.log"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 240.0, restarts: int = 2) -> ServerProcess:
        """Wait for /health and the end of SGLang's own warm-up request; raise with the log tail otherwise.

        Servers started side by side can take each other's ports (a TP group's rendezvous and gloo
        ports are chosen by SGLang and torch): a server whose port was taken before it bound it is
        started again on a new port, up to ``restarts`` times, within the same ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            exited = self.proc.poll() is not None
            try:
                healthy = not exited and requests.get(self.base_url + "/health", timeout=5).status_code == 200
            except requests.RequestException:
                healthy = False
            log = self.log()
            if healthy and READY_LINE in log:
                return self
            if BIND_FAILED in log:  # its HTTP port or a port of its TP group's rendezvous (also once exited)
                if self.restarts < restarts:
                    self._restart_on_a_new_port()
                    continue
                self.stop()
                raise PortTaken(f"port taken before the server bound it, {self.restarts} restarts:\n{log[-2000:]}")
            if exited:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log[-4000:]}")
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout:.0f}s:\n{self.log()[-4000:]}")

    def wait_exit(self, timeout: float = 180.0) -> int:
        """For servers expected to refuse to start: their exit status."""
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=20)
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_enhanced(model: Path, log_dir: Path, *extra: str, config: Path | None = None,
                   env: dict[str, str] | None = None, name: str = "enhanced") -> ServerProcess:
    """``launch_enhanced_server.py`` on a free port (CPU mode is chosen automatically on CPU)."""
    port = free_port()
    argv = [sys.executable, str(REPO / "launch_enhanced_server.py"), "--model", str(model),
            "--port", str(port), "--host", "127.0.0.1", *(GPU_LANE_ARGS if GPU_LANE else ()), *extra]
    if config is not None:
        argv += ["--config", str(config)]
    return ServerProcess(argv, port, log_dir / f"{name}-{port}.log", env)


def start_stock(model: Path, log_dir: Path, *extra: str, name: str = "stock") -> ServerProcess:
    """Stock ``python -m sglang.launch_server`` with SGLang's default loader, on CPU (or the GPU lane's GPU)."""
    port = free_port()
    argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--port", str(port),
            "--host", "127.0.0.1", *(GPU_LANE_ARGS if GPU_LANE else CPU_ARGS), *extra]
    return ServerProcess(argv, port, log_dir / f"{name}-{port}.log")


def prompt_logprobs(base_url: str, input_ids: list[int], headers: dict[str, str] | None = None) -> list[float]:
    """Log-probabilities the server gives each prompt token (after the first)."""
    r = requests.post(base_url + "/generate", headers=headers, json={
        "input_ids": input_ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0},
        "return_logprob": True, "logprob_start_len": 0,
    }, timeout=120)
    r.raise_for_status()
    return [lp for lp, _tok, _ in r.json()["meta_info"]["input_token_logprobs"][1:]]
