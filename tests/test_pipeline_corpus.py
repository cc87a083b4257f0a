"""The pipelines' corpus step end to end: ``--corpus existing`` trains ``train_eval`` and a ``study`` on an
ingested corpus in a gs:// bucket and writes nothing into it; ``--corpus shapes`` on a URL holding another
corpus, and ``--corpus existing`` on a corpus without an eval split, stop the CLI with one line and exit 2
before any pipeline step starts, leaving the corpus as it was.

The ingested corpora are built once per module; each pipeline runs once (a single 2-step segment).
"""

import json
import uuid
from pathlib import Path

import pytest
import yaml
from corpora import MAX_PIXELS, make_corpus, object_hashes

from pipelines.cli import main
from pipelines.runner import run_local_pipeline
from pipelines.study import plan_study
from trainer import checkpoint, storage
from trainer.data.ingest import IngestOptions, ingest

COLOR = "eval/zeroshot/shapes-color/top1"
POLICY = {"thresholds": [{"metric": COLOR, "min": 0.0}]}
TRAIN_SAMPLES, EVAL_SAMPLES = 16, 8


def _tiny(cache: Path) -> list[str]:
    """Two training steps of 8 samples in the training process itself; remote shards cached under ``cache``."""
    return ["train.steps=2", "train.log_every=1", "data.batch_size=8", "data.num_workers=0",
            "optim.warmup_steps=1", f"data.cache_dir={cache}"]


def _ingest(src: Path, out: str, *, with_eval: bool = True) -> str:
    """A caption-only corpus at ``out``: ``TRAIN_SAMPLES`` good train samples, ``EVAL_SAMPLES`` eval ones (plus
    the bad samples ingest skips)."""
    options = {"format": "csv", "resize": 32, "max_pixels": MAX_PIXELS}
    make_corpus("csv", src / "train", shards=1, per_shard=TRAIN_SAMPLES)
    ingest(f"file://{src}/train", out, IngestOptions(split="train", **options))
    if with_eval:
        make_corpus("csv", src / "eval", shards=1, per_shard=EVAL_SAMPLES)
        ingest(f"file://{src}/eval", out, IngestOptions(split="eval", **options))
    return out


@pytest.fixture(scope="module")
def gs_corpus(gcs_emulator, tmp_path_factory) -> dict:
    """An ingested corpus in the emulated bucket and the hashes of all its objects, taken right after ingest."""
    url = _ingest(tmp_path_factory.mktemp("gs-src"), f"{gcs_emulator}/{uuid.uuid4().hex[:10]}/corpus")
    hashes = object_hashes(url)
    assert {"/manifest.json", "/train/index.json", "/eval/index.json"} <= set(hashes)
    return {"url": url, "hashes": hashes}


@pytest.fixture(scope="module")
def file_corpora(tmp_path_factory) -> dict[str, str]:
    """Two ingested corpora on file://: ``whole`` (train and eval) and ``no_eval`` (train only)."""
    root = tmp_path_factory.mktemp("file-corpora")
    return {"whole": _ingest(root / "src", f"file://{root}/whole"),
            "no_eval": _ingest(root / "src-train-only", f"file://{root}/no-eval", with_eval=False)}


def _config(checkpoint_url: str) -> dict:
    return yaml.safe_load(storage.read_text(storage.join(checkpoint_url, "config.yaml")))


def _trained_on(run_url: str, data_url: str) -> None:
    """The run committed its 2-step checkpoint, trained on ``data_url``, and the gate judged it."""
    found = checkpoint.committed_checkpoints(run_url)
    assert [step for step, _ in found] == [2], found
    url = found[0][1]
    assert _config(url)["data"]["url"] == data_url
    assert checkpoint.read_meta(url)["samples_seen"] == 2 * 8
    # the caption-only corpus has no shapes labels: no zero-shot metric, so the gate rejects it
    assert storage.exists(storage.join(url, "REJECTED")) and not storage.exists(storage.join(url, "PROMOTED"))


def test_train_eval_trains_on_an_existing_gs_corpus_and_leaves_it_byte_identical(gs_corpus, tmp_path):
    record = run_local_pipeline(
        "train_eval", 1, pipeline_root=str(tmp_path / "kfp"), preset="tiny-clip", overrides=_tiny(tmp_path / "c"),
        corpus="existing", data_url=gs_corpus["url"], run_url=f"file://{tmp_path}/run",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", nproc_per_node=1, gate_policy=POLICY, model_name="tiny")
    _trained_on(f"file://{tmp_path}/run", gs_corpus["url"])
    assert json.loads(record)["registered"] is None
    assert object_hashes(gs_corpus["url"]) == gs_corpus["hashes"]


def test_a_study_trains_on_an_existing_gs_corpus_and_leaves_it_byte_identical(gs_corpus, tmp_path):
    runs_url, uri = f"file://{tmp_path}/runs", f"sqlite:///{tmp_path}/mlflow.db"
    variants = plan_study(["clip"], ["cls"], [0], [0], preset_pattern="tiny-{arm}", overrides=_tiny(tmp_path / "c"),
                          runs_url=runs_url, experiment="gs-study", model_name="tiny", suite="quick", policy=POLICY)
    run_local_pipeline(
        "study", 1, pipeline_root=str(tmp_path / "kfp"), variants=variants, corpus="existing",
        data_url=gs_corpus["url"], runs_url=runs_url, tracking_uri=uri, experiment="gs-study",
        study_name="gs-study", nproc_per_node=1)
    (planned,) = variants
    _trained_on(planned["run_url"], gs_corpus["url"])
    assert object_hashes(gs_corpus["url"]) == gs_corpus["hashes"]


def _refused(argv: list[str], tmp_path: Path, monkeypatch, capsys) -> str:
    """Run the CLI in ``tmp_path``; assert exit 2, nothing started; return the one stderr line."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main(["pipeline", "run", "--local", *argv, "--set", "train.steps=2", "--run-url", f"file://{run}"])
    lines = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("maeclip: error: "), lines
    assert not run.exists() and not (tmp_path / ".maeclip" / "kfp").exists()
    return lines[0]


@pytest.mark.parametrize("pipeline", ["train_eval", "study"])
def test_shapes_on_an_ingested_corpus_is_refused_before_any_step(pipeline, file_corpora, tmp_path, monkeypatch,
                                                                 capsys):
    url = file_corpora["whole"]
    before = object_hashes(url)
    line = _refused(["--pipeline", pipeline, "--corpus", "shapes", "--data-url", url], tmp_path, monkeypatch, capsys)
    assert f"{url} holds an ingested corpus" in line, line
    assert object_hashes(url) == before


@pytest.mark.parametrize("pipeline", ["train_eval", "study"])
def test_existing_without_an_eval_split_is_refused_before_any_step(pipeline, file_corpora, tmp_path, monkeypatch,
                                                                   capsys):
    url = file_corpora["no_eval"]
    before = object_hashes(url)
    line = _refused(["--pipeline", pipeline, "--corpus", "existing", "--data-url", url], tmp_path, monkeypatch,
                    capsys)
    assert f"the corpus at {url} has no eval split" in line and f"{url}/eval/index.json is missing" in line, line
    assert object_hashes(url) == before
