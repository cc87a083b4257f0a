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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch
from streaming import StreamingDataLoader, StreamingDataset
from streaming.base.dataset import _ShardState

from trainer import storage
from trainer.config import Config
from trainer.data.tokenizer import tokenize
from trainer.data.transforms import Transform, decode_tensor, eval_transform, train_transform

log = logging.getLogger(__name__)
SHM_ATTEMPTS = 10


class DataError(ValueError):
    """A dataset that is missing, empty or unreadable; the message names the URL."""


# An MDS index lists every shard in a few hundred bytes each: 64 MiB is millions of shards.
INDEX_LIMIT = 64 << 20


def dataset_size(split_url: str) -> int:
    """Samples in the MDS split at ``split_url``; DataError when there is none or it is empty."""
    index_url = storage.join(split_url, "index.json")
    if not storage.exists(index_url):
        raise DataError(f"no MDS dataset at {split_url} (run `maeclip data shapes --out URL` or ingest first)")
    try:
        shards = json.loads(storage.read_text(index_url, limit=INDEX_LIMIT))["shards"]
        total = sum(shard["samples"] for shard in shards)
    except (ValueError, KeyError, TypeError, RecursionError) as err:  # not JSON, too large, not an MDS index
        raise DataError(f"unreadable MDS index at {index_url}: {type(err).__name__}: {err}") from err
    if not isinstance(total, int) or total < 0:
        raise DataError(f"unreadable MDS index at {index_url}: sample counts are not counts")
    if total == 0:
        raise DataError(f"the dataset at {split_url} is empty (0 samples)")
    return total


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

    def __init__(self, split_url: str, config: Config, *, transform: Transform, with_text_meta: bool,
                 **streaming_args: Any) -> None:
        remote, local = _remote_and_local(split_url, config.data.cache_dir)
        for attempt in range(SHM_ATTEMPTS):
            try:
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
        else:
            item["tokens"] = tokenize([sample["caption"]], self.context_length)[0]
        return item


def build_train_loader(config: Config) -> StreamingDataLoader:
    """The training loader of this rank (rank and world size from torchrun's environment)."""
    data = config.data
    split_url = storage.join(data.url, "train")
    size, world_size = dataset_size(split_url), int(os.environ.get("WORLD_SIZE", "1"))
    if size % (world_size * data.batch_size) or size % data.num_canonical_nodes:
        log.warning("%s: %d samples is not a multiple of world size %d x batch size %d and of %d canonical "
                    "nodes, so some samples repeat or are skipped each epoch", split_url, size, world_size,
                    data.batch_size, data.num_canonical_nodes)
    dataset = CaptionedImages(
        split_url, config, transform=train_transform(data, config.model.image_size), with_text_meta=False,
        shuffle=data.shuffle, shuffle_seed=data.shuffle_seed, num_canonical_nodes=data.num_canonical_nodes,
        batch_size=data.batch_size, predownload=data.predownload or None, cache_limit=data.cache_limit or None,
        shuffle_algo=data.shuffle_algo, shuffle_block_size=data.shuffle_block_size or None,
    )
    return StreamingDataLoader(dataset, batch_size=data.batch_size, num_workers=data.num_workers, drop_last=True,
                               persistent_workers=data.num_workers > 0, pin_memory=torch.cuda.is_available(),
                               worker_init_fn=_ignore_sigterm)


def _ignore_sigterm(worker_id: int) -> None:
    """torchrun's agent stops a worker by signalling its whole process group: the loader's processes must
    outlive that SIGTERM, so the rank can finish its step and checkpoint (they exit with the rank)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)



def collate_eval(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Eval samples to one batch: stacked images, keys, captions and meta as lists."""
    return {
        "key": [s["key"] for s in samples],
        "image": torch.stack([s["image"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }


def iter_eval_batches(split_url: str, config: Config, batch_size: int) -> Iterator[dict[str, Any]]:
    """Every sample of an eval split once, in stored order, as batches with keys, captions and meta."""
    dataset_size(split_url)
    dataset = CaptionedImages(split_url, config, transform=eval_transform(config.data, config.model.image_size),
                              with_text_meta=True, shuffle=False, batch_size=batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0, collate_fn=collate_eval)
    yield from loader
