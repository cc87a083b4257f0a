"""Streaming loaders over MDS corpora at any storage URL (docs/contracts.md §1): training batches and eval passes.

Training uses MosaicML Streaming's ``StreamingDataset``, which partitions each epoch over ranks and workers and
records its position in ``StreamingDataLoader.state_dict()``; with ``num_canonical_nodes`` fixed, the sample
order does not depend on the world size, so a job may resume on a different number of ranks.

Exactly-once (Streaming 0.13, ``partition/orig.py``): an epoch is cut into per-canonical-node rows, interleaved
over ranks, then dealt to each rank's workers in whole batches. Short canonical-node rows and the rank split are
padded by *repeating* samples; the workers' split is padded with empty slots, and ``drop_last`` drops the one
partial batch a rank may end with. So every sample is seen exactly once per epoch when the train split's size N
is a multiple of ``world_size × batch_size`` and of ``num_canonical_nodes`` (the default is 1). Otherwise up
to ``num_canonical_nodes - 1`` plus ``world_size - 1`` samples repeat and up to ``batch_size - 1`` samples per
rank are not seen in that epoch; ``build_train_loader`` logs a warning then.

Subsets (``data.max_samples`` = n, the data-scale axis): training sees a fixed subset of n samples of the train
split, the n with the lowest ``subset_priority(key)`` (the first 8 bytes of sha256(salt + key)). That depends on
the sample keys alone, so the subset is the same for every arm, seed and world size and whatever the shard
layout, and subsets nest: subset(n) ⊂ subset(m) for n < m (ties need two keys whose 64-bit hashes are equal).
Streaming picks an epoch's sample ids in ``resample_streams``; ``CaptionedImages`` returns the subset's ids there
(one shuffle unit per shard, as Streaming's own resampling does), so Streaming's partitioning, shuffling, worker
split and resumable state work on the subset unchanged: every epoch sees the subset once under the condition
above with N = n, a small subset is simply repeated over more epochs, and exact resume keeps working. Finding the
subset costs one pass over the split's key column: each shard comes through Streaming's cache (a remote shard is
downloaded, as training would) and only its offsets, column sizes and keys are read (no image is decoded). The
chosen ids are cached node-locally (``data.cache_dir`` or the temp dir), never in the corpus.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import mmap
import os
import random
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from streaming import StreamingDataLoader, StreamingDataset
from streaming.base.dataset import _ShardState

from trainer import storage
from trainer.config import Config
from trainer.data.tokenizer import tokenize
from trainer.data.transforms import Transform, decode_tensor, eval_transform, train_transform

log = logging.getLogger(__name__)
SHM_ATTEMPTS = 10
_PREFIX_LOCK = threading.Lock()


@contextlib.contextmanager
def _probes_not_kept() -> Iterator[None]:
    """While a dataset starts: a shared-memory block it only attaches to is not kept open until exit.

    Streaming finds a free shared-memory prefix by attaching to each live prefix's blocks in turn, and registers
    every such probe for cleanup at exit, which holds its two file descriptors (the block's and its mapping's)
    for the life of the process: about 200 per dataset with a few dozen prefixes in /dev/shm, and a long
    ``maeclip eval --watch`` ran out of descriptors. Unregistered, a probe closes once nothing refers to it; the
    blocks a dataset creates are still registered, and the one it attaches to as a non-leader is kept by it.
    """
    from streaming.base.shared import prefix

    attach = prefix.SharedMemory

    def unregistered_when_attached(name=None, create=None, size=0, auto_cleanup=True):
        return attach(name, create, size, auto_cleanup=auto_cleanup and create is not False)

    with _PREFIX_LOCK:  # one module global, patched for the length of one dataset's start
        prefix.SharedMemory = unregistered_when_attached
        try:
            yield
        finally:
            prefix.SharedMemory = attach


def _blocks(dataset: StreamingDataset) -> list[Any]:
    """The shared-memory blocks a dataset made for itself: its locals, barrier, epoch, cache and shard arrays."""
    from streaming.base.shared.memory import SharedMemory

    found = []
    for value in vars(dataset).values():
        for block in (value, getattr(value, "shm", None), getattr(getattr(value, "arr", None), "shm", None),
                      getattr(getattr(value, "_arr", None), "shm", None)):
            if isinstance(block, SharedMemory):
                found.append(block)
    return found


def release_shared_memory(dataset: StreamingDataset) -> None:
    """Unlink and close a finished, worker-less dataset's blocks now rather than at exit (one eval pass each)."""
    for block in _blocks(dataset):
        try:
            block.cleanup()
        except BufferError:  # a view of it is still alive: leave it to the exit handler
            continue
        atexit.unregister(block.cleanup)


class DataError(ValueError):
    """A dataset that is missing, empty or unreadable; the message names the URL."""


# An MDS index lists every shard in a few hundred bytes each: 64 MiB is millions of shards.
INDEX_LIMIT = 64 << 20


def _read_index(split_url: str) -> str:
    index_url = storage.join(split_url, "index.json")
    if not storage.exists(index_url):
        raise DataError(f"no MDS dataset at {split_url} (run `maeclip data shapes --out URL` or ingest first)")
    try:
        return storage.read_text(index_url, limit=INDEX_LIMIT)
    except ValueError as err:  # too large, not UTF-8
        raise DataError(f"unreadable MDS index at {index_url}: {type(err).__name__}: {err}") from err


def dataset_size(split_url: str, max_samples: int = 0) -> int:
    """Samples in the MDS split at ``split_url``; DataError when there is none or it is empty, or when
    ``max_samples`` (``data.max_samples``, 0 = no subset) asks for more samples than the split holds."""
    index_url = storage.join(split_url, "index.json")
    text = _read_index(split_url)
    try:
        shards = json.loads(text)["shards"]
        total = sum(shard["samples"] for shard in shards)
    except (ValueError, KeyError, TypeError, RecursionError) as err:  # not JSON, too large, not an MDS index
        raise DataError(f"unreadable MDS index at {index_url}: {type(err).__name__}: {err}") from err
    if not isinstance(total, int) or total < 0:
        raise DataError(f"unreadable MDS index at {index_url}: sample counts are not counts")
    if total == 0:
        raise DataError(f"the dataset at {split_url} is empty (0 samples)")
    if max_samples > total:
        raise DataError(f"data.max_samples: {max_samples} is more than the {total} samples of {split_url}")
    return total


# Salted so that subsets are not correlated with any other use of sha256 over the keys; changing it changes
# every subset (bump the version with it).
SUBSET_SALT = b"maeclip-subset-v1\x00"
# Candidates held between selections while scanning: memory stays O(n + this) whatever the split's size.
SUBSET_CHUNK = 1 << 22


def subset_priority(key: str) -> int:
    """A sample's place in every subset: the subset of size n holds the n keys of lowest priority."""
    return int.from_bytes(hashlib.sha256(SUBSET_SALT + key.encode()).digest()[:8], "big")


def _uint32_at(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return data[offsets[:, None] + np.arange(4)].view("<u4")[:, 0].astype(np.int64)


def _shard_priorities(path: str, shard: Any) -> np.ndarray:
    """``subset_priority`` of every sample of the local raw MDS shard at ``path``, reading only its key column.

    An MDS shard is ``[count][count + 1 offsets][samples]`` (uint32); a sample is one uint32 size per
    variable-size column, then the columns in ``column_names`` order. Through mmap, only the pages holding the
    offsets, sizes and keys are read. The shard is untrusted: every offset is checked against the file.
    """
    names, encodings, sizes, count = shard.column_names, shard.column_encodings, shard.column_sizes, shard.samples
    if "key" not in names or encodings[names.index("key")] != "str":
        raise DataError(f"{path}: no str column 'key' in this MDS shard (docs/contracts.md §1)")
    column, variable = names.index("key"), [i for i, size in enumerate(sizes) if not size]
    header_bytes = 4 * (count + 2)
    with open(path, "rb") as handle:
        length = os.fstat(handle.fileno()).st_size
        if count <= 0 or length < header_bytes:
            raise DataError(f"{path}: unreadable MDS shard: {length} bytes for {count} samples")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            data = np.frombuffer(view, np.uint8)
            try:
                header = data[:header_bytes].view("<u4").astype(np.int64)
                begins, ends = header[1:-1], header[2:]
                if header[0] != count or begins[0] < header_bytes or (ends < begins).any() or ends[-1] > length:
                    raise DataError(f"{path}: unreadable MDS shard: its offsets do not match the file")
                if (begins + 4 * len(variable) > ends).any():
                    raise DataError(f"{path}: unreadable MDS shard: a sample is shorter than its column sizes")
                start = begins + 4 * len(variable)
                for i in range(column):
                    start = start + (sizes[i] if sizes[i] else _uint32_at(data, begins + 4 * variable.index(i)))
                stop = start + _uint32_at(data, begins + 4 * variable.index(column))
                if (stop > ends).any():
                    raise DataError(f"{path}: unreadable MDS shard: a key runs past its sample")
                return np.fromiter(
                    (int.from_bytes(hashlib.sha256(SUBSET_SALT + view[a:b]).digest()[:8], "big")
                     for a, b in zip(start.tolist(), stop.tolist(), strict=True)), np.uint64, count=count)
            finally:
                del data  # the mmap cannot close while numpy still exports its buffer


def _lowest(priorities: np.ndarray, ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    if len(priorities) <= n:
        return priorities, ids
    keep = np.argpartition(priorities, n - 1)[:n]
    return priorities[keep], ids[keep]


def _remote_and_local(split_url: str, cache_dir: str) -> tuple[str | None, str]:
    """Streaming's (remote, local): a file:// split is read in place; a remote one is cached per URL."""
    local = storage.local_path(split_url)
    if local:
        return None, local
    root = cache_dir or os.path.join(tempfile.gettempdir(), "maeclip-cache")
    return split_url, os.path.join(root, hashlib.sha256(split_url.encode()).hexdigest()[:16])


class CaptionedImages(StreamingDataset):
    """MDS samples decoded to ``{"key", "image", "tokens"}`` (or, for eval, with caption and meta).

    Random augmentation of a sample is seeded by (shuffle seed, epoch, sample index), not by the worker's RNG
    stream, so a resumed run (any world size, any number of workers) sees exactly the crops it would have seen.
    """

    epoch = 0
    # The subset's sample ids (sorted) and Streaming's shuffle units for them; None: the whole split.
    _subset: np.ndarray | None = None
    _subset_units: np.ndarray | None = None

    def __init__(self, split_url: str, config: Config, *, transform: Transform, with_text_meta: bool,
                 max_samples: int = 0, subset_cache: str = "", **streaming_args: Any) -> None:
        remote, local = _remote_and_local(split_url, config.data.cache_dir)
        for attempt in range(SHM_ATTEMPTS):
            try:
                with _probes_not_kept():
                    super().__init__(remote=remote, local=local, **streaming_args)
                break
            except FileExistsError:
                # Streaming claims a shared-memory prefix by scanning for a free one and then creating it, so two
                # processes starting at the same moment (a study's parallel evaluations) can pick the same one.
                # The loser rescans on retry and finds the next free prefix.
                if attempt == SHM_ATTEMPTS - 1:
                    raise
                time.sleep(random.uniform(0.05, 0.5))
        self.transform = transform
        self.context_length = config.model.context_length
        self.with_text_meta = with_text_meta
        self._prepared_shards: set[int] = set()
        if 0 < max_samples < self.num_samples:  # a subset of the whole split is the split
            self._use_subset(self._cached_subset(max_samples, subset_cache))

    def _use_subset(self, ids: np.ndarray) -> None:
        shard_of = np.searchsorted(self.sample_offset_per_shard, ids, side="right") - 1
        counts = np.bincount(shard_of, minlength=self.num_shards)
        # Streaming's contract (batching/random.py): units are runs of consecutive entries of the id array, one
        # per shard in shard order, summing to epoch_size; the id array maps each epoch position to a sample.
        self._subset, self._subset_units = ids, counts[counts > 0].astype(np.int64)
        self.epoch_size = len(ids)
        self.length = -(-self.epoch_size // self._parallel_rank_world.num_ranks)

    def resample_streams(self, epoch: int, stream_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        if self._subset is None:
            return super().resample_streams(epoch, stream_id)
        return self._subset_units, self._subset  # the same subset every epoch: no resampling

    def _cached_subset(self, n: int, cache_path: str) -> np.ndarray:
        """The subset's ids from the node-local cache at ``cache_path``, else from a pass over the keys (then
        cached). The lock makes the other ranks of a node wait for the first one's pass instead of repeating it."""
        if not cache_path:
            return self._subset_ids(n)
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        with FileLock(cache_path + ".lock"):
            try:
                ids = np.load(cache_path, allow_pickle=False)
                if ids.dtype == np.int64 and ids.shape == (n,) and (np.diff(ids) > 0).all() and \
                        ids[0] >= 0 and ids[-1] < self.num_samples:
                    return ids
            except (OSError, ValueError):
                pass  # missing, truncated or not ours: compute it again
            ids = self._subset_ids(n)
            partial = f"{cache_path}.{os.getpid()}.npy"
            np.save(partial, ids)
            os.replace(partial, cache_path)
        return ids

    def _subset_ids(self, n: int) -> np.ndarray:
        """The sorted sample ids of the n lowest ``subset_priority`` keys: one pass over the key column."""
        best_p, best_i = np.empty(0, np.uint64), np.empty(0, np.int64)
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        held = 0
        for shard_id, shard in enumerate(self.shards):
            priorities = self._read_priorities(shard_id, shard)
            offset = int(self.sample_offset_per_shard[shard_id])
            pending.append((priorities, np.arange(offset, offset + len(priorities), dtype=np.int64)))
            held += len(priorities)
            if held >= max(n, SUBSET_CHUNK) or shard_id == self.num_shards - 1:
                best_p, best_i = _lowest(np.concatenate([best_p, *(p for p, _ in pending)]),
                                         np.concatenate([best_i, *(i for _, i in pending)]), n)
                pending, held = [], 0
        return np.sort(best_i)

    def _read_priorities(self, shard_id: int, shard: Any) -> np.ndarray:
        path = os.path.join(shard.dirname, shard.split, shard.raw_data.basename)
        for attempt in range(3):
            self.prepare_shard(shard_id)  # downloads a remote shard into the cache; a local one is read in place
            try:
                return _shard_priorities(path, shard)
            except FileNotFoundError:
                # Another rank of this node evicted it meanwhile (data.cache_limit): fetch it again.
                self._prepared_shards.discard(shard_id)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        # Streaming's download thread calls this for every sample, and each call takes the cache's file lock and
        # stats the shard file: per sample, that cost as much CPU as decoding the image and slowed the loader
        # by a third (bench/data.py). A shard this process has prepared and that is still LOCAL needs nothing;
        # an evicted shard leaves the LOCAL state, so it is prepared again (get_item touches access times).
        if shard_id in self._prepared_shards and self._shard_states[shard_id] == _ShardState.LOCAL:
            return
        super().prepare_shard(shard_id, blocking)
        if self._shard_states[shard_id] == _ShardState.LOCAL:
            self._prepared_shards.add(shard_id)

    def _resume_incr_epoch(self, *args: Any) -> tuple[int, int]:
        # Streaming decides the epoch here (private hook of StreamingDataset.__iter__); remember it for seeding.
        self.epoch, sample_in_epoch = super()._resume_incr_epoch(*args)
        return self.epoch, sample_in_epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        seed = (self.shuffle_seed * 1_000_003 + self.epoch) * 2_147_483_647 + int(index)
        image = self.transform(decode_tensor(sample["image"]), seed)
        item = {"key": sample["key"], "image": image}
        if self.with_text_meta:
            item |= {"caption": sample["caption"], "meta": sample["meta"]}
            if "captions" in sample:  # a json column of every caption of the image, where a corpus has one
                item["captions"] = sample["captions"]
        else:
            item["tokens"] = tokenize([sample["caption"]], self.context_length)[0]
        return item


def build_train_loader(config: Config) -> StreamingDataLoader:
    """The training loader of this rank (rank and world size from torchrun's environment)."""
    data = config.data
    split_url = storage.join(data.url, "train")
    total, world_size = dataset_size(split_url, data.max_samples), int(os.environ.get("WORLD_SIZE", "1"))
    size = data.max_samples or total
    if data.max_samples and size < world_size * data.batch_size:
        # drop_last would leave every rank without a single batch, and training would wait for one forever.
        raise DataError(f"data.max_samples: {size} is less than one batch over all ranks (world size {world_size} x "
                        f"batch size {data.batch_size})")
    if size % (world_size * data.batch_size) or size % data.num_canonical_nodes:
        log.warning("%s: %d samples is not a multiple of world size %d x batch size %d and of %d canonical "
                    "nodes, so some samples repeat or are skipped each epoch", split_url, size, world_size,
                    data.batch_size, data.num_canonical_nodes)
    dataset = CaptionedImages(
        split_url, config, transform=train_transform(data, config.model.image_size), with_text_meta=False,
        shuffle=data.shuffle, shuffle_seed=data.shuffle_seed, num_canonical_nodes=data.num_canonical_nodes,
        batch_size=data.batch_size, predownload=data.predownload or None, cache_limit=data.cache_limit or None,
        shuffle_algo=data.shuffle_algo, shuffle_block_size=data.shuffle_block_size or None,
        max_samples=data.max_samples, subset_cache=_subset_cache_path(config, split_url),
    )
    if data.max_samples and os.environ.get("RANK", "0") == "0":
        print(f"[data] training on a subset of {data.max_samples} of the {total} samples of {split_url} "
              f"(data.max_samples)", flush=True)
    return StreamingDataLoader(dataset, batch_size=data.batch_size, num_workers=data.num_workers, drop_last=True,
                               persistent_workers=data.num_workers > 0, pin_memory=torch.cuda.is_available(),
                               worker_init_fn=_ignore_sigterm)


def _subset_cache_path(config: Config, split_url: str) -> str:
    """Where this node caches the subset's ids; empty (no cache) without a manifest to tell corpora apart.

    The name digests the split's URL, index and the corpus manifest (which holds every shard's SHA-256), so a
    corpus rewritten at the same URL gets a new entry. Node-local: the corpus URL may belong to someone else.
    """
    if not config.data.max_samples:
        return ""
    try:
        manifest = storage.read_bytes(storage.join(config.data.url, "manifest.json"), limit=INDEX_LIMIT)
    except (FileNotFoundError, ValueError):
        return ""
    digest = hashlib.sha256(SUBSET_SALT)
    for part in (split_url.encode(), _read_index(split_url).encode(), manifest, str(config.data.max_samples).encode()):
        digest.update(hashlib.sha256(part).digest())
    root = config.data.cache_dir or os.path.join(tempfile.gettempdir(), "maeclip-cache")
    return os.path.join(root, "subsets", f"{digest.hexdigest()[:32]}.npy")


def _ignore_sigterm(worker_id: int) -> None:
    """torchrun's agent stops a worker by signalling its whole process group: the loader's processes must
    outlive that SIGTERM, so the rank can finish its step and checkpoint (they exit with the rank)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)



def collate_eval(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Eval samples to one batch: stacked images; keys, captions and meta as lists. ``captions`` holds every
    caption of each image: a sample's own ``captions``, else its one caption (none when it is empty)."""
    return {
        "key": [s["key"] for s in samples],
        "image": torch.stack([s["image"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "captions": [list(s["captions"]) if "captions" in s else [s["caption"]] if s["caption"] else []
                     for s in samples],
        "meta": [s["meta"] for s in samples],
    }


def iter_eval_batches(split_url: str, config: Config, batch_size: int) -> Iterator[dict[str, Any]]:
    """Every sample of an eval split once, in stored order, as batches with keys, captions and meta."""
    dataset_size(split_url)
    dataset = CaptionedImages(split_url, config, transform=eval_transform(config.data, config.model.image_size),
                              with_text_meta=True, shuffle=False, batch_size=batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0, collate_fn=collate_eval)
    try:
        yield from loader
    finally:
        release_shared_memory(dataset)
