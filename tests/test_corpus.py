"""Corpus ownership and preparation: shapes and ingest write only into an empty URL or a corpus of their own
(never over foreign data or each other), ``existing`` validates without writing, and the evaluation suite runs
on a caption-only corpus, skipping the tasks whose labels it lacks."""

import json
from pathlib import Path

import pytest
import torch
from corpora import MAX_PIXELS, make_corpus, object_hashes

import trainer.data.ingest as ingest_module
import trainer.data.shapes as shapes_module
from evaluators.heads import Budget
from evaluators.suite import SuiteOptions, run_suite
from trainer import checkpoint, storage
from trainer.config import load_config
from trainer.data.corpus import MARKER, CorpusInUse, check_corpus_target, prepare_corpus, validate_corpus
from trainer.data.ingest import IngestOptions, ingest
from trainer.data.loader import DataError
from trainer.data.shapes import ensure_shapes, write_shapes
from trainer.models import build_model

SIZES = {"n_train": 8, "n_eval": 4, "seed": 1}


def _options(split: str = "train") -> IngestOptions:
    return IngestOptions(format="csv", split=split, resize=32, max_pixels=MAX_PIXELS)


def _root(where: str, tmp_path: Path, request, unique: str) -> str:
    if where == "gs":
        return request.getfixturevalue("gcs_emulator") + f"/{unique}"
    return f"file://{tmp_path}/store"


def _ingested(tmp_path: Path, out: str, *, with_eval: bool = True) -> str:
    make_corpus("csv", tmp_path / "src", shards=1, per_shard=12)
    ingest(f"file://{tmp_path}/src", out, _options())
    if with_eval:
        make_corpus("csv", tmp_path / "eval-src", shards=1, per_shard=10)
        ingest(f"file://{tmp_path}/eval-src", out, _options("eval"))
    return out


def _every_shapes_writer_refuses(url: str, match: str) -> None:
    for write in (lambda: write_shapes(url, **SIZES), lambda: ensure_shapes(url, **SIZES),
                  lambda: prepare_corpus("shapes", url, **SIZES), lambda: check_corpus_target("shapes", url)):
        with pytest.raises(CorpusInUse, match=match):
            write()


@pytest.mark.parametrize("where", ["file", "gs"])
def test_shapes_never_write_over_an_ingested_corpus_or_foreign_files(where, tmp_path, request, unique):
    root = _root(where, tmp_path, request, unique)
    corpus = _ingested(tmp_path, f"{root}/ingested")
    before = object_hashes(corpus)
    _every_shapes_writer_refuses(corpus, rf"{corpus} holds an ingested corpus \(ingest-v2\)")
    assert object_hashes(corpus) == before

    foreign = f"{root}/foreign"
    storage.write_text(f"{foreign}/notes.txt", "someone else's")
    storage.write_bytes(f"{foreign}/train/part-0.bin", b"\x00precious")
    before = object_hashes(foreign)
    _every_shapes_writer_refuses(foreign, rf"{foreign} is not empty and holds no maeclip corpus \(found 'notes.txt'")
    assert object_hashes(foreign) == before

    other = f"{root}/other"
    storage.write_text(f"{other}/manifest.json", json.dumps({"generator": "someone-else-v3"}))
    before = object_hashes(other)
    _every_shapes_writer_refuses(other, "a corpus of another writer .manifest.json generator 'someone-else-v3'.")
    assert object_hashes(other) == before


def test_the_cli_refuses_a_foreign_folder_with_one_line_and_status_2(tmp_path, capsys):
    from pipelines.cli import main

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as stop:
        main(["data", "shapes", "--out", f"file://{tmp_path}/foreign", "--n", "4", "--n-eval", "2"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and "is not empty and holds no maeclip corpus" in lines[0]
    assert [p.name for p in (tmp_path / "foreign").iterdir()] == ["keep.txt"]


def test_shapes_write_an_empty_url_and_rewrite_only_their_own_corpus(tmp_path):
    url = f"file://{tmp_path}/shapes"
    check_corpus_target("shapes", url)  # a URL that does not exist yet is empty
    assert prepare_corpus("shapes", url, **SIZES) == url
    assert json.loads((tmp_path / "shapes" / MARKER).read_text()) == {"generator": "shapes-v1"}
    first = object_hashes(url)
    assert sorted({p.split("/")[1] for p in first}) == [MARKER, "eval", "manifest.json", "train"]
    stamp = (tmp_path / "shapes" / "manifest.json").stat().st_mtime_ns
    assert ensure_shapes(url, **SIZES) == url  # the same corpus: nothing rewritten
    assert object_hashes(url) == first and (tmp_path / "shapes" / "manifest.json").stat().st_mtime_ns == stamp

    ensure_shapes(url, n_train=6, n_eval=3, seed=2)  # another seed and size: its own corpus is rewritten
    reference = write_shapes(f"file://{tmp_path}/reference", n_train=6, n_eval=3, seed=2)
    manifest = json.loads((tmp_path / "shapes" / "manifest.json").read_text())
    assert manifest == reference and manifest["splits"] == {"train": 6, "eval": 3}
    assert object_hashes(url) == object_hashes(f"file://{tmp_path}/reference")


def test_a_killed_shapes_write_is_resumed(tmp_path, monkeypatch):
    url = f"file://{tmp_path}/shapes"
    real = shapes_module.make_sample

    def dies_in_eval(seed, split, index, image_size=64):
        if split == "eval" and index == 2:
            raise KeyboardInterrupt  # as a killed process leaves it: some shards, no manifest
        return real(seed, split, index, image_size)

    monkeypatch.setattr(shapes_module, "make_sample", dies_in_eval)
    with pytest.raises(KeyboardInterrupt):
        ensure_shapes(url, **SIZES)
    monkeypatch.setattr(shapes_module, "make_sample", real)
    assert (tmp_path / "shapes" / MARKER).exists() and not (tmp_path / "shapes" / "manifest.json").exists()
    assert ensure_shapes(url, **SIZES) == url
    write_shapes(f"file://{tmp_path}/reference", **SIZES)
    assert object_hashes(url) == object_hashes(f"file://{tmp_path}/reference")


@pytest.mark.parametrize("where", ["file", "gs"])
def test_ingest_refuses_a_foreign_folder_and_the_shapes_corpus_writing_nothing(where, tmp_path, request, unique):
    root = _root(where, tmp_path, request, unique)
    make_corpus("csv", tmp_path / "src", shards=1, per_shard=2)
    foreign = f"{root}/foreign"
    storage.write_text(f"{foreign}/data.csv", "key,image,caption\n")
    shapes = f"{root}/shapes"
    write_shapes(shapes, **SIZES)
    for url, match in ((foreign, "is not empty and holds no maeclip corpus"),
                       (shapes, r"holds the synthetic shapes corpus \(shapes-v1\), which ingest-v2 never writes")):
        before = object_hashes(url)
        with pytest.raises(CorpusInUse, match=match):
            ingest(f"file://{tmp_path}/src", url, _options())
        with pytest.raises(CorpusInUse, match=match):
            check_corpus_target("ingest", url)
        assert object_hashes(url) == before


def test_a_killed_ingest_is_resumed_as_ours(tmp_path, monkeypatch):
    make_corpus("csv", tmp_path / "src", shards=3, per_shard=2)
    out, src = f"file://{tmp_path}/out", f"file://{tmp_path}/src"
    real, calls = ingest_module.ingest_shard, []

    def dies_on_the_second_shard(job):
        calls.append(job)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(ingest_module, "ingest_shard", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        ingest(src, out, _options())
    monkeypatch.setattr(ingest_module, "ingest_shard", real)
    assert (tmp_path / "out" / MARKER).exists() and not (tmp_path / "out" / "manifest.json").exists()
    rerun = ingest(src, out, _options())
    assert rerun["shards"] == ingest(src, f"file://{tmp_path}/clean", _options())["shards"]


def test_existing_validates_an_ingested_corpus_and_writes_nothing(tmp_path):
    url = _ingested(tmp_path, f"file://{tmp_path}/corpus")
    before = object_hashes(url)
    check_corpus_target("existing", url)
    assert prepare_corpus("existing", url) == url
    assert validate_corpus(url) == {"train": 12, "eval": 10}
    assert object_hashes(url) == before


def test_existing_names_what_is_missing(tmp_path):
    url = _ingested(tmp_path, f"file://{tmp_path}/corpus", with_eval=False)
    before = object_hashes(url)
    no_eval = (rf"the corpus at {url} has no eval split \(evaluation needs one\): {url}/eval/index.json is missing; "
               rf"ingest one with `maeclip data ingest SRC --format FMT --out {url} --split eval`")
    for check in (lambda: prepare_corpus("existing", url), lambda: check_corpus_target("existing", url)):
        with pytest.raises(DataError, match=no_eval):
            check()
    assert object_hashes(url) == before
    with pytest.raises(DataError, match=rf"no corpus at file://{tmp_path}/none: .*manifest.json is missing"):
        prepare_corpus("existing", f"file://{tmp_path}/none")
    with pytest.raises(DataError, match="unknown corpus kind 'found'"):
        check_corpus_target("found", url)


def test_prepare_ingest_takes_the_splits_from_the_source_layout_and_reruns_idempotently(tmp_path):
    make_corpus("csv", tmp_path / "src" / "train", shards=1, per_shard=6)
    make_corpus("csv", tmp_path / "src" / "eval", shards=1, per_shard=3)
    url = f"file://{tmp_path}/corpus"
    kwargs = {"source_url": f"file://{tmp_path}/src", "source_format": "csv", "resize": 32,
              "max_pixels": MAX_PIXELS}
    assert prepare_corpus("ingest", url, **kwargs) == url
    assert validate_corpus(url) == {"train": 6, "eval": 3}
    first = object_hashes(url)
    done = tmp_path / "corpus" / "train" / "part-0" / "done.json"
    stamp = done.stat().st_mtime_ns
    assert prepare_corpus("ingest", url, **kwargs) == url
    assert done.stat().st_mtime_ns == stamp and object_hashes(url) == first

    make_corpus("csv", tmp_path / "flat", shards=1, per_shard=4)  # no eval anywhere: train kept, then refused
    flat = f"file://{tmp_path}/flat-corpus"
    with pytest.raises(DataError, match=r"has no eval split .* --split eval"):
        prepare_corpus("ingest", flat, **{**kwargs, "source_url": f"file://{tmp_path}/flat"})
    assert (tmp_path / "flat-corpus" / "train" / "index.json").exists()
    with pytest.raises(DataError, match="needs source_url and source_format"):
        prepare_corpus("ingest", f"file://{tmp_path}/x")
    with pytest.raises(DataError, match="unknown ingest options split"):
        prepare_corpus("ingest", f"file://{tmp_path}/x", **{**kwargs, "split": "eval"})


def test_the_default_suite_on_a_caption_only_corpus_skips_the_shapes_tasks(tmp_path, capsys):
    corpus = _ingested(tmp_path, f"file://{tmp_path}/corpus")
    config = load_config("tiny-clip", [f"data.url={corpus}", f"train.run_url=file://{tmp_path}/run"])
    torch.manual_seed(0)
    model = build_model(config.model)
    url = checkpoint.save(config.train.run_url, 2, model, torch.optim.AdamW(model.parameters()), config,
                          {"samples_seen": 16, "mlflow_run_id": None})
    options = SuiteOptions(batch_size=8, probe_train_samples=12, k_shots=(1,), grounding_samples=8,
                           overlay_rows=2, progress_every=1, head_budget=Budget(steps=5))
    metrics = run_suite(url, "default", options=options)
    assert {f"eval/retrieval/corpus/{d}_R{k}" for d in ("image_to_text", "text_to_image")
            for k in (1, 5, 10)} == set(metrics)
    lines = capsys.readouterr().err.splitlines()
    for evaluation, task, key in [("zeroshot", "shapes-color", "color"), ("zeroshot", "shapes-shape", "shape"),
                                  ("linear", "shapes-color", "color"), ("linear", "shapes-shape", "shape"),
                                  ("linear", "shapes-count", "count"), ("linear", "shapes-relation", "relation")]:
        line = f"[eval] {evaluation}: skipping {task}: the eval split has no '{key}' labels"
        assert lines.count(line) == 1, (line, lines)
    for evaluation in ("grounding", "vqa", "seg"):
        assert len([line for line in lines if line.startswith(f"[eval] {evaluation}:")]) == 1, lines
    # The suite ran to the end and says, last, everything it skipped.
    assert lines[-1].startswith("[eval] skipped 9: zeroshot: skipping shapes-color"), lines[-1]
    assert all(f"{e}: skipping" in lines[-1] for e in ("linear", "grounding", "vqa", "seg"))
