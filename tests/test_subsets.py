"""The data-scale axis: ``data.max_samples`` trains on a nested subset of the train split chosen from the keys."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from streaming import MDSWriter

import trainer.data.loader
from trainer import storage
from trainer.config import ConfigError, load_config
from trainer.data.loader import DataError, build_train_loader, dataset_size
from trainer.data.shapes import COLUMNS, make_sample, write_shapes

SUPPORT = Path(__file__).parent / "support"


def _expected(keys: list[str], n: int) -> list[str]:
    """The subset of size n, computed here from its definition (loader.py): the n lowest salted hashes."""
    rank = {k: hashlib.sha256(b"maeclip-subset-v1\x00" + k.encode()).digest()[:8] for k in keys}
    return sorted(sorted(keys, key=rank.__getitem__)[:n])


def _epoch(url: str, n: int, *extra: str) -> list[str]:
    config = load_config("tiny-clip", [f"data.url={url}", "data.batch_size=8", "data.num_workers=0",
                                       f"data.max_samples={n}", *extra])
    return [key for batch in build_train_loader(config) for key in batch["key"]]


def _write_mds(url: str, indices: list[int], size_limit: int) -> None:
    with MDSWriter(out=storage.local_path(url), columns=COLUMNS, size_limit=size_limit) as writer:
        for index in indices:
            writer.write(make_sample(3, "train", index))


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _torchrun(ranks: int, out_dir: Path, *args: str) -> list[list[str]]:
    """tests/support/read_epoch.py on ``ranks`` ranks (Streaming joins them in a gloo group); each rank's keys."""
    out_dir.mkdir()
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(ranks), "--rdzv_backend",
               "c10d", "--rdzv_endpoint", "localhost:0", str(SUPPORT / "read_epoch.py"), str(out_dir), *args]
    subprocess.run(command, check=True, timeout=300, capture_output=True)
    return [json.loads((out_dir / f"keys-{rank}.json").read_text()) for rank in range(ranks)]


def test_subsets_nest_and_depend_only_on_the_keys_not_on_layout_or_seeds(tmp_path):
    # The same 48 samples twice: 1-3 per shard in stored order, and one shard in reverse order.
    small, large = f"file://{tmp_path}/small", f"file://{tmp_path}/large"
    _write_mds(f"{small}/train", list(range(48)), size_limit=4096)
    _write_mds(f"{large}/train", list(reversed(range(48))), size_limit=1 << 26)
    shards = [len(json.loads((tmp_path / name / "train" / "index.json").read_text())["shards"])
              for name in ("small", "large")]
    assert shards[0] >= 12 and shards[1] == 1
    keys = [f"train-{i:07d}" for i in range(48)]
    subsets = {}
    for n in (8, 16, 32):
        seen = sorted(_epoch(small, n))
        assert seen == _expected(keys, n)
        assert sorted(_epoch(large, n, "train.seed=7", "data.shuffle_seed=99")) == seen
        subsets[n] = set(seen)
    assert subsets[8] < subsets[16] < subsets[32]
    assert sorted(_epoch(small, 16, "data.shuffle=false")) == sorted(subsets[16])


def test_a_small_subset_repeats_whole_epochs_and_resumes_mid_epoch(tmp_path):
    root = f"file://{tmp_path}/data"
    write_shapes(root, n_train=64, n_eval=1, seed=3)
    subset = _expected([f"train-{i:07d}" for i in range(64)], 16)
    config = load_config("tiny-clip", [f"data.url={root}", "data.batch_size=8", "data.num_workers=0",
                                       "data.max_samples=16", f"data.cache_dir={tmp_path / 'cache'}"])
    loader = build_train_loader(config)
    assert len(loader.dataset) == 16
    for _ in range(3):
        assert sorted(key for batch in loader for key in batch["key"]) == subset
    seen = []
    for batch in loader:  # the 4th epoch, stopped after its first batch
        seen += batch["key"]
        break
    state = loader.state_dict()
    del loader
    resumed = build_train_loader(config)
    resumed.load_state_dict(state)
    assert sorted(seen + [key for batch in resumed for key in batch["key"]]) == subset


def test_one_epoch_on_a_subset_sees_its_keys_once_on_two_ranks_and_on_one_and_resumes(tmp_path):
    root = f"file://{tmp_path}/data"
    write_shapes(root, n_train=96, n_eval=1, seed=5)
    before = _digests(tmp_path / "data")
    subset = _expected([f"train-{i:07d}" for i in range(96)], 32)
    settings = [a for kv in (f"data.url={root}", "data.batch_size=8", "data.max_samples=32",
                             f"data.cache_dir={tmp_path / 'cache'}") for a in ("--set", kv)]
    two = _torchrun(2, tmp_path / "two", *settings, "--set", "data.num_workers=1")
    assert [len(keys) for keys in two] == [16, 16] and sorted(two[0] + two[1]) == subset
    assert sorted(_epoch(root, 32, f"data.cache_dir={tmp_path / 'cache'}", "train.seed=3")) == subset  # 1 rank
    # 2 ranks stop after one batch each (16 of 32), one rank resumes with the other 16 (2 batches of 8).
    first = _torchrun(2, tmp_path / "first", "--stop-after", "1", *settings, "--set", "data.num_workers=0")
    rest = _torchrun(1, tmp_path / "rest", "--resume", str(tmp_path / "first" / "state.json"), *settings,
                     "--set", "data.num_workers=0")
    assert sorted(first[0] + first[1] + rest[0]) == subset
    assert _digests(tmp_path / "data") == before


@pytest.mark.parametrize("where", ["gs", "s3"])
def test_subsets_of_remote_corpora_come_through_the_cache(where, tmp_path, request, unique):
    root = request.getfixturevalue({"gs": "gcs_emulator", "s3": "s3_server"}[where]) + f"/{unique}"
    write_shapes(root, n_train=64, n_eval=1, seed=3)
    seen = _epoch(root, 24, f"data.cache_dir={tmp_path / 'cache'}")
    assert sorted(seen) == _expected([f"train-{i:07d}" for i in range(64)], 24)
    assert list((tmp_path / "cache" / "subsets").glob("*.npy"))


def test_max_samples_beyond_the_split_or_below_one_batch_is_one_line(tmp_path):
    root = f"file://{tmp_path}/data"
    write_shapes(root, n_train=64, n_eval=1, seed=3)
    split = storage.join(root, "train")
    assert dataset_size(split, max_samples=64) == 64
    with pytest.raises(DataError) as caught:
        dataset_size(split, max_samples=65)
    assert str(caught.value) == f"data.max_samples: 65 is more than the 64 samples of {split}"
    for n, needle in ((65, "is more than the 64 samples"), (4, "less than one batch over all ranks")):
        with pytest.raises(DataError, match=needle) as caught:
            _epoch(root, n)
        assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"data\.max_samples: -1 is outside"):
        load_config("tiny-clip", ["data.max_samples=-1"])
    assert sorted(_epoch(root, 64)) == [f"train-{i:07d}" for i in range(64)]  # all of it: the whole split


def test_the_corpus_stays_byte_identical_and_the_subset_is_cached_node_locally(tmp_path, monkeypatch):
    root = f"file://{tmp_path}/data"
    write_shapes(root, n_train=64, n_eval=1, seed=3)
    before = _digests(tmp_path / "data")
    cache = tmp_path / "cache"
    first = sorted(_epoch(root, 16, f"data.cache_dir={cache}"))
    assert _digests(tmp_path / "data") == before
    cached = list((cache / "subsets").glob("*.npy"))
    assert len(cached) == 1

    def no_pass(*args):
        raise AssertionError("the cached subset was not used")

    monkeypatch.setattr(trainer.data.loader, "_shard_priorities", no_pass)
    assert sorted(_epoch(root, 16, f"data.cache_dir={cache}")) == first
    cached[0].write_bytes(b"not an array")  # a damaged cache entry is recomputed, not trusted
    monkeypatch.undo()
    assert sorted(_epoch(root, 16, f"data.cache_dir={cache}")) == first
    assert _digests(tmp_path / "data") == before
