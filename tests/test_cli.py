"""Bad input stops the CLI with one line naming the problem and exit status 2, before anything is launched."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from streaming import MDSWriter

MAECLIP = str(Path(sys.executable).parent / "maeclip")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([MAECLIP, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def _assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("maeclip: error:")
    for needle in needles:
        assert needle in lines[0]
    assert "[train]" not in result.stdout  # no training process ever started


@pytest.mark.parametrize(
    ("url", "needle"),
    [("gs://", "malformed storage URL 'gs://'"), ("ftp://host/data", "unsupported storage scheme 'ftp://'"),
     ("s3://bad bucket/x", "malformed storage URL")],
)
def test_malformed_storage_url(tmp_path, url, needle):
    _assert_one_line_error(_run("train", "--config", "tiny-clip", "--set", f"data.url={url}", cwd=tmp_path),
                           "data.url", needle)


def test_unknown_preset(tmp_path):
    _assert_one_line_error(_run("train", "--config", "tiny-clp", cwd=tmp_path), "unknown preset 'tiny-clp'",
                           "did you mean 'tiny-clip'")


def test_unknown_key(tmp_path):
    _assert_one_line_error(_run("train", "--config", "tiny-clip", "--set", "optim.lrr=1", cwd=tmp_path),
                           "unknown config key 'optim.lrr'", "did you mean 'optim.lr'")


def test_missing_dataset(tmp_path):
    _assert_one_line_error(
        _run("train", "--config", "tiny-clip", "--set", f"data.url=file://{tmp_path}/nothing", cwd=tmp_path),
        f"{tmp_path}/nothing/train",
    )


def test_empty_dataset(tmp_path):
    with MDSWriter(out=str(tmp_path / "empty" / "train"), columns={"key": "str", "image": "bytes",
                                                                   "caption": "str", "meta": "json"}):
        pass
    _assert_one_line_error(
        _run("train", "--config", "tiny-clip", "--set", f"data.url=file://{tmp_path}/empty", cwd=tmp_path),
        "empty",
    )


def test_eval_without_checkpoint(tmp_path):
    _assert_one_line_error(_run("eval", "--checkpoint", f"file://{tmp_path}/run", cwd=tmp_path),
                           "no committed checkpoint")


@pytest.mark.parametrize(
    ("args", "needles"),
    [(["pipeline", "run"], ["needs --local"]),
     (["pipeline", "submit"], ["needs --host"]),
     (["pipeline", "run", "--local", "--set", "optim.lrr=1"], ["unknown config key 'optim.lrr'"]),
     (["pipeline", "run", "--local", "--pipeline", "study", "--arms", "clip", "clp"],
      ["unknown preset 'tiny-clp'"]),
     (["pipeline", "run", "--local", "--pipeline", "study", "--arms", "maeclip"], ["baseline 'clip'"]),
     (["pipeline", "run", "--local", "--pipeline", "study", "--pools", "cls", "avg"], ["model.image_pool", "avg"])],
)
def test_pipeline_usage_errors(tmp_path, args, needles):
    _assert_one_line_error(_run(*args, cwd=tmp_path), *needles)


def test_train_dryrun_prints_the_volcano_job_and_submits_nothing(tmp_path):
    """No cluster and no kubeconfig here: a submission would fail (exit 1). The dry run reads no storage either:
    vit-b16-maeclip-gap's corpus and run URL are gs:// placeholders."""
    result = _run("train", "--config", "vit-b16-maeclip-gap", "--scheduler", "kubernetes", "--nnodes", "2:4",
                  "--nproc-per-node", "8", "--priority-class", "maeclip-study", "--max-retries", "5", "--dryrun",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    job = yaml.safe_load(result.stdout)
    assert (job["kind"], job["metadata"]["namespace"], job["spec"]["maxRetry"]) == ("Job", "maeclip", 5)
    assert [t["template"]["spec"]["priorityClassName"] for t in job["spec"]["tasks"]] == ["maeclip-study"] * 4
    assert list(tmp_path.iterdir()) == []  # no run claimed, no tracking store, nothing written


@pytest.mark.parametrize(
    ("args", "needles"),
    [(["--scheduler", "kubernetes", "--dryrun", "--cpu", "many"], ["argument --cpu: invalid int value: 'many'"]),
     (["--dryrun"], ["--dryrun applies to --scheduler kubernetes"]),
     (["--memory-mb", "4096"], ["--memory-mb applies to --scheduler kubernetes"]),
     (["--scheduler", "kubernetes", "--dryrun", "--service-account", "MLflow"], ["cluster.service_account",
                                                                              "'MLflow'"]),
     (["--scheduler", "kubernetes", "--dryrun", "--memory-mb", "4096", "--shm-mb", "4096"], ["cluster.shm_mb"]),
     (["--scheduler", "kubernetes", "--dryrun", "--max-retries", "-1"], ["cluster.max_retries: -1"]),
     (["--scheduler", "kubernetes", "--dryrun", "--set", "tracking.uri=sqlite:///m.db"], ["tracking.uri"])],
)
def test_bad_cluster_flags_exit_2_with_one_line(tmp_path, args, needles):
    _assert_one_line_error(_run("train", "--config", "tiny-clip", *args, cwd=tmp_path), *needles)
