"""The compiled kfp IR of ``train_eval``: tasks, their order, the gate's two branches."""

from pathlib import Path

import yaml

from pipelines.cli import compile_pipeline


def test_train_eval_compiles_to_a_gated_chain(tmp_path):
    path = Path(compile_pipeline(str(tmp_path / "train_eval.yaml")))
    spec = yaml.safe_load(path.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"shapes-corpus", "train-segment", "evaluate", "condition-branches-1"}
    assert tasks["train-segment"]["dependentTasks"] == ["shapes-corpus"]
    assert tasks["evaluate"]["dependentTasks"] == ["train-segment"]
    assert tasks["train-segment"]["cachingOptions"].get("enableCache", False) is False
    branches = spec["components"]["comp-condition-branches-1"]["dag"]["tasks"]
    pass_branch, fail_branch = branches["condition-2"], branches["condition-3"]
    metric, threshold = "pipelinechannel--evaluate-metric", "pipelinechannel--gate_threshold"
    assert pass_branch["triggerPolicy"]["condition"] == (
        f"inputs.parameter_values['{metric}'] >= inputs.parameter_values['{threshold}']"
    )
    assert fail_branch["triggerPolicy"]["condition"] == f"!({pass_branch['triggerPolicy']['condition']})"
    assert set(spec["components"]["comp-condition-2"]["dag"]["tasks"]) == {"promote"}
    assert set(spec["components"]["comp-condition-3"]["dag"]["tasks"]) == {"reject"}
    # components never pip-install at run time (offline local runs; the image carries maeclip)
    for executor in spec["deploymentSpec"]["executors"].values():
        assert "pip install" not in " ".join(executor["container"]["command"])
