"""Checkpoints at ``<run_url>/checkpoints/step-{step:09d}/`` (docs/contracts.md §4).

Each holds the ``torch.distributed.checkpoint`` (DCP) state of model and optimizer (resharded on load, so the
world size may change between save and resume), ``weights.safetensors`` (model only, for evaluators and export),
``config.yaml``, ``meta.json`` (step, samples seen, loader position, config digest, MLflow run id, wall time)
and ``COMMITTED``, written last. A directory without ``COMMITTED`` does not exist for any reader, which is what
lets ``save_async`` upload shards while training goes on. No RNG state is stored: every step reseeds from
(seed, step, rank) and the loader's augmentation from (seed, epoch, sample), so resume needs none.

Loading never unpickles an arbitrary object. DCP's ``.metadata`` is a pickle, and DCP's own readers
``pickle.load`` it before any planner runs; ``SafeFileSystemReader`` / ``SafeFsspecReader`` read it instead
(at most ``MAX_METADATA_BYTES``) through an unpickler that admits only the few globals a DCP ``Metadata``
is built from (``_METADATA_GLOBALS``) and keep only a ``Metadata`` whose shard paths are plain file names.
DCP reads tensors with ``weights_only=True``; its few non-tensor leaves are first read with
``weights_only=True`` too (``SafeLoadPlanner``). The rest is JSON, YAML (``trainer.config.load_yaml``: no
tags, no aliases) and safetensors, each read with a size cap, so loader state lives in ``meta.json`` as JSON,
not in DCP. A checkpoint that breaks these rules raises ``CheckpointRefused``, which ``resume`` never skips
past to an older checkpoint.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib
import pickle
import posixpath
import re
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import IO, Any

import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

from trainer import storage
from trainer.config import Config, ConfigError, from_yaml, to_yaml

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step-(\d{9})$")
COMMITTED = "COMMITTED"
# Caps on what reading a checkpoint may pull into memory. DCP's .metadata is about 0.4 MiB for ViT-B/16
# MAE-CLIP with AdamW on one rank (it grows with tensors x shards); config.yaml and meta.json are a few KiB.
MAX_METADATA_BYTES = 256 << 20
MAX_TEXT_BYTES = 4 << 20
MAX_WEIGHTS_BYTES = 16 << 30
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own cap on its JSON header


class CheckpointRefused(ValueError):
    """A checkpoint that is malformed or was tampered with; the message is one line naming its URL."""


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


def checkpoint_step(url: str) -> int:
    """The step of a checkpoint URL (``.../step-000000400`` -> 400)."""
    match = _STEP_DIR.match(url.rstrip("/").rsplit("/", 1)[-1])
    if match is None:
        raise ValueError(f"{url} is not a checkpoint URL (…/step-NNNNNNNNN)")
    return int(match.group(1))


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


def _refused(where: str, reason: object) -> CheckpointRefused:
    text = " ".join(str(reason).split())  # YAML and pickle errors span lines; the CLI prints one
    return CheckpointRefused(f"refusing checkpoint {where}: {text[:400]}")


def _read_capped(stream: IO[bytes], limit: int, where: str) -> bytes:
    """All of ``stream``, refusing more than ``limit`` bytes without ever holding more than that."""
    chunks, total = [], 0
    while chunk := stream.read(min(1 << 20, limit + 1 - total)):
        total += len(chunk)
        if total > limit:
            raise _refused(where, f"larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _layout(name: str) -> torch.layout:
    # What torch pickles a layout as (torch.serialization._get_layout): a lookup by name, done here without
    # reaching into torch.serialization.
    layouts = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
    if name not in layouts:
        raise pickle.UnpicklingError(f"unknown torch layout {name!r}")
    return layouts[name]


# Every global DCP's Metadata pickle refers to, found by listing what find_class is asked for when loading
# the .metadata of our own saves (save and save_async; clip, maeclip, mae, m3ae; one process and two FSDP2
# ranks; file and fsspec): nothing here runs code when called with pickled arguments.
_METADATA_GLOBALS: dict[tuple[str, str], Any] = {
    # The dataclasses and enum the Metadata tree is made of (constructed, then their fields set).
    **{("torch.distributed.checkpoint.metadata", cls.__name__): cls for cls in (
        dcp_metadata.Metadata,  # the root
        dcp_metadata.StorageMeta,  # Metadata.storage_meta
        dcp_metadata.MetadataIndex,  # keys of Metadata.storage_data
        dcp_metadata.TensorStorageMetadata,  # one per tensor in state_dict_metadata
        dcp_metadata.TensorProperties,  # its dtype and layout
        dcp_metadata.ChunkStorageMetadata,  # its shards' offsets and sizes
        dcp_metadata.BytesStorageMetadata,  # one per non-tensor leaf (optimizer hyperparameters)
        dcp_metadata._MEM_FORMAT_ENCODING,  # TensorProperties pickles its memory format as this enum
    )},
    # Values of Metadata.storage_data: which file, offset and length hold each item.
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,  # tensor and chunk shapes (a tuple subclass)
    ("torch.serialization", "_get_layout"): _layout,  # TensorProperties.layout, looked up by name
    # StorageMeta.checkpoint_id of a local save is a path object.
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    # TensorProperties.dtype: torch pickles a dtype as the global torch.<name>; inert values.
    **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _METADATA_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata") from None


def parse_dcp_metadata(data: bytes, where: str) -> dcp_metadata.Metadata:
    """DCP's ``Metadata`` from the bytes of a ``.metadata`` file, never running code; else CheckpointRefused.

    ``pickle`` builds no objects but through ``find_class`` (persistent ids are refused by default), so with
    only ``_METADATA_GLOBALS`` admitted the result is plain containers, numbers, strings and DCP's
    dataclasses; it must then be a ``Metadata`` whose every shard is a file inside the checkpoint.
    """
    if len(data) > MAX_METADATA_BYTES:
        raise _refused(where, f"larger than {MAX_METADATA_BYTES} bytes")
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as err:  # forbidden globals, truncation and garbage all raise their own types
        raise _refused(where, f"{type(err).__name__}: {err}") from None
    if type(metadata) is not dcp_metadata.Metadata:
        raise _refused(where, f"not a DCP Metadata but {type(metadata).__name__}")
    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(metadata.storage_data, dict):
        raise _refused(where, "DCP Metadata without state_dict_metadata or storage_data")
    for info in metadata.storage_data.values():
        # A shard path like ../../x would make DCP read a file outside the checkpoint.
        path = getattr(info, "relative_path", None)
        if type(info) is not _StorageInfo or not isinstance(path, str) or path in ("", ".", "..") \
                or posixpath.basename(path) != path or os.sep in path or "\\" in path:
            raise _refused(where, f"shard entry {info!r} is not a file of this checkpoint")
    if metadata.storage_meta is not None and type(metadata.storage_meta) is not dcp_metadata.StorageMeta:
        raise _refused(where, "malformed storage_meta")
    return metadata


class _SafeMetadataReader:
    """``read_metadata`` of DCP's file readers without ``pickle.load``: the parent's, but through
    ``parse_dcp_metadata``. ``refused`` keeps a refusal, since DCP catches reader errors and retries with a
    rank-local ``__{rank}.metadata``; the caller checks it whatever ``dcp.load`` did."""

    refused: CheckpointRefused | None = None
    url: str | None = None  # named in refusals instead of DCP's path (a local path has lost its file://)

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        where = storage.join(self.url, posixpath.basename(os.fspath(path))) if self.url else str(path)
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = parse_dcp_metadata(_read_capped(stream, MAX_METADATA_BYTES, where), where)
            except CheckpointRefused as err:
                self.refused = err
                raise
        if metadata.storage_meta is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as DCP's reader does
        return metadata


class SafeFileSystemReader(_SafeMetadataReader, FileSystemReader):
    """DCP's local-disk reader with the metadata read safely."""


class SafeFsspecReader(_SafeMetadataReader, FsspecReader):
    """DCP's fsspec reader (gs://, s3://) with the metadata read safely."""


def safe_storage_reader(url: str) -> SafeFileSystemReader | SafeFsspecReader:
    """The DCP reader ``dcp.load`` would pick for ``url`` (local for file://, fsspec otherwise), made safe."""
    local = storage.local_path(url)
    reader = SafeFileSystemReader(local) if local is not None else SafeFsspecReader(url)
    reader.url = url
    return reader


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, but never unpickling arbitrary objects.

    DCP stores every non-tensor leaf (the optimizer's hyperparameters) as a pickle and reads it back with
    ``torch.load(weights_only=False)``. Each one is first read with ``weights_only=True``, which only builds
    plain containers, numbers and tensors and raises on anything else, so a tampered checkpoint cannot run code.
    A leaf refused that way is kept in ``refused`` (DCP wraps the error on its way out).
    """

    def __init__(self, where: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.where = where
        self.refused: CheckpointRefused | None = None

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:  # what weights_only raises for a forbidden global
            self.refused = _refused(self.where, f"leaf {read_item.dest_index.fqn} is not plain data: {err}")
            raise self.refused from None
        value.seek(0)
        super().load_bytes(read_item, value)


def _refusal(err: BaseException | None, *sources: Any) -> CheckpointRefused | None:
    """A refusal recorded by a reader or planner, or carried by DCP's CheckpointException from any rank."""
    for source in sources:
        if source.refused is not None:
            return source.refused
    if isinstance(err, CheckpointRefused):
        return err
    if isinstance(err, CheckpointException):
        for failure, _ in err.failures.values():
            if isinstance(failure, CheckpointRefused):
                return failure
    return None


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


def written_by_us(url: str) -> bool:
    """Whether ``url`` is a checkpoint ``_commit`` wrote: ``COMMITTED``, and a ``meta.json`` with a config digest.

    The only checkpoint directories retention may delete (docs/contracts.md §8); a missing, oversized or
    malformed ``meta.json`` means someone else's directory, not an error.
    """
    if not storage.exists(storage.join(url, COMMITTED)):
        return False
    try:
        meta = json.loads(_read_file(url, "meta.json", MAX_TEXT_BYTES).decode("utf-8"))
    except (FileNotFoundError, CheckpointRefused, ValueError):  # ValueError: bad JSON or UTF-8
        return False
    return isinstance(meta, dict) and "config_digest" in meta


def _prune(run_url: str, keep_last: int) -> None:
    # Counted and deleted among our own checkpoints only: anything else under checkpoints/ is not ours to remove.
    ours = [(step, url) for step, url in committed_checkpoints(run_url) if written_by_us(url)]
    for step, url in ours[:-keep_last]:
        if storage.exists(storage.join(url, "PROMOTED")):
            continue  # checkpoints the gate promoted are kept (docs/contracts.md §4)
        log.info("removing old checkpoint step %d", step)
        storage.remove(storage.join(url, COMMITTED))  # uncommit first: a half-deleted dir stays invisible
        storage.remove(url)


# The marker that makes a run URL ours (docs/contracts.md §8): training writes and prunes only under a URL
# that has it.
RUN_MARKER = ".maeclip-run"
# storage.check_writable's probe, removed right after it is written: never a sign of someone else's data.
_WRITE_PROBE = ".maeclip-write-probe"


class RunInUse(ValueError):
    """A run URL that holds data maeclip did not write; training there could overwrite or prune it."""


def _entry_list(names: list[str], shown: int = 5) -> str:
    # Names come from whoever wrote the folder: quoted and cut, so the CLI's one line stays short.
    listed = ", ".join(repr(name if len(name) <= 60 else name[:60] + "…") for name in names[:shown])
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")


def claim_run(run_url: str) -> None:
    """Make ``run_url`` a maeclip run before anything is written into it, or raise ``RunInUse``.

    A URL with the ``.maeclip-run`` marker is ours; an empty one gets the marker. A URL an older maeclip trained
    into (no marker, but committed checkpoints ``_commit`` wrote) is adopted the same way. Anything else holds
    someone else's data, which training's config, checkpoints and retention must never touch.
    """
    marker = storage.join(run_url, RUN_MARKER)
    if storage.exists(marker):
        return
    entries = [name for name in storage.list_dir(run_url) if name != _WRITE_PROBE]
    if entries and not any(written_by_us(url) for _, url in committed_checkpoints(run_url)):
        raise RunInUse(f"run URL {run_url} holds data maeclip did not write ({_entry_list(entries)}); refusing to "
                       f"train into it: choose an empty train.run_url or an existing maeclip run")
    storage.write_text(marker, json.dumps({"created": time.time(), "by": "maeclip"}))


def read_meta(url: str) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(url, "meta.json")))


def _read_file(url: str, name: str, limit: int) -> bytes:
    """``url/name``, at most ``limit`` bytes (else CheckpointRefused); a missing file is FileNotFoundError."""
    where = storage.join(url, name)
    with storage.open_file(where) as handle:
        try:
            return _read_capped(handle, limit, where)
        except (CheckpointRefused, FileNotFoundError):
            raise
        except Exception as err:  # gcsfs/s3fs raise many types mid-read; all mean unreachable storage
            raise storage.StorageError(f"cannot read '{where}': {type(err).__name__}: {err}") from err


def _checked_meta(url: str) -> dict[str, Any]:
    where, data = storage.join(url, "meta.json"), _read_file(url, "meta.json", MAX_TEXT_BYTES)
    try:
        meta = json.loads(data.decode("utf-8"))
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError alike
        raise _refused(where, f"not JSON: {err}") from None
    if not isinstance(meta, dict):
        raise _refused(where, f"not a JSON object but {type(meta).__name__}")
    step = meta.get("step")
    if type(step) is not int or step < 0:
        raise _refused(where, f"'step' is {step!r}, not a step number")
    return meta


def _checked_config(url: str) -> Config:
    where, data = storage.join(url, "config.yaml"), _read_file(url, "config.yaml", MAX_TEXT_BYTES)
    try:
        return from_yaml(data.decode("utf-8"))
    except ConfigError as err:
        raise _refused(where, f"invalid config: {err}") from None
    except Exception as err:  # bad UTF-8, YAML syntax, a document that is not a mapping: all malformed
        raise _refused(where, f"{type(err).__name__}: {err}") from None


def _checked_weights_size(url: str) -> int:
    """Size of ``weights.safetensors`` once its header is sound: the tensors it lists fill the file exactly."""
    where = storage.join(url, "weights.safetensors")
    fs, path = storage.filesystem(where)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise storage.StorageError(f"cannot check '{where}': {type(err).__name__}: {err}") from err
    if size is None or size > MAX_WEIGHTS_BYTES:
        raise _refused(where, f"size {size} is not within {MAX_WEIGHTS_BYTES} bytes")
    with storage.open_file(where) as handle:
        try:
            prefix = handle.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < length <= min(size - 8, _SAFETENSORS_MAX_HEADER):
                raise _refused(where, "truncated or not safetensors (bad header length)")
            header_bytes = handle.read(length)
        except (CheckpointRefused, FileNotFoundError):
            raise
        except Exception as err:
            raise storage.StorageError(f"cannot read '{where}': {type(err).__name__}: {err}") from err
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except ValueError as err:
        raise _refused(where, f"safetensors header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise _refused(where, "safetensors header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise _refused(where, f"malformed safetensors entry {name!r}")
        end = max(end, offsets[1])
    if 8 + length + end != size:
        raise _refused(where, f"truncated: its tensors need {8 + length + end} bytes, the file has {size}")
    return size


def verify_checkpoint(url: str) -> tuple[Config, dict[str, Any]]:
    """Check a committed checkpoint without loading its tensors; return its (config, meta).

    Reads DCP's ``.metadata`` through the safe unpickler, ``config.yaml`` into a valid Config, ``meta.json``
    (a JSON object with an integer ``step``) and the safetensors header of ``weights.safetensors``, each with
    a size cap. A tampered or malformed part raises CheckpointRefused (one line, naming the URL); a missing
    one FileNotFoundError.
    """
    config, meta, _ = _verify(url)
    return config, meta


def _verify(url: str) -> tuple[Config, dict[str, Any], int]:
    """``verify_checkpoint``, plus the size of the weights file it checked."""
    if not storage.exists(storage.join(url, COMMITTED)):
        raise FileNotFoundError(f"no committed checkpoint at {url}")
    try:
        safe_storage_reader(url).read_metadata()
    except (CheckpointRefused, FileNotFoundError):
        raise
    except Exception as err:
        raise storage.StorageError(f"cannot read '{storage.join(url, '.metadata')}': {type(err).__name__}: {err}"
                                   ) from err
    return _checked_config(url), _checked_meta(url), _checked_weights_size(url)


def resume(run_url: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> Resumed | None:
    """Load the newest committed checkpoint that loads cleanly into model and optimizer (collective).

    A checkpoint that fails to load (torn shard, missing file) is skipped with a warning and the previous one
    is tried, so one bad write never strands a run. When checkpoints exist but none loads, this raises rather
    than silently starting over. A checkpoint refused as tampered (``CheckpointRefused``: its metadata or a
    leaf is not plain data, its meta.json is not a step record) is never skipped: that raises, so a run does
    not quietly go back to an older state an attacker chose.
    """
    found = committed_checkpoints(run_url)
    for step, url in reversed(found):
        reader, planner = safe_storage_reader(url), SafeLoadPlanner(url)
        try:
            meta = _checked_meta(url)
            reader.read_metadata()  # refuse here, before DCP retries with (and logs) a rank-local metadata
            state = _state(model, optimizer)
            dcp.load(state, storage_reader=reader, planner=planner)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        # Any unreadable checkpoint (DCP's CheckpointException is a BaseException): fall back to the one before.
        except (Exception, CheckpointException) as err:
            if (refused := _refusal(err, reader, planner)) is not None:
                raise refused from None
            log.warning("skipping unreadable checkpoint %s: %s: %s", url, type(err).__name__, err)
            continue
        if (refused := _refusal(None, reader, planner)) is not None:  # DCP recovered from it: still refused
            raise refused
        return Resumed(step=step, meta=meta, url=url)
    if found:  # a failed load may have half-filled the model: never train on from that
        raise RuntimeError(f"none of the {len(found)} committed checkpoints under {run_url} could be loaded")
    return None


def load_for_eval(url: str) -> tuple[Config, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, model weights, meta) of a committed checkpoint, for evaluators and export.

    The checkpoint is verified first (``verify_checkpoint``), so a tampered one is refused even though only
    its weights are used; weights that do not load as safetensors raise CheckpointRefused too.
    """
    config, meta, size = _verify(url)
    where = storage.join(url, "weights.safetensors")
    with storage.open_file(where) as handle:
        try:
            data = handle.read(size + 1)  # one buffer (weights are large), and never past the checked size
        except Exception as err:
            raise storage.StorageError(f"cannot read '{where}': {type(err).__name__}: {err}") from err
    if len(data) != size:
        raise _refused(where, f"changed while read ({len(data)} bytes, {size} when checked)")
    try:
        weights = safetensors.torch.load(data)
    except Exception as err:  # safetensors' SafetensorError, or a dtype torch does not have
        raise _refused(where, f"{type(err).__name__}: {err}") from None
    return config, weights, meta


def mark(url: str, marker: str, text: str = "") -> str:
    """Write a marker file (``PROMOTED``, ``REJECTED``) into a committed checkpoint; return the checkpoint URL."""
    if not storage.exists(storage.join(url, COMMITTED)):
        raise FileNotFoundError(f"no committed checkpoint at {url}")
    storage.write_text(storage.join(url, marker), text)
    return url
