"""``maeclip pipeline submit`` talks to a Kubeflow Pipelines API as ``kfp.Client`` does.

The only fake in the pipeline tests: a small HTTP server on loopback stands in for the Kubeflow Pipelines
host, records what the real ``kfp.Client`` sends (experiment lookup and creation, run creation with the
compiled spec and the parameters, run polling) and answers like the v2beta1 REST API.
"""

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

MAECLIP = str(Path(sys.executable).parent / "maeclip")
API = "/apis/v2beta1"


class FakeKubeflow(ThreadingHTTPServer):
    """Answers the v2beta1 endpoints kfp.Client uses; ``final_state`` is what a polled run ends in."""

    def __init__(self, final_state: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.final_state = final_state
        self.requests: list[tuple[str, str, dict]] = []
        self.polls = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeKubeflow

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> str:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else {}
        self.server.requests.append((self.command, self.path, body))
        return urlparse(self.path).path

    def do_GET(self) -> None:
        path = self._record()
        if path == f"{API}/healthz":
            self._reply({"multi_user": False})
        elif path == f"{API}/experiments":
            self._reply({"experiments": [], "total_size": 0})
        elif path == f"{API}/runs/run-1":
            self.server.polls += 1
            state = "RUNNING" if self.server.polls == 1 else self.server.final_state
            self._reply({"run_id": "run-1", "display_name": "r", "state": state})
        else:
            self.send_error(404)

    def do_POST(self) -> None:
        path = self._record()
        body = self.server.requests[-1][2]
        if path == f"{API}/experiments":
            self._reply({"experiment_id": "exp-1", "display_name": body["display_name"]})
        elif path == f"{API}/runs":
            self._reply({"run_id": "run-1", "experiment_id": body["experiment_id"],
                         "display_name": body["display_name"], "state": "PENDING"})
        else:
            self.send_error(404)

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass


@pytest.fixture
def kubeflow(request) -> Iterator[FakeKubeflow]:
    server = FakeKubeflow(getattr(request, "param", "SUCCEEDED"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _submit(kubeflow: FakeKubeflow, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MAECLIP, "pipeline", "submit", "--host", kubeflow.url, "--experiment", "nightly", "--wait",
         "--poll-s", "0.1", "--service-account", "maeclip-trainer", *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )


def _spec(run: dict) -> dict:
    """The pipeline spec inside a run body (kfp nests it beside the platform spec when there is one)."""
    spec = run["pipeline_spec"]
    return spec.get("pipeline_spec", spec)


def test_submit_creates_the_experiment_and_a_run_with_spec_and_parameters(kubeflow, tmp_path):
    result = _submit(kubeflow, tmp_path, "--pipeline", "train_eval", "--segments", "3", "--config", "tiny-clip",
                     "--set", "train.steps=90", "--run-url", "gs://bucket/runs/a", "--data-url", "gs://bucket/shapes",
                     "--scheduler", "kubernetes", "--nnodes", "1:4", "--nproc-per-node", "8",
                     "--image", "registry.example/maeclip:0.1.0", "--cpu", "96", "--max-retries", "6")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"run_id": "run-1", "state": "SUCCEEDED"}
    calls = [(method, urlparse(path).path) for method, path, _ in kubeflow.requests]
    assert ("POST", f"{API}/experiments") in calls and calls.count(("POST", f"{API}/runs")) == 1
    lookup = next(p for m, p, _ in kubeflow.requests if m == "GET" and urlparse(p).path == f"{API}/experiments")
    assert "nightly" in parse_qs(urlparse(lookup).query)["filter"][0]
    created = next(b for m, p, b in kubeflow.requests if (m, p) == ("POST", f"{API}/experiments"))
    assert created["display_name"] == "nightly"
    run = next(b for m, p, b in kubeflow.requests if (m, p) == ("POST", f"{API}/runs"))
    assert run["experiment_id"] == "exp-1" and run["service_account"] == "maeclip-trainer"
    spec = _spec(run)
    assert spec["pipelineInfo"]["name"] == "maeclip-train-eval"
    assert "comp-segment-3-of-3" in spec["components"]
    assert "kubernetes" in run["pipeline_spec"]["platform_spec"]["platforms"]
    parameters = run["runtime_config"]["parameters"]
    assert parameters["preset"] == "tiny-clip" and parameters["overrides"] == ["train.steps=90"]
    assert (parameters["run_url"], parameters["data_url"]) == ("gs://bucket/runs/a", "gs://bucket/shapes")
    assert (parameters["scheduler"], parameters["nnodes"], parameters["nproc_per_node"]) == ("kubernetes", "1:4", 8)
    assert "tracking_uri" not in parameters  # on a cluster the pods' $MLFLOW_TRACKING_URI applies
    # the training job's settings (trainer.cluster.Cluster); the image is the pipeline's, which its steps run too
    assert parameters["cluster"] == {"cpu": 96, "max_retries": 6}
    assert parameters["image"] == "registry.example/maeclip:0.1.0"
    assert kubeflow.polls == 2  # --wait polled until the run finished


@pytest.mark.parametrize("kubeflow", ["FAILED"], indirect=True)
def test_submit_wait_fails_when_the_run_fails(kubeflow, tmp_path):
    result = _submit(kubeflow, tmp_path, "--pipeline", "study", "--segments", "1", "--arms", "clip",
                     "--pools", "cls", "map", "--seeds", "0", "1", "--memory-mb", "65536")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["maeclip: error: pipeline run run-1 ended FAILED"]
    run = next(b for m, p, b in kubeflow.requests if (m, p) == ("POST", f"{API}/runs"))
    assert _spec(run)["pipelineInfo"]["name"] == "maeclip-study"
    parameters = run["runtime_config"]["parameters"]
    variants = [v["variant"] for v in parameters["variants"]]
    assert [(v["arm"], v["pool"], v["seed"]) for v in variants] == [("clip", "cls", 0), ("clip", "cls", 1),
                                                                      ("clip", "map", 0), ("clip", "map", 1)]
    assert {v["preset"] for v in parameters["variants"]} == {"tiny-clip"}
    # study variants train at the priority preempted first, with the study's own settings
    assert [v["cluster"] for v in parameters["variants"]] == [{"priority_class": "maeclip-study",
                                                               "memory_mb": 65536}] * 4
