"""Starting and stopping the real services tests talk to: free loopback ports, MLflow servers, emulators."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def loopback_http(body: bytes) -> Iterator[tuple[int, list[str]]]:
    """A real HTTP server on 127.0.0.1 that answers every GET with ``body``; yields (its port, the paths asked)."""
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1], requests
    finally:
        server.shutdown()
        server.server_close()


def wait_for_port(port: int, process: subprocess.Popen, name: str, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before listening")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"{name} did not listen on port {port} within {timeout_s}s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _healthy(process: subprocess.Popen, port: int, log: Path, what: str, timeout_s: float) -> subprocess.Popen:
    """``process`` once it answers ``/health`` on ``port``; killed, with its log's tail in the error, if not."""
    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return process
        except OSError:
            if time.time() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"{what} on port {port} did not become healthy:\n"
                                   f"{log.read_text(errors='replace')[-3000:]}") from None
            time.sleep(0.5)


def start_mlflow_server(root: Path, port: int, timeout_s: float = 120, *,
                        backend_store_uri: str | None = None) -> subprocess.Popen:
    """``mlflow server`` with file artifacts under ``root``, healthy on ``port``; its store is
    ``backend_store_uri`` (e.g. a PostgreSQL database, migrated at start) or else a sqlite file under ``root``."""
    store = backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
    log = root / "mlflow-server.log"  # appended to: a restarted server's output follows the first one's
    with log.open("ab") as out:
        process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", store,
             "--default-artifact-root", f"file://{root / 'artifacts'}", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],  # one worker starts faster on a 2-core runner
            stdout=out, stderr=subprocess.STDOUT,
        )
    return _healthy(process, port, log, "MLflow server", timeout_s)


def start_mlflow_ui(backend_store_uri: str, port: int, folder: Path, timeout_s: float = 120) -> subprocess.Popen:
    """``mlflow ui`` on an existing store, healthy on ``port``, run in ``folder`` (its log goes there).

    It serves each run's artifacts from the run's own ``file://`` location, where the store's experiments keep
    them (``trainer.tracking.ensure_experiment``), so the UI can show them.
    """
    log = folder / "mlflow-ui.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [str(BIN / "mlflow"), "ui", "--backend-store-uri", backend_store_uri, "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],  # one worker starts faster on a 2-core runner
            cwd=folder, stdout=out, stderr=subprocess.STDOUT,
            # no job runner and its seven queue consumers: they run GenAI jobs, not pages
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
    return _healthy(process, port, log, "mlflow ui", timeout_s)
