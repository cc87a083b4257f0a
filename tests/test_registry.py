"""The gate against a real MLflow server on loopback: NaN and below-threshold checkpoints fail and register
nothing; a pass registers a model version (weights, config, metrics); a regression within the tolerance is
`candidate` only, one beyond it fails; an improvement moves `champion`. Also through `maeclip gate`."""

import json
import math
import uuid
from pathlib import Path

import pytest
import safetensors.torch
import torch
from mlflow import MlflowClient
from services import free_port, start_mlflow_server, stop

from evaluators import report
from evaluators.gate import Policy, load_policy, run_gate
from evaluators.registry import CHAMPION, REGISTRY_EXPERIMENT, Registry
from pipelines.cli import main
from trainer import checkpoint, storage
from trainer.config import load_config
from trainer.models import build_model
from trainer.tracking import start_or_resume_run

METRIC = "eval/zeroshot/shapes-color/top1"
POLICY = load_policy({"thresholds": [{"metric": METRIC, "min": 0.3}],
                      "champion": {"metric": METRIC, "tolerance": 0.05}})


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    """``mlflow server`` on a free loopback port, its store a sqlite file or PostgreSQL (the cluster's)."""
    port = free_port()
    store = request.getfixturevalue("postgres").database("registry") if request.param == "postgresql" else None
    process = start_mlflow_server(tmp_path_factory.mktemp("mlflow"), port, backend_store_uri=store)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


@pytest.fixture(scope="module")
def run(server, tmp_path_factory):
    """A tiny model and a run URL to save checkpoints of it into; one per store (``server``), as the tests save
    the same steps again."""
    config = load_config("tiny-clip", [f"train.run_url=file://{tmp_path_factory.mktemp('run')}"])
    torch.manual_seed(0)
    model = build_model(config.model)
    return config, model, torch.optim.AdamW(model.parameters())


def _checkpoint(run, step: int, value: float) -> str:
    config, model, optimizer = run
    url = checkpoint.save(config.train.run_url, step, model, optimizer, config, {"samples_seen": step})
    metrics = {METRIC: value, "eval/zeroshot/shapes-color/top5": 1.0}
    report.write_metrics(url, {"step": step}, metrics, ["quick"])
    return url


def _gate(url: str, uri: str, name: str, policy: Policy = POLICY):
    return run_gate(url, policy, model_name=name, tracking_uri=uri)


def test_nan_and_below_threshold_fail_and_register_nothing(server, run):
    name = f"m-{uuid.uuid4().hex[:8]}"
    for step, value in ((10, math.nan), (11, 0.1)):
        decision = _gate(_checkpoint(run, step, value), server, name)
        assert not decision.passed and decision.registry["version"] is None
        assert json.loads(decision.to_json())["passed"] is False
    assert MlflowClient(server).search_model_versions(f"name='{name}'") == []


def test_champion_moves_on_improvement_only(server, run):
    name = f"m-{uuid.uuid4().hex[:8]}"
    registry = Registry(server, name)

    first = _gate(_checkpoint(run, 20, 0.60), server, name)
    assert first.passed and first.registry["aliases"] == ["candidate", "champion"]
    assert registry.by_alias("champion").version == first.registry["version"]

    # Within the tolerance below the champion: registered, candidate only; the champion stays.
    within = _gate(_checkpoint(run, 21, 0.57), server, name)
    assert within.passed and within.registry["aliases"] == ["candidate"]
    assert registry.by_alias("candidate").version == within.registry["version"]
    assert registry.by_alias("champion").version == first.registry["version"]
    assert within.registry["champion"] == first.registry["version"]

    # Beyond the tolerance: the gate fails, nothing is registered, the aliases stay.
    beyond = _gate(_checkpoint(run, 22, 0.50), server, name)
    assert not beyond.passed and "regressed" in beyond.reasons[0] and beyond.registry["version"] is None
    assert registry.by_alias("candidate").version == within.registry["version"]

    better = _gate(_checkpoint(run, 23, 0.70), server, name)
    assert better.passed and better.registry["aliases"] == ["candidate", "champion"]
    champion = registry.by_alias("champion")
    assert champion.version == better.registry["version"] and champion.metrics[METRIC] == pytest.approx(0.70)
    versions = MlflowClient(server).search_model_versions(f"name='{name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]


def test_a_registered_version_holds_weights_config_and_metrics(server, run, tmp_path):
    name = f"m-{uuid.uuid4().hex[:8]}"
    url = _checkpoint(run, 30, 0.9)
    decision = _gate(url, server, name)
    assert storage.exists(storage.join(url, "PROMOTED"))
    client = MlflowClient(server)
    version = client.get_model_version(name, decision.registry["version"])
    assert version.tags["checkpoint_url"] == url
    local = Path(client.download_artifacts(version.run_id, version.tags["artifact_path"], str(tmp_path)))
    assert sorted(p.name for p in local.iterdir()) == ["config.yaml", "metrics.json", "weights.safetensors"]
    saved = safetensors.torch.load(storage.read_bytes(storage.join(url, "weights.safetensors")))
    loaded = safetensors.torch.load_file(str(local / "weights.safetensors"))
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert json.loads((local / "metrics.json").read_text())["metrics"][METRIC] == 0.9
    assert Registry(server, name).by_alias(CHAMPION).metrics[METRIC] == 0.9  # read back from the version
    # Trained without tracking: the version's run is in the one registry experiment, named after model and step.
    registry_run = client.get_run(version.run_id)
    assert client.get_experiment(registry_run.info.experiment_id).name == REGISTRY_EXPERIMENT
    assert registry_run.info.run_name == f"{name}-step-000000030"


def test_a_version_belongs_to_the_run_that_trained_its_checkpoint(server, run):
    """No experiment per registered model: the version's run is the training run, in the training experiment."""
    client = MlflowClient(server)
    experiments = {e.name for e in client.search_experiments()}
    training_experiment = f"train-{uuid.uuid4().hex[:8]}"
    training_run = start_or_resume_run(server, training_experiment, None, "clip-cls-n256-seed0", {})
    config, model, optimizer = run
    url = checkpoint.save(config.train.run_url, 50, model, optimizer, config, {"mlflow_run_id": training_run})
    report.write_metrics(url, {"step": 50, "mlflow_run_id": training_run}, {METRIC: 0.7}, ["quick"])
    name = f"m-{uuid.uuid4().hex[:8]}"
    assert _gate(url, server, name).passed
    (version,) = client.search_model_versions(f"name='{name}'")
    assert version.run_id == training_run
    assert version.source.endswith(f"/{training_run}/artifacts/registered/step-000000050")
    assert {e.name for e in client.search_experiments()} - experiments == {training_experiment}
    files = {Path(f.path).name for f in client.list_artifacts(training_run, "registered/step-000000050")}
    assert files == {"config.yaml", "metrics.json", "weights.safetensors"}
    assert Registry(server, name).by_alias(CHAMPION).metrics[METRIC] == 0.7


def test_maeclip_gate_prints_one_decision_line_and_exits_by_it(server, run, tmp_path, capsys):
    name = f"m-{uuid.uuid4().hex[:8]}"
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"thresholds:\n  - metric: {METRIC}\n    min: 0.3\n")
    good, bad = _checkpoint(run, 40, 0.8), _checkpoint(run, 41, 0.2)
    arguments = ["--policy", str(policy), "--tracking-uri", server, "--model-name", name]
    main(["gate", "--checkpoint", good, *arguments])
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # the decision is the only line on stdout
    line = json.loads(out)
    assert line["passed"] is True and line["registry"]["aliases"] == ["candidate", "champion"]
    with pytest.raises(SystemExit) as exited:
        main(["gate", "--checkpoint", bad, *arguments])
    assert exited.value.code == 3  # the gate's own exit status, distinct from a failure
    assert json.loads(capsys.readouterr().out.strip())["passed"] is False
