"""Exit statuses mean something: 0 success (a SIGTERM stop included), 2 bad input, 3 gate rejected, 1 a job that
could not finish (unreachable services, diverged training), each failure one line on stderr."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipelines.cli import main
from trainer import checkpoint, storage
from trainer.config import load_config
from trainer.data.shapes import write_shapes
from trainer.models import build_model, parameter_groups

MAECLIP = str(Path(sys.executable).parent / "maeclip")
METRIC = "eval/zeroshot/shapes-color/top1"


def _run(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([MAECLIP, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """``maeclip ARGS`` in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maeclip: error:"), stderr
    assert "Traceback" not in stderr
    return lines[0]


def _closed_port() -> int:
    with socket.socket() as sock:  # bound and closed again: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    url = f"file://{tmp_path_factory.mktemp('corpus')}/shapes"
    write_shapes(url, n_train=128, n_eval=16, seed=2)
    return url


def _overrides(corpus: str, root: Path, steps: int) -> list[str]:
    sets = [f"data.url={corpus}", f"train.run_url=file://{root}/run", f"tracking.uri=sqlite:///{root}/mlflow.db",
            f"train.steps={steps}", "train.checkpoint_every=1000", "train.log_every=1", "data.batch_size=8",
            "data.num_workers=1", "optim.warmup_steps=2"]
    return ["--config", "tiny-clip", *[arg for value in sets for arg in ("--set", value)]]


@pytest.fixture(scope="module")
def scored_checkpoint(tmp_path_factory) -> str:
    """A committed checkpoint whose metrics.json says colour top-1 0.2."""
    from evaluators import report

    config = load_config("tiny-clip", [f"train.run_url=file://{tmp_path_factory.mktemp('scored')}"])
    model = build_model(config.model)
    url = checkpoint.save(config.train.run_url, 1, model, torch.optim.AdamW(model.parameters()), config, {})
    report.write_metrics(url, {"step": 1}, {METRIC: 0.2}, ["quick"])
    return url


def _policy(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "policy.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def test_a_rejected_checkpoint_exits_3_after_its_decision_line(scored_checkpoint, tmp_path, capsys):
    policy = _policy(tmp_path, f"thresholds: [{{metric: {METRIC}, min: 0.5}}]\n")
    with pytest.raises(SystemExit) as exited:
        main(["gate", "--checkpoint", scored_checkpoint, "--policy", policy, "--no-register"])
    assert exited.value.code == 3
    decision = json.loads(capsys.readouterr().out)
    assert decision["passed"] is False and "below its minimum" in decision["reasons"][0]


def test_the_gate_against_a_closed_tracking_port_fails_fast_with_status_1(scored_checkpoint, tmp_path):
    policy = _policy(tmp_path, f"thresholds: [{{metric: {METRIC}, min: 0.1}}]\n")
    started = time.monotonic()
    result = _run("gate", "--checkpoint", scored_checkpoint, "--policy", policy,
                  "--tracking-uri", f"http://127.0.0.1:{_closed_port()}", cwd=tmp_path, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert "127.0.0.1" in _one_error_line(result.stderr)
    assert elapsed < 30, f"an unreachable server took {elapsed:.0f} s to report"
    assert not storage.exists(storage.join(scored_checkpoint, "PROMOTED"))


@pytest.mark.parametrize(("text", "needle"), [
    ("thresholds: []\n", "checks nothing"),
    ("{}\n", "checks nothing"),
    ("thresholds: [{metric: m, min: .nan}]\n", "finite"),
    ("thresholds: [{metric: m, min: 1}\n", "cannot read YAML"),
    (b"thresholds: [{metric: caf\xe9, min: 1}]\n", "UTF-8"),
    ("!!python/object/apply:os.system [touch PWNED]\n", "cannot read YAML"),
    ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
     "g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: [*g, *g, *g, *g, *g, *g, *g, *g, *g]\n", "alias"),
])
def test_a_bad_policy_is_bad_input(scored_checkpoint, tmp_path, capsys, text, needle):
    if isinstance(text, str):
        text = text.replace("PWNED", str(tmp_path / "pwned"))
    code, _, err = _main(capsys, "gate", "--checkpoint", scored_checkpoint, "--policy", _policy(tmp_path, text),
                         "--no-register")
    assert code == 2, err
    line = _one_error_line(err)
    assert needle in line and len(line) < 600
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(("args", "needle"), [
    (["eval", "--checkpoint", "CKPT", "--batch-size", "0"], "--batch-size"),
    (["pipeline", "compile", "--segments", "0", "--out", "OUT/p.yaml"], "--segments"),
    (["pipeline", "compile", "--out", "OUT"], "already exists"),
    (["pipeline", "compile", "--out", "OUT/taken.yaml"], "already exists"),
    (["pipeline", "compile", "--out", "OUT/missing/p.yaml"], "does not exist"),
    (["train", "--nproc-per-node", "abc"], "invalid int value"),
    (["pipeline", "frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_one_line(scored_checkpoint, tmp_path, capsys, args, needle):
    (tmp_path / "taken.yaml").write_text("mine\n")
    code, _, err = _main(capsys, *[a.replace("CKPT", scored_checkpoint).replace("OUT", str(tmp_path)) for a in args])
    assert code == 2, err
    assert needle in _one_error_line(err)
    assert (tmp_path / "taken.yaml").read_text() == "mine\n"  # never overwritten


def test_a_corrupt_index_is_bad_input(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "index.json").write_text('{"shards": [{"samples": "many"}]}')
    result = _run("train", "--config", "tiny-clip", "--set", f"data.url=file://{tmp_path}/data",
                  "--set", f"train.run_url=file://{tmp_path}/r",
                  cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "unreadable MDS index" in _one_error_line(result.stderr)


def test_an_unreachable_pipeline_host_is_one_line_and_status_1_with_the_traceback_only_when_verbose(tmp_path):
    host = f"http://127.0.0.1:{_closed_port()}"
    result = _run("pipeline", "submit", "--host", host, cwd=tmp_path, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "127.0.0.1" in _one_error_line(result.stderr)
    verbose = _run("--verbose", "pipeline", "submit", "--host", host, cwd=tmp_path, timeout=120)
    assert verbose.returncode == 1
    assert "Traceback" in verbose.stderr and verbose.stderr.strip().splitlines()[-1].startswith("maeclip: error:")


def _agent_pid(marker: str, timeout_s: float = 120) -> int:
    """The pid of the trainer.agent process whose command line names ``marker``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    argv = (entry / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if b"trainer.agent" in argv and any(marker.encode() in a for a in argv):
                    return int(entry.name)
        time.sleep(0.2)
    raise AssertionError("no trainer.agent process")


def test_sigterm_to_the_torchrun_agent_is_a_stop_with_status_0(corpus, tmp_path):
    process = subprocess.Popen([MAECLIP, "train", "--nproc-per-node", "2", *_overrides(corpus, tmp_path, 400)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        for line in process.stdout:
            if "[train] step 3/400" in line:
                os.kill(_agent_pid(str(tmp_path)), signal.SIGTERM)  # what the kubelet sends to PID 1
                break
        output = process.stdout.read()
        assert process.wait(timeout=180) == 0, output
    finally:
        process.kill()
    committed = checkpoint.committed_checkpoints(f"file://{tmp_path}/run")
    assert len(committed) == 1 and 3 <= committed[0][0] < 400, output
    assert "stopped on SIGTERM" in output and output.strip().endswith(committed[0][1])


def test_a_non_finite_loss_stops_training_without_a_checkpoint_and_status_1(corpus, tmp_path):
    """Resuming a state whose weights are NaN: the first loss is NaN, and nothing of it may be committed."""
    sets = _overrides(corpus, tmp_path, 6)
    config = load_config("tiny-clip", sets[3::2])
    model = build_model(config.model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    optimizer = torch.optim.AdamW(parameter_groups(model, config.optim.weight_decay))
    checkpoint.save(config.train.run_url, 2, model, optimizer, config, {"samples_seen": 32})

    result = _run("train", "--nproc-per-node", "2", *sets, cwd=tmp_path, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    line = _one_error_line(result.stderr)
    assert "diverged at step 3" in line and "nan" in line
    assert [step for step, _ in checkpoint.committed_checkpoints(config.train.run_url)] == [2]
    assert "the loss is nan at step 3" in result.stdout


def test_a_segment_stopped_before_its_end_fails_its_step_instead_of_being_evaluated(corpus, tmp_path, monkeypatch):
    """A preempted job commits and exits 0; in a pipeline the segment must then fail (and be retried), or the
    variant would be evaluated, and compared, after fewer steps than the others."""
    import trainer.launch

    config = load_config("tiny-clip", _overrides(corpus, tmp_path, 4)[3::2])

    def stopped_at_step_1(*args, **kwargs) -> str:  # what a SIGTERM'd job leaves: one committed checkpoint
        model = build_model(config.model)
        checkpoint.save(config.train.run_url, 1, model, torch.optim.AdamW(model.parameters()), config, {})
        return "handle"

    monkeypatch.setattr(trainer.launch, "launch_training", stopped_at_step_1)
    with pytest.raises(trainer.launch.TrainingStopped, match="stopped at step 1, before the end of segment 2 of 2"):
        trainer.launch.run_training_segment("tiny-clip", _overrides(corpus, tmp_path, 4)[3::2], segment=2,
                                            segments=2, nproc_per_node=1)
