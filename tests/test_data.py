"""Data plane v0: the shapes corpus, the tokenizer, MDS on file://, gs:// and s3://, the Streaming loader."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer import storage
from trainer.config import load_config
from trainer.data.loader import DataError, build_train_loader, dataset_size, iter_eval_batches
from trainer.data.shapes import COLORS, SHAPES, make_sample, write_shapes
from trainer.data.tokenizer import EOT_TOKEN_ID, SOT_TOKEN_ID, tokenize
from trainer.data.transforms import decode_image

SUPPORT = Path(__file__).parent / "support"


@given(seed=st.integers(0, 10**6), index=st.integers(0, 10**6), split=st.sampled_from(["train", "eval"]))
@settings(max_examples=40, deadline=None)
def test_shapes_samples_are_deterministic_and_labelled(seed, index, split):
    sample = make_sample(seed, split, index)
    assert sample == make_sample(seed, split, index)
    labels, objects = sample["meta"]["labels"], sample["meta"]["objects"]
    assert labels["color"] in COLORS and labels["shape"] in SHAPES
    assert labels["count"] == len(objects) in (1, 2, 3)
    assert (objects[0]["color"], objects[0]["shape"]) == (labels["color"], labels["shape"])
    # the primary is named first in the caption
    assert sample["caption"].index(f"{labels['color']} {labels['shape']}") <= min(
        sample["caption"].find(f"{o['color']} {o['shape']}") for o in objects)
    image = decode_image(sample["image"])
    assert image.size == (64, 64)
    for obj in objects:
        x0, y0, x1, y1 = obj["bbox"]
        assert 0 <= x0 < x1 < 64 and 0 <= y0 < y1 < 64
    # the primary's colour is really drawn at its centre
    x0, y0, x1, y1 = objects[0]["bbox"]
    assert image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2 + 1)) == COLORS[labels["color"]]


def test_different_seeds_and_splits_differ():
    assert make_sample(0, "train", 5)["image"] != make_sample(1, "train", 5)["image"]
    assert make_sample(0, "train", 5)["caption"] != make_sample(0, "eval", 5)["caption"] or \
        make_sample(0, "train", 5)["image"] != make_sample(0, "eval", 5)["image"]


def test_tokenizer_known_answer():
    tokens = tokenize(["a red circle", "x " * 100], context_length=8)
    assert tokens.dtype == torch.long and tokens.shape == (2, 8)
    first = tokens[0].tolist()
    assert first[0] == SOT_TOKEN_ID and first[4] == EOT_TOKEN_ID and first[5:] == [0, 0, 0]
    assert len(set(first[1:4])) == 3  # three distinct words
    assert tokens[1, 0] == SOT_TOKEN_ID and tokens[1, -1] == EOT_TOKEN_ID  # truncation keeps EOT last
    assert tokenize(["A RED Circle"], 8).tolist() == tokenize(["a red circle"], 8).tolist()


def _write(url: str, n_train: int = 64, n_eval: int = 16) -> dict:
    return write_shapes(url, n_train=n_train, n_eval=n_eval, seed=3)


def _read_epoch_with_two_ranks(url: str, tmp_path: Path, batch_size: int) -> list[list[str]]:
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--rdzv_backend", "c10d",
               "--rdzv_endpoint", "localhost:0", str(SUPPORT / "read_epoch.py"), str(tmp_path),
               "--set", f"data.url={url}", "--set", f"data.batch_size={batch_size}", "--set", "data.num_workers=1",
               "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    subprocess.run(command, check=True, timeout=300, capture_output=True)
    return [json.loads((tmp_path / f"keys-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("where", ["file", "gs", "s3"])
def test_corpus_on_storage_is_read_exactly_once_per_epoch_across_two_ranks(where, tmp_path, request, unique):
    root = {"file": lambda: f"file://{tmp_path}/data",
            "gs": lambda: request.getfixturevalue("gcs_bucket") + f"/{unique}",
            "s3": lambda: request.getfixturevalue("s3_bucket") + f"/{unique}"}[where]()
    manifest = _write(root)
    assert manifest["counts"] == {"read": 80, "written": 80, "skipped": {}}
    assert sum(s["samples"] for s in manifest["shards"]) == 80
    assert json.loads(storage.read_text(storage.join(root, "manifest.json"))) == manifest
    assert dataset_size(storage.join(root, "train")) == 64
    ranks = _read_epoch_with_two_ranks(root, tmp_path, batch_size=8)
    assert all(len(keys) == 32 for keys in ranks)
    assert sorted(ranks[0] + ranks[1]) == [f"train-{i:07d}" for i in range(64)]


def test_missing_and_empty_datasets_are_named(tmp_path):
    with pytest.raises(DataError, match=f"no MDS dataset at file://{tmp_path}/none"):
        dataset_size(f"file://{tmp_path}/none")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "index.json").write_text(json.dumps({"version": 2, "shards": []}))
    with pytest.raises(DataError, match="is empty"):
        dataset_size(f"file://{tmp_path}/empty")


def test_loader_state_resumes_mid_epoch(tmp_path):
    root = f"file://{tmp_path}/data"
    _write(root)
    config = load_config("tiny-clip", [f"data.url={root}", "data.batch_size=8", "data.num_workers=0"])
    loader = build_train_loader(config)
    seen = []
    for number, batch in enumerate(loader, start=1):
        seen += batch["key"]
        assert batch["image"].shape == (8, 3, 64, 64) and batch["tokens"].shape == (8, 32)
        if number == 3:
            break
    state = loader.state_dict()
    del loader
    resumed = build_train_loader(config)
    resumed.load_state_dict(state)
    rest = [key for batch in resumed for key in batch["key"]]
    assert len(seen) == 24 and len(rest) == 40
    assert sorted(seen + rest) == [f"train-{i:07d}" for i in range(64)]


def test_eval_batches_cover_the_split_in_order(tmp_path):
    root = f"file://{tmp_path}/data"
    _write(root)
    config = load_config("tiny-clip", [f"data.url={root}"])
    batches = list(iter_eval_batches(storage.join(root, "eval"), config, batch_size=5))
    keys = [key for batch in batches for key in batch["key"]]
    assert keys == [f"eval-{i:07d}" for i in range(16)]
    assert batches[0]["meta"][0] == make_sample(3, "eval", 0)["meta"]
    assert batches[0]["caption"][0] == make_sample(3, "eval", 0)["caption"]
