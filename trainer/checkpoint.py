"""Checkpoints at ``<run_url>/checkpoints/step-{step:09d}/`` (design §5).

Each holds the ``torch.distributed.checkpoint`` (DCP) state of model and optimizer (resharded on load, so the
world size may change between save and resume), ``weights.safetensors`` (model only, for evaluators and export),
``config.yaml``, ``meta.json`` (step, samples seen, loader position, config digest, MLflow run id, wall time)
and ``COMMITTED``, written last. A directory without ``COMMITTED`` does not exist for any reader, which is what
lets ``save_async`` upload shards while training goes on. No RNG state is stored: every step reseeds from
(seed, step, rank) and the loader's augmentation from (seed, epoch, sample), so resume needs none. Loading never
unpickles: DCP's few non-tensor leaves are read with ``weights_only=True`` (``SafeLoadPlanner``), the rest is
JSON/YAML, weights are safetensors; so loader state lives in ``meta.json`` as JSON, not in DCP.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

from trainer import storage
from trainer.config import Config, from_yaml, to_yaml

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step-(\d{9})$")
COMMITTED = "COMMITTED"


def checkpoint_url(run_url: str, step: int) -> str:
    return storage.join(run_url, "checkpoints", f"step-{step:09d}")


def committed_checkpoints(run_url: str) -> list[tuple[int, str]]:
    """(step, url) of every committed checkpoint of a run, oldest first."""
    root = storage.join(run_url, "checkpoints")
    found = []
    for name in storage.list_dir(root):
        match = _STEP_DIR.match(name)
        url = storage.join(root, name)
        if match and storage.exists(storage.join(url, COMMITTED)):
            found.append((int(match.group(1)), url))
    return sorted(found)


def latest_checkpoint(run_url: str) -> str | None:
    found = committed_checkpoints(run_url)
    return found[-1][1] if found else None


def _dcp_id(url: str) -> str:
    # DCP picks its local FileSystemWriter for paths and its fsspec writer for gs://, s3:// URLs.
    return storage.local_path(url) or url


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, but never unpickling arbitrary objects.

    DCP stores every non-tensor leaf (the optimizer's hyperparameters) as a pickle and reads it back with
    ``torch.load(weights_only=False)``. Each one is first read with ``weights_only=True``, which only builds
    plain containers, numbers and tensors and raises on anything else, so a tampered checkpoint cannot run code.
    """

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        torch.load(value, weights_only=True)
        value.seek(0)
        super().load_bytes(read_item, value)


@dataclass
class Resumed:
    step: int
    meta: dict[str, Any]
    url: str


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def _write_weights(url: str, model: nn.Module) -> None:
    # Whole (unsharded) tensors on rank 0, also under FSDP; collective, so every rank calls it.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _is_rank0():
        weights = {k: v.detach().contiguous() for k, v in full.items()}
        storage.write_bytes(storage.join(url, "weights.safetensors"), safetensors.torch.save(weights))


def _commit(run_url: str, url: str, step: int, config: Config, meta: dict[str, Any]) -> str:
    """After every rank's shards are written: rank 0 writes config, meta and then COMMITTED, and prunes."""
    _barrier()
    if _is_rank0():
        storage.write_text(storage.join(url, "config.yaml"), to_yaml(config))
        full_meta = {"step": step, "config_digest": config.digest(), "wall_time": time.time(), **meta}
        storage.write_text(storage.join(url, "meta.json"), json.dumps(full_meta, indent=1))
        storage.write_text(storage.join(url, COMMITTED), "")
        _prune(run_url, config.train.keep_last)
    _barrier()
    return url


def save(
    run_url: str,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Config,
    meta: dict[str, Any],
) -> str:
    """Save on every rank (collective); rank 0 writes weights, config, meta and then COMMITTED."""
    url = checkpoint_url(run_url, step)
    dcp.save(_state(model, optimizer), checkpoint_id=_dcp_id(url))
    _write_weights(url, model)
    return _commit(run_url, url, step, config, meta)


class PendingCheckpoint:
    """A checkpoint whose DCP shards are still being written in the background; ``wait`` commits it.

    Until ``wait`` returns, the directory has no ``COMMITTED`` and so does not exist for any reader: a job
    killed mid-write resumes from the checkpoint before.
    """

    def __init__(self, future: Future, commit: Callable[[], str]) -> None:
        self._future, self._commit = future, commit

    def wait(self) -> str:
        self._future.result()
        return self._commit()


def save_async(
    run_url: str,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Config,
    meta: dict[str, Any],
    process_group: dist.ProcessGroup | None = None,
) -> PendingCheckpoint:
    """Like ``save``, but training goes on while the model and optimizer shards upload.

    The state is staged to CPU memory before this returns, so later optimizer steps do not leak into the
    checkpoint. The small whole-model ``weights.safetensors`` is written now; the shards (model plus optimizer
    moments, about three times as large) in a background thread. ``process_group`` should be a gloo group
    of its own, so the background thread's collectives never interleave with training's.
    """
    url = checkpoint_url(run_url, step)
    response = dcp.async_save(_state(model, optimizer), checkpoint_id=_dcp_id(url), process_group=process_group)
    future = response.upload_completion if isinstance(response, AsyncSaveResponse) else response
    _write_weights(url, model)
    return PendingCheckpoint(future, lambda: _commit(run_url, url, step, config, meta))


def _prune(run_url: str, keep_last: int) -> None:
    for step, url in committed_checkpoints(run_url)[:-keep_last]:
        if storage.exists(storage.join(url, "PROMOTED")):
            continue  # checkpoints the gate promoted are kept (design §5)
        log.info("removing old checkpoint step %d", step)
        storage.remove(storage.join(url, COMMITTED))  # uncommit first: a half-deleted dir stays invisible
        storage.remove(url)


def read_meta(url: str) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(url, "meta.json")))


def resume(run_url: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> Resumed | None:
    """Load the newest committed checkpoint that loads cleanly into model and optimizer (collective).

    A checkpoint that fails to load (torn shard, missing file) is skipped with a warning and the previous one
    is tried, so one bad write never strands a run. When checkpoints exist but none loads, this raises rather
    than silently starting over.
    """
    found = committed_checkpoints(run_url)
    for step, url in reversed(found):
        try:
            meta = read_meta(url)
            state = _state(model, optimizer)
            dcp.load(state, checkpoint_id=_dcp_id(url), planner=SafeLoadPlanner())
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        # Any unreadable checkpoint (DCP's CheckpointException is a BaseException): fall back to the one before.
        except (Exception, CheckpointException) as err:
            log.warning("skipping unreadable checkpoint %s: %s: %s", url, type(err).__name__, err)
            continue
        return Resumed(step=step, meta=meta, url=url)
    if found:  # a failed load may have half-filled the model: never train on from that
        raise RuntimeError(f"none of the {len(found)} committed checkpoints under {run_url} could be loaded")
    return None


def load_for_eval(url: str) -> tuple[Config, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, model weights, meta) of a committed checkpoint, for evaluators and export."""
    if not storage.exists(storage.join(url, COMMITTED)):
        raise FileNotFoundError(f"no committed checkpoint at {url}")
    config = from_yaml(storage.read_text(storage.join(url, "config.yaml")))
    weights = safetensors.torch.load(storage.read_bytes(storage.join(url, "weights.safetensors")))
    return config, weights, read_meta(url)


def mark(url: str, marker: str, text: str = "") -> str:
    """Write a marker file (``PROMOTED``, ``REJECTED``) into a committed checkpoint; return the checkpoint URL."""
    if not storage.exists(storage.join(url, COMMITTED)):
        raise FileNotFoundError(f"no committed checkpoint at {url}")
    storage.write_text(storage.join(url, marker), text)
    return url
