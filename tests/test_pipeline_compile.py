"""The compiled kfp IR of ``train_eval`` and ``study``: tasks, their order, the gates' nested conditions, the
study's fan-out and fan-in, and the Kubernetes platform config (GPU nodes, /dev/shm, secrets)."""

from pathlib import Path

import pytest
import yaml

from pipelines.runner import compile_pipeline

PASSED = "inputs.parameter_values['pipelinechannel--gate-Output'] == true"


def _compile(tmp_path: Path, name: str, segments: int) -> tuple[dict, dict]:
    """(pipeline spec, Kubernetes platform spec) of a freshly compiled pipeline."""
    path = Path(compile_pipeline(str(tmp_path / f"{name}.yaml"), name, segments))
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _dag(spec: dict, component: str) -> dict:
    return spec["components"][component]["dag"]["tasks"]


def _ref(task: dict) -> str:
    return task["componentRef"]["name"]


def _segment(spec: dict, component: str) -> tuple[dict, str, str]:
    """A segment's own tasks, and the components of its gate-passed and gate-failed branches."""
    tasks = _dag(spec, component)
    assert tasks["evaluate"]["dependentTasks"] == ["train-segment"]
    assert tasks["gate"]["dependentTasks"] == ["evaluate"]
    assert tasks["train-segment"]["cachingOptions"].get("enableCache", False) is False
    branches = _dag(spec, _ref(tasks["condition-branches-1"]))
    assert tasks["condition-branches-1"]["dependentTasks"] == ["gate"]
    passed, failed = branches["condition-2"], branches["condition-3"]
    assert passed["triggerPolicy"]["condition"] == PASSED
    assert failed["triggerPolicy"]["condition"] == f"!({PASSED})"
    return tasks, _ref(passed), _ref(failed)


def _only_task(spec: dict, component: str) -> dict:
    (task,) = _dag(spec, component).values()
    return task


@pytest.mark.parametrize("segments", [1, 3])
def test_train_eval_chains_segments_behind_their_gates(tmp_path, segments):
    spec, _ = _compile(tmp_path, "train_eval", segments)
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"prepare-corpus", f"segment-1-of-{segments}"}
    assert root[f"segment-1-of-{segments}"]["dependentTasks"] == ["prepare-corpus"]
    component = _ref(root[f"segment-1-of-{segments}"])
    for segment in range(1, segments + 1):
        assert component == f"comp-segment-{segment}-of-{segments}"
        tasks, passed, failed = _segment(spec, component)
        assert set(tasks) == {"train-segment", "evaluate", "gate", "condition-branches-1"}
        assert tasks["train-segment"]["inputs"]["parameters"]["segment"]["runtimeValue"]["constant"] == segment
        # a failed gate registers at once (the best checkpoint that passed so far) and stops the chain
        assert _ref(_only_task(spec, failed)).startswith("comp-register")
        following = _only_task(spec, passed)
        component = _ref(following)
    assert component.startswith("comp-register")  # after the last passing gate: register


def test_study_fans_out_over_the_planned_grid_and_collects_into_the_report(tmp_path):
    spec, _ = _compile(tmp_path, "study", 2)
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"prepare-corpus", "open-study", "for-loop-1", "report"}
    loop = root["for-loop-1"]
    assert loop["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--variants"}
    assert sorted(loop["dependentTasks"]) == ["open-study", "prepare-corpus"]  # variants start after both
    (variant,) = _dag(spec, "comp-for-loop-1").values()  # the plan is the loop item: no planning step
    report = root["report"]
    assert report["dependentTasks"] == ["for-loop-1"]
    assert report["inputs"]["parameters"]["records"]["taskOutputParameter"]["producerTask"] == "for-loop-1"
    # equal compute: both segments train, each gated, whatever a gate decides; no condition anywhere
    tasks = _dag(spec, _ref(variant))
    assert {_ref(t).removeprefix("comp-").rstrip("-0123456789") for t in tasks.values()} == {
        "train-segment", "evaluate", "gate", "register"}
    segments = sorted(t["inputs"]["parameters"]["segment"]["runtimeValue"]["constant"]
                      for t in tasks.values() if _ref(t).startswith("comp-train-segment"))
    assert segments == [1, 2]
    assert not any("triggerPolicy" in t for t in tasks.values())
    second = next(name for name, t in tasks.items() if _ref(t).startswith("comp-train-segment")
                  and t["inputs"]["parameters"]["segment"]["runtimeValue"]["constant"] == 2)
    assert any(d.startswith("gate") for d in tasks[second]["dependentTasks"])  # after the first gate, not behind it
    # a stopped or failed training step is retried (it resumes), so no variant is evaluated short of its steps
    assert all(t["retryPolicy"]["maxRetryCount"] == 2 for t in tasks.values()
               if _ref(t).startswith("comp-train-segment"))


@pytest.mark.parametrize("name", ["train_eval", "study"])
def test_steps_get_the_image_parameter_and_evaluation_gpu_nodes_shm_and_secrets(tmp_path, name):
    spec, platform = _compile(tmp_path, name, 2)
    executors = spec["deploymentSpec"]["executors"]
    gpu_steps = {e for e in executors if e.startswith("exec-evaluate")}
    assert len(gpu_steps) == 2  # the evaluation of each of the two segments (training steps only launch TorchX)
    for executor in gpu_steps:
        config = platform[executor]
        assert config["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
        assert config["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert config["emptyDirMounts"] == [{"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory",
                                             "sizeLimit": "16Gi"}]
        assert executors[executor]["container"]["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    image = spec["root"]["inputDefinitions"]["parameters"]["image"]
    assert image["defaultValue"] == "ghcr.io/maeclip/maeclip:0.1.0"
    for executor, definition in executors.items():
        assert definition["container"]["image"] == "{{$.inputs.parameters['pipelinechannel--image']}}"
        # components never pip-install at run time (offline local runs; the image carries maeclip)
        assert "pip install" not in " ".join(definition["container"]["command"])
        secrets = platform[executor]["secretAsEnv"]
        # Only the steps that gate and register sign in to MLflow as the gate, the one identity that may move
        # registry aliases (k8s/README.md, "Identities"); the storage keys are for clusters without workload identity.
        identity = "mlflow-gate" if executor.startswith(("exec-gate", "exec-register")) else "mlflow-pipeline"
        assert [(s["secretName"], s["optional"]) for s in secrets] == [("maeclip-storage", True), (identity, False)]
        assert {m["envVar"] for m in secrets[1]["keyToEnv"]} == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
        if executor not in gpu_steps:
            assert "nodeSelector" not in platform[executor] and "tolerations" not in platform[executor]
