"""A local pipeline run prints one line per task as it starts and ends, the training step lines and a study's
progress; each task's whole output is in its log file, and a failed task prints that file's path and last lines."""

import io
import json
import re
import sys
from pathlib import Path

import pytest

from pipelines.progress import TAIL_LINES, TaskLog, key_metrics, variant_label
from pipelines.runner import PipelineFailed, run_local_pipeline

# What a component prints, as kfp's executor and torchrun frame it: noise, a rank-0 step line, the summary.
TASK_SCRIPT = """
import sys
for i in range(40):
    print(f"[KFP Executor] noise {i}")
print("[0]:[train] step 10/20 loss 2.5000 lr 1.00e-03 100.0 samples/s")
print("[0]:[train] step 20/20 loss 1.2500 lr 5.00e-04 100.0 samples/s")
print("maeclip-summary: → step-000000020")
sys.exit(int(sys.argv[1]))
"""


def _command(code: int, task: str = "train-segment", **parameters) -> list[str]:
    executor_input = {"inputs": {"parameterValues": parameters},
                      "outputs": {"outputFile": f"/kfp/run/{task}/executor_output.json"}}
    return [sys.executable, "-c", TASK_SCRIPT, str(code), "--executor_input", json.dumps(executor_input)]


def test_a_task_is_a_start_line_its_step_lines_and_an_end_line_with_its_summary(tmp_path):
    out = io.StringIO()
    tasks = TaskLog(tmp_path, out)
    code = tasks.run_task(_command(0, overrides=["train.steps=20", "name=clip-cls-n256-seed0"], segment=1,
                                   segments=2))
    lines = out.getvalue().splitlines()
    assert code == 0 and len(lines) == 4, lines
    assert lines[0].endswith("▶ train-segment clip-cls-n256-seed0 segment 1/2")
    assert lines[1].strip() == "clip-cls-n256-seed0 segment 1/2: step 10/20 loss 2.5000 lr 1.00e-03 100.0 samples/s"
    assert re.search(r"✓ train-segment clip-cls-n256-seed0 segment 1/2 done \(\d+ s\): → step-000000020$", lines[3])
    (log,) = tmp_path.glob("*.log")
    assert log.name == "train-segment-clip-cls-n256-seed0_segment_1_2.log"
    assert "noise 39" in log.read_text() and "maeclip-summary" in log.read_text()  # the whole output


def test_a_failed_task_prints_its_log_path_and_last_lines(tmp_path):
    out = io.StringIO()
    tasks = TaskLog(tmp_path, out)
    assert tasks.run_task(_command(3, task="evaluate")) == 3
    text = out.getvalue()
    (log,) = tmp_path.glob("*.log")
    assert "✗ evaluate failed after" in text and f"its log: {log}" in text
    tail = [line.removeprefix("    | ") for line in text.splitlines() if line.startswith("    | ")]
    assert tail == log.read_text().splitlines()[-TAIL_LINES:]
    assert tasks.failed == [("evaluate", log)]


def test_a_study_counts_its_variants_as_they_register(tmp_path):
    out = io.StringIO()
    tasks = TaskLog(tmp_path, out, variants=2)
    for name in ("a", "b"):
        tasks.run_task(_command(0, task="register", run_url=f"file:///runs/{name}"))
        tasks.run_task(_command(0, task="register", run_url=f"file:///runs/{name}"))  # a retry: a file of its own
    counts = [line.strip() for line in out.getvalue().splitlines() if "variants done" in line]
    assert counts[:2] == ["study: 1/2 variants done", "study: 2/2 variants done"]
    assert sorted(p.name for p in tmp_path.glob("*.log")) == ["register-a.2.log", "register-a.log",
                                                             "register-b.2.log", "register-b.log"]


@pytest.mark.parametrize(("parameters", "label"), [
    ({"checkpoint_url": "file:///r/clip-gap-n64-seed1/checkpoints/step-000000100"}, "clip-gap-n64-seed1 step 100"),
    ({"run_url": "gs://b/runs/tiny-clip-20261201", "segments": 1, "segment": 1}, "tiny-clip-20261201"),
    ({"preset": "tiny-clip", "overrides": ["train.steps=4"], "segments": 2, "segment": 2}, "tiny-clip segment 2/2"),
    ({"corpus": "shapes", "data_url": "file:///d"}, ""),
])
def test_the_label_says_which_variant_segment_or_step(parameters, label):
    assert variant_label(parameters) == label


def test_key_metrics_are_the_top1_accuracies():
    metrics = {"eval/zeroshot/b/top1": 0.5, "eval/zeroshot/a/top1": 0.25, "eval/zeroshot/a/top5": 1.0}
    assert key_metrics(metrics) == "zeroshot/a/top1 0.250, zeroshot/b/top1 0.500"
    assert key_metrics(metrics, limit=1) == "zeroshot/a/top1 0.250 (+1 more)"
    assert key_metrics({"eval/retrieval/corpus/i2t/r@1": 0.1}) == "1 metrics"


def test_a_pipeline_is_a_few_lines_and_its_tasks_logs(tmp_path):
    out = io.StringIO()
    record = run_local_pipeline(
        "train_eval", 1, pipeline_root=str(tmp_path / "kfp"), out=out, preset="tiny-clip",
        overrides=["train.steps=4", "train.log_every=2", "data.batch_size=16", "data.num_workers=1",
                   "optim.warmup_steps=1"],
        data_url=f"file://{tmp_path}/shapes", run_url=f"file://{tmp_path}/run",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", nproc_per_node=1, n_train=128, n_eval=32, model_name="tiny",
        gate_policy={"thresholds": [{"metric": "eval/zeroshot/shapes-color/top1", "min": 0.0}]})
    assert json.loads(record)["decision"]["passed"]
    lines = out.getvalue().splitlines()
    tasks = ["prepare-corpus", "train-segment", "evaluate", "gate", "register"]
    assert [line.split()[2] for line in lines if "▶" in line] == tasks
    ends = [line for line in lines if "✓" in line]
    assert [line.split()[2] for line in ends] == tasks
    assert "step-000000004" in ends[1] and "zeroshot/shapes-color/top1" in ends[2]
    assert ends[3].endswith("PROMOTED") and ends[4].endswith("tiny version 1")
    assert [line.split(": ", 1)[1].split(" loss")[0] for line in lines if "loss" in line] == ["step 2/4", "step 4/4"]
    assert len(lines) == 2 * len(tasks) + 2  # nothing else: no executor input, no Streaming or torchrun notices
    logs = {p.name: p.read_text() for p in (tmp_path / "logs").glob("train_eval-*/*.log")}
    assert "Got executor_input" in logs["prepare-corpus.log"] and "kfp.log" in logs
    assert any("[train] step 4/4" in text for name, text in logs.items() if name.startswith("train-segment"))


def test_a_failing_task_fails_the_run_naming_its_log(tmp_path):
    out = io.StringIO()
    with pytest.raises(PipelineFailed, match=r"task prepare-corpus failed; its log: .*prepare-corpus\.log") as err:
        run_local_pipeline("train_eval", 1, pipeline_root=str(tmp_path / "kfp"), out=out, corpus="no-such-kind",
                           data_url=f"file://{tmp_path}/shapes", run_url=f"file://{tmp_path}/run",
                           tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", preset="tiny-clip", nproc_per_node=1)
    log = Path(str(err.value).rsplit("its log: ", 1)[1])
    assert "unknown corpus kind 'no-such-kind'" in log.read_text()
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("▶ prepare-corpus") and f"its log: {log}" in lines[1]
    assert "unknown corpus kind 'no-such-kind'" in lines[-1]  # the last line of the log is the error
    assert len(lines) == 2 + TAIL_LINES


def test_verbose_streams_every_tasks_whole_output_and_writes_no_logs(tmp_path, capfd):
    with pytest.raises(RuntimeError, match="FAILURE") as err:
        run_local_pipeline("train_eval", 1, pipeline_root=str(tmp_path / "kfp"), verbose=True, corpus="no-such-kind",
                           data_url=f"file://{tmp_path}/shapes", run_url=f"file://{tmp_path}/run",
                           tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", preset="tiny-clip", nproc_per_node=1)
    assert not isinstance(err.value, PipelineFailed)  # kfp's own error: no log file to name
    out = capfd.readouterr().out
    assert "Got executor_input" in out and "unknown corpus kind 'no-such-kind'" in out  # kfp's whole stream
    assert not (tmp_path / "logs").exists()
