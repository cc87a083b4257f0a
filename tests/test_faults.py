"""Faults: SIGTERM (preemption) checkpoints and exits 0 with an exactly reproducible resume; a worker killed
with SIGKILL is restarted by torchrun elastic and the epoch is still consumed exactly once."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from trainer import checkpoint
from trainer.data.shapes import write_shapes
from trainer.launch import run_training

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    url = f"file://{tmp_path_factory.mktemp('corpus')}/shapes"
    write_shapes(url, n_train=256, n_eval=32, seed=1)
    return url


def _overrides(corpus: str, root: Path, steps: int, checkpoint_every: int) -> list[str]:
    return [f"data.url={corpus}", f"train.run_url=file://{root}/run", f"tracking.uri=sqlite:///{root}/mlflow.db",
            f"train.steps={steps}", f"train.checkpoint_every={checkpoint_every}", "train.log_every=1",
            "data.batch_size=8", "data.num_workers=1", "optim.warmup_steps=2", "train.deterministic=true"]


def _torchrun(overrides: list[str]) -> subprocess.Popen:
    args = [TORCHRUN, "--nproc_per_node", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
            "-m", "trainer.train", "--config", "tiny-clip"]
    for override in overrides:
        args += ["--set", override]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(root: Path) -> dict[int, float]:
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("maeclip").experiment_id])
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}


def test_sigterm_checkpoints_exits_zero_and_resume_reproduces_the_losses(corpus, tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    assert _torchrun(_overrides(corpus, reference, 12, 100)).wait(timeout=600) == 0

    audit = tmp_path / "audit"
    audit.mkdir()
    os.environ["MAECLIP_SAMPLE_AUDIT"] = str(audit)
    try:
        process = _torchrun(_overrides(corpus, interrupted, 12, 100))
        for line in process.stdout:
            if "[train] step 5/12" in line:
                for pid in {r["pid"] for r in _audit(audit)}:
                    os.kill(pid, signal.SIGTERM)  # preemption: every worker is told to stop
                break
    finally:
        del os.environ["MAECLIP_SAMPLE_AUDIT"]
    output = process.stdout.read()
    assert process.wait(timeout=120) == 0, output
    committed = checkpoint.committed_checkpoints(f"file://{interrupted}/run")
    assert len(committed) == 1 and 5 <= committed[0][0] < 12, output
    assert f"[train] stopped at step {committed[0][0]}" in output

    assert _torchrun(_overrides(corpus, interrupted, 12, 100)).wait(timeout=600) == 0
    expected, got = _losses(reference), _losses(interrupted)
    assert sorted(got) == sorted(expected) == list(range(1, 13))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step


def _audit(folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob("rank-*.jsonl")) for line in path.read_text().splitlines()]


def test_killed_worker_is_restarted_and_the_epoch_is_seen_exactly_once(corpus, tmp_path, monkeypatch):
    audit = tmp_path / "audit"
    audit.mkdir()
    monkeypatch.setenv("MAECLIP_SAMPLE_AUDIT", str(audit))
    killed = []

    def kill_a_worker_mid_epoch() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            records = [r for r in _audit(audit) if r["step"] >= 7 and r["attempt"] == 0]
            if records:
                os.kill(records[0]["pid"], signal.SIGKILL)
                killed.append(records[0]["pid"])
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_a_worker_mid_epoch, daemon=True)
    watcher.start()
    # 256 samples / (8 per rank x 2 ranks) = 16 steps: one epoch.
    latest = run_training("tiny-clip", _overrides(corpus, tmp_path, 16, 4), nproc_per_node=2)
    watcher.join(timeout=5)
    assert killed, "the worker was never killed"
    assert latest.endswith("step-000000016")

    records = _audit(audit)
    assert max(r["attempt"] for r in records) >= 1  # torchrun restarted the group
    final = {}
    for record in sorted(records, key=lambda r: r["attempt"]):
        final.setdefault(record["step"], {})[record["pid"]] = record  # later attempts replace earlier ones
    by_step = {}
    for step, per_pid in final.items():
        attempt = max(r["attempt"] for r in per_pid.values())
        by_step[step] = [k for r in per_pid.values() if r["attempt"] == attempt for k in r["keys"]]
    assert sorted(by_step) == list(range(1, 17))
    keys = [key for step in sorted(by_step) for key in by_step[step]]
    assert sorted(keys) == [f"train-{i:07d}" for i in range(256)]  # every sample once, none twice

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("maeclip").experiment_id])
    assert len(runs) == 1  # the restarted group continued the same MLflow run
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")}
    assert steps == set(range(1, 17))


def test_resume_on_a_different_world_size_keeps_the_global_batch_and_the_epoch(corpus, tmp_path, monkeypatch):
    """Half an epoch on 2 ranks, the rest on 1 rank with 2 micro-batches: same global batch, every sample once."""
    audit = tmp_path / "audit"
    audit.mkdir()
    monkeypatch.setenv("MAECLIP_SAMPLE_AUDIT", str(audit))
    overrides = [*_overrides(corpus, tmp_path, 8, 8), "train.global_batch_size=16"]
    assert run_training("tiny-clip", overrides, nproc_per_node=2).endswith("step-000000008")
    overrides = [*_overrides(corpus, tmp_path, 16, 8), "train.global_batch_size=16"]
    latest = run_training("tiny-clip", overrides, nproc_per_node=1)
    meta = checkpoint.read_meta(latest)
    assert meta["step"] == 16 and meta["world_size"] == 1 and meta["samples_seen"] == 256

    records = _audit(audit)
    assert {r["step"] for r in records} == set(range(1, 17))
    assert len({r["pid"] for r in records if r["step"] <= 8}) == 2  # two ranks, then one
    assert len({r["pid"] for r in records if r["step"] > 8}) == 1
    keys = [key for r in records for key in r["keys"]]
    assert sorted(keys) == [f"train-{i:07d}" for i in range(256)]  # every sample once over both world sizes
    assert len(_losses(tmp_path)) == 16  # one MLflow run, one continuous step axis
