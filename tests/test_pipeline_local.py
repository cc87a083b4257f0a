"""``train_eval`` and ``study`` run end to end with kfp's local runner and TorchX local_cwd on the tiny presets.

Each pipeline runs once per module (they take about a minute each) and several tests read the same run: the
segments' checkpoints and gate markers, the MLflow training run, the model registry, the study's parent run.
"""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from evaluators.registry import CHAMPION, Registry
from pipelines.cli import run_local_pipeline
from trainer import checkpoint, storage

TINY = ["train.steps=4", "train.log_every=2", "data.batch_size=16", "data.num_workers=1", "optim.warmup_steps=1"]
COLOR = "eval/zeroshot/shapes-color/top1"
EASY = {"thresholds": [{"metric": COLOR, "min": 0.0}], "champion": {"metric": COLOR, "tolerance": 1.0}}
IMPOSSIBLE = {"thresholds": [{"metric": COLOR, "min": 1.01}]}


def _train_eval(root: Path, policy: dict) -> dict:
    """Run a 2-segment train_eval under ``root``; return its register record and where things went."""
    where = {"run_url": f"file://{root}/run", "tracking_uri": f"sqlite:///{root}/mlflow.db"}
    record = run_local_pipeline(
        "train_eval", 2, pipeline_root=str(root / "kfp"), preset="tiny-clip", overrides=TINY,
        data_url=f"file://{root}/shapes", nproc_per_node=1, n_train=128, n_eval=32, gate_policy=policy,
        model_name="tiny", **where,
    )
    return {"record": json.loads(record), **where}


@pytest.fixture(scope="module")
def passing(tmp_path_factory):
    return _train_eval(tmp_path_factory.mktemp("passing"), EASY)


@pytest.fixture(scope="module")
def failing(tmp_path_factory):
    return _train_eval(tmp_path_factory.mktemp("failing"), IMPOSSIBLE)


def _marker(url: str) -> str:
    (found,) = [m for m in ("PROMOTED", "REJECTED") if storage.exists(storage.join(url, m))]
    return found


def test_each_segment_trains_on_from_the_last_and_is_gated(passing):
    found = checkpoint.committed_checkpoints(passing["run_url"])
    assert [step for step, _ in found] == [2, 4]  # segment ends: train.steps × k / K
    assert [_marker(url) for _, url in found] == ["PROMOTED", "PROMOTED"]
    for _, url in found:  # each segment stops at its end but follows the whole run's lr schedule
        assert "schedule_steps: 4" in storage.read_text(storage.join(url, "config.yaml"))
    runs = {checkpoint.read_meta(url)["mlflow_run_id"] for _, url in found}
    assert len(runs) == 1  # the second segment resumed the first one's MLflow run
    history = MlflowClient(passing["tracking_uri"]).get_metric_history(runs.pop(), COLOR)
    assert sorted(m.step for m in history) == [2, 4]


def test_the_best_passing_checkpoint_is_registered(passing):
    record = passing["record"]
    metrics = {url: json.loads(storage.read_text(storage.join(url, "metrics.json")))["metrics"][COLOR]
               for _, url in checkpoint.committed_checkpoints(passing["run_url"])}
    assert record["checkpoint"] == max(metrics, key=lambda url: (metrics[url], url))
    assert record["decision"]["passed"] and str(record["decision"]["registry"]["version"]) == "1"
    champion = Registry(passing["tracking_uri"], "tiny").by_alias(CHAMPION)
    assert champion.checkpoint_url == record["checkpoint"]
    assert champion.metrics[COLOR] == metrics[record["checkpoint"]]


def test_a_failed_gate_stops_the_chain_and_registers_nothing(failing):
    found = checkpoint.committed_checkpoints(failing["run_url"])
    assert [step for step, _ in found] == [2]  # the second segment never ran
    assert _marker(found[0][1]) == "REJECTED"
    decision = json.loads(storage.read_text(storage.join(found[0][1], "REJECTED")))
    assert not decision["passed"] and "below its minimum 1.01" in decision["reasons"][0]
    assert failing["record"] == {"run_url": failing["run_url"], "checkpoint": None, "decision": None}
    assert MlflowClient(failing["tracking_uri"]).search_registered_models() == []


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{root}/mlflow.db"
    table = run_local_pipeline(
        "study", 1, pipeline_root=str(root / "kfp"), variants=[{"objective": "clip", "pool": p, "seed": 0}
                                                               for p in ("cls", "gap")],
        overrides=TINY, data_url=f"file://{root}/shapes", runs_url=f"file://{root}/runs", tracking_uri=uri,
        experiment="mini", study_name="mini", nproc_per_node=1, n_train=128, n_eval=32, gate_policy=EASY,
        model_name="tiny",
    )
    return {"table": table, "tracking_uri": uri, "runs_url": f"file://{root}/runs"}


def test_study_trains_each_variant_with_its_pooling(study):
    for pool in ("cls", "gap"):
        run_url = storage.join(study["runs_url"], f"clip-{pool}-seed0")
        latest = checkpoint.latest_checkpoint(run_url)
        assert latest.endswith("step-000000004") and _marker(latest) == "PROMOTED"
        assert f"image_pool: {pool}" in storage.read_text(storage.join(latest, "config.yaml"))
        assert Registry(study["tracking_uri"], f"tiny-clip-{pool}").by_alias(CHAMPION).checkpoint_url == latest


def test_study_report_compares_the_variants_in_an_mlflow_parent_run(study):
    lines = study["table"].splitlines()
    assert lines[0].startswith("| objective | pool | seeds | gate passed | eval/zeroshot/shapes-color/top1")
    assert [line.split(" | ")[:4] for line in lines[2:]] == [["| clip", "cls", "1", "1/1"],
                                                              ["| clip", "gap", "1", "1/1"]]
    client = MlflowClient(study["tracking_uri"])
    experiment = client.get_experiment_by_name("mini")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("maeclip.study") == "mini"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["image_pool"] for r in children) == ["cls", "gap"]
    artifacts = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "study")}
    assert artifacts == {"comparison.md", "comparison.json", "comparison.png"}
