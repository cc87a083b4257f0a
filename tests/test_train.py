"""Real training: 2 gloo ranks under torchrun launched by TorchX local_cwd, MLflow, checkpoints, resume."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from trainer import checkpoint, storage
from trainer.data.shapes import write_shapes
from trainer.launch import run_training


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    url = f"file://{tmp_path_factory.mktemp('corpus')}/shapes"
    write_shapes(url, n_train=512, n_eval=64, seed=0)
    return url


def _overrides(corpus: str, run: Path, steps: int) -> list[str]:
    return [f"data.url={corpus}", f"train.run_url=file://{run}", f"tracking.uri=sqlite:///{run.parent}/mlflow.db",
            f"train.steps={steps}", "train.checkpoint_every=10", "train.log_every=5", "data.batch_size=16",
            "data.num_workers=1", "optim.warmup_steps=5", "optim.lr=0.002"]


def test_two_rank_run_learns_checkpoints_and_resumes(corpus, tmp_path, capfd):
    run = tmp_path / "run"
    # asynchronous checkpoints: steps 10 and 20 upload in the background and commit at the next save
    # A global batch of 64 from 2 ranks x 2 accumulated micro-batches of 16, every contrastive loss over all 64
    # pairs; lr 0.002 published at batch 16, so the sqrt rule makes it 0.002 x sqrt(64 / 16) = 0.004.
    first = run_training("tiny-clip", [*_overrides(corpus, run, 30), "train.async_checkpoint=true",
                                       "train.global_batch_size=64", "optim.reference_batch=16",
                                       "optim.lr_scaling=sqrt"], nproc_per_node=2)
    assert first.endswith("step-000000030")
    assert [step for step, _ in checkpoint.committed_checkpoints(f"file://{run}")] == [10, 20, 30]
    meta = checkpoint.read_meta(first)
    assert meta["samples_seen"] == 30 * 64 and meta["world_size"] == 2
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = meta["mlflow_run_id"]
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert sorted(losses) == [5, 10, 15, 20, 25, 30]
    assert losses[30] < losses[5] - 0.1  # the loss falls
    memory = client.get_metric_history(run_id, "system/max_rss_gb")
    assert len(memory) == 6 and all(0.05 < m.value < 64 for m in memory)
    params = client.get_run(run_id).data.params
    assert params["model.objective"] == "clip" and params["train.steps"] == "30"
    assert params["optim.lr"] == "0.002" and float(params["optim.effective_lr"]) == pytest.approx(0.004)
    lrs = {m.step: m.value for m in client.get_metric_history(run_id, "train/lr")}
    assert lrs[5] == pytest.approx(0.004)  # the end of the warmup: the scaled peak
    negatives = {m.value for m in client.get_metric_history(run_id, "train/contrastive_batch")}
    assert negatives == {64}  # the pairs each contrastive loss holds: the global batch, not a micro-batch

    # a directory without COMMITTED, newer than every real checkpoint, must be ignored
    storage.write_text(storage.join(f"file://{run}", "checkpoints", "step-000000035", "meta.json"), "{}")
    capfd.readouterr()
    second = run_training("tiny-clip", _overrides(corpus, run, 40), nproc_per_node=2)
    out = capfd.readouterr().out
    assert "from step 30" in out
    assert second.endswith("step-000000040")
    assert checkpoint.read_meta(second)["mlflow_run_id"] == run_id  # the same MLflow run continues
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]
    assert json.loads(storage.read_text(storage.join(second, "meta.json")))["step"] == 40
