"""Shared fixtures: real storage emulators on loopback (gcp-storage-emulator for gs://, moto's server for s3://).

They are started once per test session, stopped at its end, and their endpoints reach subprocesses through the
environment, exactly as a real deployment configures gcsfs, s3fs and Streaming: no code path special-cases them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres import Postgres, running_postgres
from services import free_port, stop, wait_for_port

SUPPORT = Path(__file__).parent / "support"
BIN = Path(sys.executable).parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


class _Env:
    """Set variables for the session; restore the previous values afterwards."""

    def __init__(self, values: dict[str, str]) -> None:
        self.saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)

    def restore(self) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    """gcp-storage-emulator with one bucket; yields the bucket's ``gs://`` URL."""
    port, bucket = free_port(), "maeclip-test"
    process = subprocess.Popen(
        [str(BIN / "gcp-storage-emulator"), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory",
         "--default-bucket", bucket, "-q"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, process, "gcp-storage-emulator")
    env = _Env({
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
        "NO_GCE_CHECK": "True",
        "MAECLIP_TEST_ANON_GCS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SUPPORT), os.environ.get("PYTHONPATH")])),
    })
    # Loaded by path: a system-wide `sitecustomize` (Debian ships one) may already own the module name.
    spec = importlib.util.spec_from_file_location("maeclip_test_anon_gcs", SUPPORT / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the env above makes it patch google.auth.default in this process too
    try:
        yield f"gs://{bucket}"
    finally:
        env.restore()
        stop(process)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server with one bucket; yields the bucket's ``s3://`` URL."""
    port, bucket = free_port(), "maeclip-test"
    process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, process, "moto_server")
    endpoint = f"http://127.0.0.1:{port}"
    env = _Env({
        "S3_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    })
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        env.restore()
        stop(process)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server on loopback, as the cluster's MLflow store; ``postgres.database(name)`` gives a fresh
    database's URI."""
    # Under the system temp dir, not pytest's (0700 root): as root the server runs as the `postgres` user.
    with tempfile.TemporaryDirectory(prefix="maeclip-postgres-") as root, running_postgres(Path(root)) as server:
        yield server


@pytest.fixture
def unique() -> str:
    """A short unique name for paths inside shared buckets."""
    return uuid.uuid4().hex[:10]


@pytest.fixture(params=["file", "gs", "s3"])
def run_url(request, tmp_path, unique) -> str:
    """A fresh run URL on each storage backend: local disk, the GCS emulator, moto's S3."""
    root = {"file": lambda: f"file://{tmp_path}",
            "gs": lambda: request.getfixturevalue("gcs_emulator"),
            "s3": lambda: request.getfixturevalue("s3_server")}[request.param]()
    return f"{root}/{unique}/run"
