"""Data plane v0: the shapes corpus, the tokenizer, MDS on file://, gs:// and s3://, the Streaming loader."""

import contextlib
import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer import storage
from trainer.config import ConfigError, load_config
from trainer.data.loader import CaptionedImages, DataError, build_train_loader, dataset_size, iter_eval_batches
from trainer.data.shapes import COLORS, RELATIONS, SHAPES, decode_mask, make_sample, write_shapes
from trainer.data.tokenizer import EOT_TOKEN_ID, SOT_TOKEN_ID, tokenize
from trainer.data.transforms import decode_image, eval_transform

SUPPORT = Path(__file__).parent / "support"
V0_IMAGE_DIGESTS = ["058f7802940c5d05", "77e1e21f5bbebb19", "b863c954a8c023a0", "f10d640400cda259"]


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
    assert all(f"{o['color']} {o['shape']}" in sample["caption"] for o in objects)


@given(seed=st.integers(0, 10**6), index=st.integers(0, 10**6))
@settings(max_examples=25, deadline=None)
def test_shapes_masks_match_the_pixels_and_relations_match_the_boxes(seed, index):
    sample = make_sample(seed, "eval", index)
    meta, objects = sample["meta"], sample["meta"]["objects"]
    pixels = np.asarray(decode_image(sample["image"]))
    label_map = np.asarray(decode_mask(meta))
    assert label_map.shape == pixels.shape[:2] and set(np.unique(label_map)) <= set(range(len(objects) + 1))
    palette = np.array(list(COLORS.values()))
    for number, obj in enumerate(objects, start=1):
        inside = label_map == number
        assert inside.sum() == obj["area"] > 0
        assert (pixels[inside] == COLORS[obj["color"]]).all()
        ys, xs = np.nonzero(inside)  # the mask lies within the box
        x0, y0, x1, y1 = obj["bbox"]
        assert x0 <= xs.min() and xs.max() <= x1 and y0 <= ys.min() and ys.max() <= y1
    background = pixels[label_map == 0]
    assert not (background[:, None, :] == palette[None]).all(-1).any()
    relation = meta["labels"]["relation"]
    if len(objects) == 1:
        assert relation is None
        return
    boxes = [o["bbox"] for o in objects]
    first, second = boxes[0], max(boxes[1:], key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
    dx, dy = (first[0] + first[2]) - (second[0] + second[2]), (first[1] + first[3]) - (second[1] + second[3])
    horizontal = {"left of": dx < 0, "right of": dx > 0}
    vertical = {"above": dy < 0, "below": dy > 0}
    assert relation in RELATIONS
    assert (horizontal if abs(dx) >= abs(dy) else vertical).get(relation), (relation, dx, dy)
    said = [r for r, words in (("left of", ("left of",)), ("right of", ("right of",)),
                               ("above", ("above", "over")), ("below", ("below", "under", "beneath")))
            if any(f" {w} a " in sample["caption"] for w in words)]
    assert said in ([], [relation])


def test_shapes_v1_keeps_the_v0_images():
    # Known answer: sha256 of make_sample(3, "train", 0..3) images as v0 drew them (commit f88f471).
    digests = [hashlib.sha256(make_sample(3, "train", i)["image"]).hexdigest()[:16] for i in range(4)]
    assert digests == V0_IMAGE_DIGESTS


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


def _torchrun(ranks: int, out_dir: Path, *args: str) -> list[list[str]]:
    """Run tests/support/read_epoch.py on ``ranks`` ranks; the keys each rank saw."""
    out_dir.mkdir()
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(ranks), "--rdzv_backend",
               "c10d", "--rdzv_endpoint", "localhost:0", str(SUPPORT / "read_epoch.py"), str(out_dir), *args]
    subprocess.run(command, check=True, timeout=300, capture_output=True)
    return [json.loads((out_dir / f"keys-{rank}.json").read_text()) for rank in range(ranks)]


@pytest.mark.parametrize("where", ["file", "gs", "s3"])
def test_corpus_on_storage_is_read_exactly_once_per_epoch_across_two_ranks(where, tmp_path, request, unique):
    root = {"file": lambda: f"file://{tmp_path}/data",
            "gs": lambda: request.getfixturevalue("gcs_emulator") + f"/{unique}",
            "s3": lambda: request.getfixturevalue("s3_server") + f"/{unique}"}[where]()
    manifest = _write(root)
    assert manifest["counts"] == {"read": 80, "written": 80, "skipped": {}}
    assert sum(s["samples"] for s in manifest["shards"]) == 80
    assert json.loads(storage.read_text(storage.join(root, "manifest.json"))) == manifest
    assert dataset_size(storage.join(root, "train")) == 64
    ranks = _torchrun(2, tmp_path / "epoch", "--set", f"data.url={root}", "--set", "data.batch_size=8",
                      "--set", "data.num_workers=1", "--set", f"data.cache_dir={tmp_path / 'cache'}")
    assert all(len(keys) == 32 for keys in ranks)
    assert sorted(ranks[0] + ranks[1]) == [f"train-{i:07d}" for i in range(64)]


def test_elastic_resume_sees_every_key_exactly_once(tmp_path):
    # 96 samples divide into 1, 2 and 3 ranks x batch 8; 2 ranks stop after 3 batches each (48 samples), so the
    # remaining 48 divide evenly too (the exactly-once condition of loader.py).
    root = f"file://{tmp_path}/data"
    write_shapes(root, n_train=96, n_eval=1, seed=5)
    settings = [a for kv in (f"data.url={root}", "data.batch_size=8", "data.num_workers=0") for a in ("--set", kv)]
    first = _torchrun(2, tmp_path / "first", "--stop-after", "3", *settings)
    assert [len(keys) for keys in first] == [24, 24]
    state = str(tmp_path / "first" / "state.json")
    everything = [f"train-{i:07d}" for i in range(96)]
    for ranks in (1, 3):
        rest = _torchrun(ranks, tmp_path / f"resume-{ranks}", "--resume", state, *settings)
        assert sorted(key for keys in first + rest for key in keys) == everything, ranks


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


def test_loader_knobs_reach_streaming_and_bad_values_are_named(tmp_path):
    root = f"file://{tmp_path}/data"
    _write(root)
    config = load_config("tiny-clip", [f"data.url={root}", "data.batch_size=8", "data.num_workers=0",
                                       "data.predownload=16", "data.cache_limit=1gb", "data.shuffle_algo=naive",
                                       "data.shuffle_block_size=4096"])
    loader = build_train_loader(config)
    dataset = loader.dataset
    assert (dataset.predownload, dataset.cache_limit, dataset.shuffle_algo, dataset.shuffle_block_size) == (
        16, 1 << 30, "naive", 4096)
    assert sorted(k for batch in loader for k in batch["key"]) == [f"train-{i:07d}" for i in range(64)]
    for override, needle in (("data.shuffle_algo=py3", "not one of py1e"), ("data.cache_limit=lots", "a size"),
                             ("data.predownload=-1", "data.predownload")):
        with pytest.raises(ConfigError, match=needle):
            load_config("tiny-clip", [override])


def test_uneven_corpus_drops_the_partial_batch_without_repeats(tmp_path, caplog):
    # The documented behaviour off the exactly-once condition: 70 = 8 x 8 + 6, one rank, so 6 samples go unseen.
    root = f"file://{tmp_path}/data"
    write_shapes(root, n_train=70, n_eval=1, seed=3)
    config = load_config("tiny-clip", [f"data.url={root}", "data.batch_size=8", "data.num_workers=0"])
    with caplog.at_level("WARNING", logger="trainer.data.loader"):
        keys = [key for batch in build_train_loader(config) for key in batch["key"]]
    assert "not a multiple of world size 1 x batch size 8" in caplog.text
    assert len(keys) == len(set(keys)) == 64


def test_eval_batches_cover_the_split_in_order(tmp_path):
    root = f"file://{tmp_path}/data"
    _write(root)
    config = load_config("tiny-clip", [f"data.url={root}"])
    batches = list(iter_eval_batches(storage.join(root, "eval"), config, batch_size=5))
    keys = [key for batch in batches for key in batch["key"]]
    assert keys == [f"eval-{i:07d}" for i in range(16)]
    assert batches[0]["meta"][0] == make_sample(3, "eval", 0)["meta"]
    assert batches[0]["caption"][0] == make_sample(3, "eval", 0)["caption"]
    assert batches[0]["captions"][0] == [make_sample(3, "eval", 0)["caption"]]  # one caption: its only one


def _shared_memory_descriptors() -> int:
    found = 0
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # closed since listed
            found += fd.readlink().as_posix().startswith("/dev/shm/")
    return found


def test_eval_passes_leave_no_shared_memory_open(tmp_path):
    """Streaming attaches to every live shared-memory prefix to find a free one and would keep each one it
    probed, and each block it made, open until exit: about 200 descriptors an eval pass, which ran a long
    ``eval --watch`` out of them. Live datasets of other runs make each new one probe past their prefixes."""
    root = f"file://{tmp_path}/data"
    _write(root)
    config = load_config("tiny-clip", [f"data.url={root}"])
    transform = eval_transform(config.data, config.model.image_size)
    others = [CaptionedImages(storage.join(root, "train"), config, transform=transform, with_text_meta=False)
              for _ in range(3)]
    before, blocks = _shared_memory_descriptors(), set(Path("/dev/shm").iterdir())
    for _ in range(3):
        keys = [key for batch in iter_eval_batches(storage.join(root, "eval"), config, 8) for key in batch["key"]]
        assert len(keys) == 16
    assert _shared_memory_descriptors() == before
    assert set(Path("/dev/shm").iterdir()) - blocks == set()  # what the passes made is unlinked, not left behind
    del others


def test_a_shared_memory_prefix_taken_by_another_process_meanwhile_is_retried(tmp_path, monkeypatch):
    """Two processes opening datasets at once may pick the same Streaming shm prefix; the loser retries."""
    from multiprocessing import shared_memory

    from streaming.base.shared import prefix

    root = f"file://{tmp_path}/data"
    _write(root)
    config = load_config("tiny-clip", [f"data.url={root}"])
    real, taken = prefix.SharedMemory, []

    def another_process_wins_the_first_claim(name, create=False, size=0, auto_cleanup=True):
        if create and not taken:  # what a concurrent process would do between our scan and our create
            taken.append(shared_memory.SharedMemory(name=name, create=True, size=max(size, 1)))
        return real(name, create, size, auto_cleanup)

    monkeypatch.setattr(prefix, "SharedMemory", another_process_wins_the_first_claim)
    try:
        keys = [key for batch in iter_eval_batches(storage.join(root, "eval"), config, 8) for key in batch["key"]]
    finally:
        for segment in taken:
            segment.close()
            segment.unlink()
    assert taken and sorted(keys) == [f"eval-{i:07d}" for i in range(16)]


def test_evicted_shards_are_fetched_again_and_local_ones_are_not_prepared_per_sample(
        s3_server, unique, tmp_path, monkeypatch):
    """A cache limit of six shards over 8 or more shards on s3:// (moto): every epoch still reads every key once,
    evicted shards are prepared again, and a local shard is not re-prepared per sample."""
    from streaming import MDSWriter, StreamingDataset

    from trainer.data.shapes import COLUMNS

    root = f"{s3_server}/{unique}"
    with MDSWriter(out=(str(tmp_path / "staging"), f"{root}/train"), columns=COLUMNS, size_limit=4096,
                   keep_local=True) as writer:
        for index in range(32):
            writer.write(make_sample(3, "train", index))
    shards = json.loads((tmp_path / "staging" / "index.json").read_text())["shards"]
    largest = max(s["raw_data"]["bytes"] for s in shards)
    assert len(shards) >= 8
    prepared = []
    original = StreamingDataset.prepare_shard
    monkeypatch.setattr(StreamingDataset, "prepare_shard",
                        lambda self, shard_id, blocking=True: (prepared.append(shard_id), original(self, shard_id,
                                                                                                 blocking))[1])
    config = load_config("tiny-clip", [f"data.url={root}", "data.batch_size=4", "data.num_workers=0",
                                       f"data.cache_dir={tmp_path / 'cache'}", f"data.cache_limit={6 * largest}b",
                                       "data.shuffle=false"])
    loader = build_train_loader(config)
    epochs: list[list[str]] = []

    def read_two_epochs() -> None:
        epochs.extend(sorted(key for batch in loader for key in batch["key"]) for _ in range(2))

    # At Streaming's minimum (four shards) its download thread stalled, for good, twice in full runs on a machine
    # loaded by other jobs (never alone); six shards still evict on every pass. A watchdog makes a stall a
    # failure of this test, not a hung suite.
    reader = threading.Thread(target=read_two_epochs, daemon=True)
    reader.start()
    reader.join(timeout=180)
    assert not reader.is_alive(), "Streaming stopped making progress under the cache limit"
    assert epochs == [[f"train-{i:07d}" for i in range(32)]] * 2
    assert len(set(prepared)) == len(shards)
    assert len(prepared) >= len(shards) + 4  # evicted shards came back for the second epoch ...
    # ... but not once per sample: Streaming's download thread alone asks for each of the 2 x 32 samples.
    assert len(prepared) < 2 * 32
