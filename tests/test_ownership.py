"""maeclip never deletes or overwrites data it did not write (docs/contracts.md §8): a run URL must be empty or a
maeclip run, retention deletes only our own committed checkpoints, the registry writes only into a registered
model maeclip created, and metrics.json goes only into committed checkpoints."""

import json
import signal
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from small_models import model_and_optimizer

import trainer.launch
import trainer.train
from evaluators import report
from evaluators.gate import load_policy, run_gate
from evaluators.registry import CANDIDATE, CHAMPION, OWNER, OWNER_TAG, Registry, RegistryInUse, Version
from pipelines.cli import main
from trainer import checkpoint, storage
from trainer.checkpoint import RUN_MARKER, RunInUse, claim_run
from trainer.config import load_config, to_yaml
from trainer.data.shapes import write_shapes

METRIC = "eval/zeroshot/shapes-color/top1"


def _save(run_url: str, step: int, *extra: str) -> str:
    config = load_config("tiny-clip", [f"train.run_url={run_url}", *extra])
    model, optimizer = model_and_optimizer(step)
    return checkpoint.save(run_url, step, model, optimizer, config, {"samples_seen": step})


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _write(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


# ---------------------------------------------------------------------------------------------------------
# Run URLs.


def test_claim_marks_an_empty_run_url_and_accepts_it_again(run_url):
    storage.check_writable(run_url)  # its probe, written and removed again, is not someone else's data
    claim_run(run_url)
    marker = json.loads(storage.read_text(storage.join(run_url, RUN_MARKER)))
    assert marker["by"] == "maeclip" and isinstance(marker["created"], float)
    storage.write_text(storage.join(run_url, "config.yaml"), "written by training\n")
    claim_run(run_url)  # ours now, whatever training wrote since
    assert json.loads(storage.read_text(storage.join(run_url, RUN_MARKER))) == marker


def test_claim_refuses_a_run_url_holding_foreign_data_and_writes_nothing(run_url):
    storage.write_text(storage.join(run_url, "notes.txt"), "mine")
    storage.write_text(storage.join(run_url, ".maeclip-write-probe"), "ok")  # a probe left by a crash: ignored
    with pytest.raises(RunInUse, match=r"holds data maeclip did not write \('notes.txt'\)") as refused:
        claim_run(run_url)
    assert run_url in str(refused.value) and isinstance(refused.value, ValueError)
    assert storage.list_dir(run_url) == [".maeclip-write-probe", "notes.txt"]


def test_claim_names_a_few_entries_on_one_bounded_line(tmp_path):
    _write(tmp_path, {f"file-{i}\nline": b"x" for i in range(20)} | {"x" * 200: b"x"})
    with pytest.raises(RunInUse) as refused:
        claim_run(f"file://{tmp_path}")
    message = str(refused.value)
    assert "\n" not in message and len(message) < 600 and "and 16 more" in message


def test_claim_adopts_a_run_an_older_maeclip_wrote(tmp_path):
    run = f"file://{tmp_path}/run"
    _save(run, 2)
    storage.write_text(storage.join(run, "config.yaml"), to_yaml(load_config("tiny-clip", [])))
    before = _snapshot(tmp_path / "run")
    claim_run(run)
    after = _snapshot(tmp_path / "run")
    assert after.pop(RUN_MARKER) is not None and after == before


@pytest.mark.parametrize("files", [
    {"checkpoints/step-000000001/COMMITTED": b"", "checkpoints/step-000000001/model.bin": b"theirs"},
    {"checkpoints/step-000000001/COMMITTED": b"", "checkpoints/step-000000001/meta.json": b'{"step": 1}'},
    {"config.yaml": b"theirs: 1\n"},
], ids=["committed-without-meta", "meta-without-digest", "config-only"])
def test_claim_does_not_adopt_what_only_looks_like_a_run(tmp_path, files):
    _write(tmp_path, files)
    before = _snapshot(tmp_path)
    with pytest.raises(RunInUse):
        claim_run(f"file://{tmp_path}")
    assert _snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    url = f"file://{tmp_path_factory.mktemp('corpus')}/shapes"
    write_shapes(url, n_train=16, n_eval=8, seed=0)
    return url


@pytest.fixture
def launches(monkeypatch) -> list:
    calls: list = []
    monkeypatch.setattr(trainer.launch, "launch_training", lambda *a, **k: calls.append((a, k)) or "handle")
    return calls


def _train(capsys, corpus: str, run: Path) -> tuple[int | str | None, str, str]:
    argv = ["train", "--config", "tiny-clip", "--set", f"data.url={corpus}", "--set", f"train.run_url=file://{run}"]
    code: int | str | None = 0
    try:
        main(argv)
    except SystemExit as exited:
        code = exited.code
    out, err = capsys.readouterr()
    return code, out, err


def test_train_into_a_run_url_holding_a_foreign_file_exits_2_and_launches_nothing(tmp_path, corpus, launches,
                                                                                 capsys):
    run = tmp_path / "run"
    _write(run, {"notes.txt": b"my notes", "data/part-0.bin": bytes(range(256))})
    before = _snapshot(run)
    code, out, err = _train(capsys, corpus, run)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maeclip: error: run URL "), err
    assert f"file://{run}" in lines[0] and "'notes.txt'" in lines[0] and "'data'" in lines[0]
    assert out == "" and launches == []
    assert _snapshot(run) == before  # byte-identical: no marker, no probe, no config


def test_train_into_an_empty_run_url_marks_it_and_launches(tmp_path, corpus, launches, monkeypatch, capsys):
    run = tmp_path / "run"

    def launch(*args, **kwargs):  # recorded, and commits a checkpoint as training would
        launches.append((args, kwargs))
        return _save(f"file://{run}", len(launches), f"data.url={corpus}")

    monkeypatch.setattr(trainer.launch, "launch_training", launch)
    code, out, err = _train(capsys, corpus, run)
    assert code == 0, err
    assert len(launches) == 1 and out.strip().endswith("step-000000001")
    assert json.loads((run / RUN_MARKER).read_text())["by"] == "maeclip"
    assert sorted(p.name for p in run.iterdir()) == [RUN_MARKER, "checkpoints"]
    code, out, err = _train(capsys, corpus, run)  # the marked run URL is ours from now on
    assert code == 0 and len(launches) == 2 and out.strip().endswith("step-000000002"), err


def test_train_adopts_an_old_style_run_and_launches(tmp_path, corpus, launches, capsys):
    run = tmp_path / "run"
    newest = _save(f"file://{run}", 3, f"data.url={corpus}")
    (run / "config.yaml").write_text(to_yaml(load_config("tiny-clip", [f"data.url={corpus}"])))
    before = _snapshot(run)
    code, out, err = _train(capsys, corpus, run)
    assert code == 0, err
    assert out.strip() == newest and len(launches) == 1
    after = _snapshot(run)
    assert json.loads(after.pop(RUN_MARKER))["by"] == "maeclip" and after == before


@pytest.fixture
def sigterm_restored():
    # train() installs its own SIGTERM handler (StopSignal): give the test process its own back.
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_the_training_entry_point_refuses_a_foreign_run_url_before_writing(tmp_path, monkeypatch,
                                                                          sigterm_restored):
    run = tmp_path / "run"
    _write(run, {"notes.txt": b"my notes"})
    before = _snapshot(run)
    monkeypatch.setattr(trainer.train, "build_train_loader", lambda config: None)  # no corpus needed to refuse
    config = load_config("tiny-clip", [f"train.run_url=file://{run}", f"tracking.uri=sqlite:///{tmp_path}/m.db"])
    with pytest.raises(RunInUse, match=r"notes\.txt"):
        trainer.train.train(config)  # `python -m trainer.train`, started without the CLI's preflight
    assert _snapshot(run) == before
    assert not (tmp_path / "m.db").exists()  # refused before any MLflow run was started


# ---------------------------------------------------------------------------------------------------------
# Retention.


def test_retention_deletes_only_our_committed_checkpoints(tmp_path):
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    foreign = {
        "checkpoints/notes.txt": b"my notes",
        # Shaped like checkpoints, but not written by _commit: one without meta.json, one without a digest.
        "checkpoints/step-000000001/COMMITTED": b"", "checkpoints/step-000000001/model.bin": b"theirs",
        "checkpoints/step-000000000/COMMITTED": b"", "checkpoints/step-000000000/meta.json": b'{"step": 0}',
    }
    _write(run, foreign)
    for step in (2, 3, 4):
        _save(f"file://{run}", step, "train.keep_last=1")
    for name, data in foreign.items():
        assert (run / name).read_bytes() == data, name
    assert sorted(p.name for p in checkpoints.iterdir()) == ["notes.txt", "step-000000000", "step-000000001",
                                                             "step-000000004"]


def test_retention_keeps_the_last_of_ours_even_when_a_foreign_step_is_newer(tmp_path):
    run = tmp_path / "run"
    _write(run, {"checkpoints/step-000000099/COMMITTED": b""})
    for step in (1, 2):
        _save(f"file://{run}", step, "train.keep_last=1")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000000002", "step-000000099"]


# ---------------------------------------------------------------------------------------------------------
# Registry (a sqlite MLflow store with artifacts under the test's folder).


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    MlflowClient(uri).search_experiments()  # creates the schema once for the module
    return uri


@pytest.fixture
def name() -> str:
    """A fresh model name."""
    return f"m-{uuid.uuid4().hex[:8]}"


def _scored(tmp_path: Path, step: int, value: float) -> str:
    url = _save(f"file://{tmp_path}/run", step)
    report.write_metrics(url, {"step": step}, {METRIC: value}, ["quick"])
    return url


POLICY = load_policy({"thresholds": [{"metric": METRIC, "min": 0.3}],
                      "champion": {"metric": METRIC, "tolerance": 0.05}})


def _foreign_model(uri: str, model: str, tmp_path: Path) -> MlflowClient:
    """A registered model someone else made (no maeclip tag), with version 1 as champion."""
    mlflow = MlflowClient(uri)
    experiment = mlflow.create_experiment(f"theirs-{model}", artifact_location=f"file://{tmp_path}/theirs")
    run = mlflow.create_run(experiment)
    mlflow.create_registered_model(model)
    mlflow.create_model_version(model, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    mlflow.set_registered_model_alias(model, CHAMPION, "1")
    return mlflow


def _aliases(mlflow: MlflowClient, model: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in mlflow.get_registered_model(model).aliases.items()}


def test_the_gate_refuses_a_registered_model_maeclip_did_not_create(store, name, tmp_path, capsys):
    mlflow = _foreign_model(store, name, tmp_path)
    url = _scored(tmp_path, 1, 0.9)
    with pytest.raises(RegistryInUse, match=rf"registered model '{name}' was not created by maeclip"):
        run_gate(url, POLICY, model_name=name, tracking_uri=store)
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"thresholds:\n  - metric: {METRIC}\n    min: 0.3\n")
    with pytest.raises(SystemExit) as exited:
        main(["gate", "--checkpoint", url, "--policy", str(policy), "--tracking-uri", store, "--model-name", name])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "not created by maeclip" in err
    assert _aliases(mlflow, name) == {CHAMPION: "1"} and OWNER_TAG not in mlflow.get_registered_model(name).tags
    assert [str(v.version) for v in mlflow.search_model_versions(f"name='{name}'")] == ["1"]
    assert not storage.exists(storage.join(url, "PROMOTED"))
    everywhere = [e.experiment_id for e in mlflow.search_experiments()]
    assert mlflow.search_runs(everywhere, filter_string=f"tags.checkpoint_url = '{url}'") == []


def test_a_registered_model_maeclip_created_works_as_before(store, name, tmp_path):
    first = run_gate(_scored(tmp_path, 1, 0.6), POLICY, model_name=name, tracking_uri=store)
    second = run_gate(_scored(tmp_path, 2, 0.7), POLICY, model_name=name, tracking_uri=store)
    assert first.passed and first.registry["aliases"] == [CANDIDATE, CHAMPION]
    assert second.passed and second.registry["aliases"] == [CANDIDATE, CHAMPION]
    mlflow = MlflowClient(store)
    assert mlflow.get_registered_model(name).tags[OWNER_TAG] == OWNER
    assert _aliases(mlflow, name) == {CANDIDATE: "2", CHAMPION: "2"}
    assert all(v.tags[OWNER_TAG] == OWNER for v in mlflow.search_model_versions(f"name='{name}'"))


def test_no_alias_is_pointed_at_a_version_maeclip_did_not_create(store, name, tmp_path):
    run_gate(_scored(tmp_path, 1, 0.6), POLICY, model_name=name, tracking_uri=store)  # ours: version 1
    mlflow = MlflowClient(store)
    run = mlflow.create_run(mlflow.create_experiment(f"theirs-{name}", artifact_location=f"file://{tmp_path}/theirs"))
    theirs = mlflow.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    with pytest.raises(RegistryInUse, match=rf"version {theirs.version} of registered model '{name}'"):
        Registry(store, name).set_alias(CHAMPION, Version(theirs.version, "", {}))
    assert _aliases(mlflow, name) == {CANDIDATE: "1", CHAMPION: "1"}


@pytest.mark.parametrize("tampered", ["../../theirs", "registered/step-000000001/../../x", "/etc"])
def test_a_rewritten_artifact_path_tag_is_refused_before_anything_is_read(store, name, tmp_path, tampered):
    """The champion's metrics come from its files; a version tag pointing elsewhere is not followed."""
    run_gate(_scored(tmp_path, 1, 0.6), POLICY, model_name=name, tracking_uri=store)
    mlflow = MlflowClient(store)
    assert Registry(store, name).by_alias(CHAMPION).metrics[METRIC] == 0.6
    mlflow.set_model_version_tag(name, "1", "artifact_path", tampered)
    with pytest.raises(ValueError, match="artifact_path tag is not one maeclip writes"):
        Registry(store, name).by_alias(CHAMPION)


# ---------------------------------------------------------------------------------------------------------
# Evaluation output.


@pytest.mark.parametrize("layout", ["plain-folder", "uncommitted-step"])
def test_write_metrics_refuses_a_folder_that_is_not_a_committed_checkpoint(tmp_path, layout):
    folder = tmp_path / "data" if layout == "plain-folder" else tmp_path / "run" / "checkpoints" / "step-000000001"
    _write(folder, {"metrics.json": b'{"theirs": true}', "other.bin": b"x"})
    before = _snapshot(tmp_path)
    with pytest.raises(FileNotFoundError, match="no committed checkpoint at"):
        report.write_metrics(f"file://{folder}", {"step": 1}, {METRIC: 0.5}, ["quick"])
    assert _snapshot(tmp_path) == before
