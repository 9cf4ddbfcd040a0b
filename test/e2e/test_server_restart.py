"""The e2e harness starts a server again on a new port when its port was taken before it bound it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .server import BIND_FAILED, READY_LINE, PortTaken, ServerProcess, free_port

# Stands in for a server: the first start fails the way SGLang does when a port is taken; later
# starts answer /health on their --port and print SGLang's ready line.
FAKE_SERVER = f"""
import http.server, sys
from pathlib import Path
port, marker = int(sys.argv[sys.argv.index("--port") + 1]), Path(sys.argv[1])
if not marker.exists():
    marker.write_text("started once")
    print("OSError: [Errno 98] {BIND_FAILED}", flush=True)
    sys.exit(1)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", port), Health)
print("{READY_LINE}!", flush=True)
server.serve_forever()
"""


def _fake(tmp_path: Path, port: int) -> ServerProcess:
    argv = [sys.executable, "-c", FAKE_SERVER, str(tmp_path / "marker"), "--port", str(port)]
    return ServerProcess(argv, port, tmp_path / f"fake-{port}.log")


def test_a_server_whose_port_was_taken_starts_again_on_a_new_port(tmp_path: Path) -> None:
    first = free_port()
    with _fake(tmp_path, first) as server:
        server.wait_ready(timeout=60)
        assert server.restarts == 1
        assert server.port != first and server.base_url.endswith(f":{server.port}")
        assert BIND_FAILED in (tmp_path / f"fake-{first}.log").read_text()  # the first start's own log is kept


def test_without_restarts_left_the_taken_port_is_reported(tmp_path: Path) -> None:
    with _fake(tmp_path, free_port()) as server, pytest.raises(PortTaken):
        server.wait_ready(timeout=60, restarts=0)
