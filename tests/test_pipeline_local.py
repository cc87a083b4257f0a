"""``train_eval`` runs end to end with kfp's local runner, and the gate's dsl.If follows the metric both ways."""

import json

import pytest

from pipelines.cli import run_local_pipeline
from trainer import checkpoint, storage

TINY = ["train.steps=6", "train.checkpoint_every=6", "train.log_every=3", "data.batch_size=16",
        "data.num_workers=1", "optim.warmup_steps=2"]


@pytest.mark.parametrize(("threshold", "marker"), [(0.0, "PROMOTED"), (1.01, "REJECTED")])
def test_gate_branch_follows_the_metric(tmp_path, threshold, marker):
    run_url = f"file://{tmp_path}/run"
    run_local_pipeline(
        pipeline_root=str(tmp_path / "kfp"),
        preset="tiny-clip",
        overrides=TINY,
        data_url=f"file://{tmp_path}/shapes",
        run_url=run_url,
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        nproc_per_node=2,
        n_train=256,
        n_eval=32,
        gate_threshold=threshold,
    )
    latest = checkpoint.latest_checkpoint(run_url)
    assert latest.endswith("step-000000006")
    other = {"PROMOTED": "REJECTED", "REJECTED": "PROMOTED"}[marker]
    assert storage.exists(storage.join(latest, marker)) and not storage.exists(storage.join(latest, other))
    recorded = json.loads(storage.read_text(storage.join(latest, marker)))
    report = json.loads(storage.read_text(storage.join(latest, "metrics.json")))
    assert recorded == report["metrics"] and report["step"] == 6
    assert 0.0 <= recorded["eval/zeroshot/shapes-color/top1"] <= 1.0
