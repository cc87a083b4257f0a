"""``maeclip data ingest``: web-style corpora into MDS (design §1) at any storage URL, resumably.

Each input shard (a tar, a table file, a class folder) becomes its own MDS sub-directory ``OUT/SPLIT/NAME/``,
written through Streaming's uploader and committed by a ``done.json`` written last. A rerun skips committed
shards and redoes any others, so a killed ingest resumes without duplicates; the output bytes depend only on
the input and the options (never on timing or ``--workers``), so the rerun's shards hash the same. The split's
``index.json`` is merged from the committed sub-indexes (``streaming.base.util.merge_index``) only at the end,
so it never names a shard that is not there. ``OUT/manifest.json`` sums the committed shards' counts.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from streaming import MDSWriter
from streaming.base.util import merge_index
from tqdm import tqdm

from trainer import storage
from trainer.data.loader import DataError
from trainer.data.shapes import COLUMNS
from trainer.data.sources import FORMATS, InputShard, RawRecord, TableColumns, list_input_shards, read_records

GENERATOR = "ingest-v1"
REASONS = ("undecodable", "empty_caption", "non_utf8_caption", "unpaired", "oversized")
DONE = "done.json"
# Streaming's default shard size (MDSWriter ``size_limit`` = 1 << 26).
SHARD_SIZE_LIMIT = 1 << 26


@dataclass(frozen=True)
class IngestOptions:
    """Everything that decides the output bytes; a committed shard written with other options is redone."""

    format: str
    split: str = "train"
    # Shorter side in pixels, as img2dataset's default ``image_size`` 256; 0 keeps the stored image.
    resize: int = 256
    jpeg_quality: int = 90
    # Larger images are skipped as oversized; PIL warns from 89.5 MP (``Image.MAX_IMAGE_PIXELS``).
    max_pixels: int = 89_478_485
    image_column: str = "image"
    caption_column: str = "caption"
    key_column: str = "key"
    # CLIP's ImageNet prompt "a photo of a {}." (Radford et al. 2021, prompt engineering section).
    caption_template: str = "a photo of a {class}."


class SkippedSample(DataError):
    """A bad sample under ``--on-error fail``: names the key and the reason."""


def _fit(image: Image.Image, data: bytes, options: IngestOptions) -> bytes:
    """The stored bytes: JPEG/PNG at most ``resize`` px on the shorter side, others re-encoded as JPEG."""
    small_enough = not options.resize or min(image.size) <= options.resize
    if small_enough and image.format in ("JPEG", "PNG"):
        return data
    if not small_enough:
        scale = options.resize / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=options.jpeg_quality)
    return buffer.getvalue()


def judge(record: RawRecord, options: IngestOptions) -> tuple[dict[str, Any] | None, str, str]:
    """The MDS sample of a raw record, or None with the skip reason and a detail for the manifest."""
    if record.image is None or record.caption is None:
        return None, "unpaired", "no image" if record.image is None else "no caption"
    try:
        caption = record.caption.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, "non_utf8_caption", str(err)
    caption = " ".join(caption.split())
    if not caption:
        return None, "empty_caption", ""
    try:
        with Image.open(io.BytesIO(record.image)) as image:
            if image.width * image.height > options.max_pixels:  # judged from the header, never decoded
                return None, "oversized", f"{image.width}x{image.height}"
            image.load()
            data = _fit(image, record.image, options)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        return None, "undecodable", f"{type(err).__name__}: {err}"[:200]
    meta = {"source": f"{options.format}", **record.meta}
    return {"key": record.key, "image": data, "caption": caption, "meta": meta}, "", ""


def _dir_name(shard: InputShard) -> str:
    """A storage-safe, stable sub-directory name; unusual names get a hash so two never collide."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", shard.name):
        return shard.name
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", shard.name.encode("utf-8", "surrogateescape").decode("ascii", "replace"))
    digest = hashlib.sha256(shard.name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{safe.strip('._-')[:40] or 'shard'}-{digest}"


@dataclass(frozen=True)
class _Job:
    shard: InputShard
    out_url: str
    options: IngestOptions
    on_error: str


def _samples(job: _Job, counts: Counter, skipped: list[dict[str, str]]) -> Iterator[dict[str, Any]]:
    columns = TableColumns(job.options.image_column, job.options.caption_column, job.options.key_column)
    for record in read_records(job.shard, job.options.format, columns, job.options.caption_template):
        counts["read"] += 1
        sample, reason, detail = judge(record, job.options)
        if sample is None:
            if job.on_error == "fail":
                raise SkippedSample(f"{job.shard.url}: sample '{record.key}' is {reason} ({detail})")
            counts[reason] += 1
            skipped.append({"key": record.key, "reason": reason, "detail": detail})
            continue
        counts["written"] += 1
        yield sample


def ingest_shard(job: _Job) -> dict[str, Any]:
    """Write one input shard's MDS sub-directory and commit it; return the committed record."""
    sub_url = storage.join(job.out_url, job.options.split, _dir_name(job.shard))
    storage.remove(sub_url)  # the leftovers of a killed run
    staging = tempfile.mkdtemp(prefix="maeclip-ingest-")
    local = storage.local_path(sub_url)
    counts: Counter = Counter()
    skipped: list[dict[str, str]] = []
    try:
        out = local if local else (staging, sub_url)
        with MDSWriter(out=out, columns=COLUMNS, size_limit=SHARD_SIZE_LIMIT, keep_local=True,
                       progress_bar=False) as writer:
            for sample in _samples(job, counts, skipped):
                writer.write(sample)
        written = Path(local or staging)
        index = json.loads((written / "index.json").read_text())
        shards = [{"file": f"{job.options.split}/{_dir_name(job.shard)}/{s['raw_data']['basename']}",
                   "bytes": s["raw_data"]["bytes"], "samples": s["samples"],
                   "sha256": hashlib.sha256((written / s["raw_data"]["basename"]).read_bytes()).hexdigest()}
                  for s in index["shards"]]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record = {
        "input": job.shard.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
        "dir": _dir_name(job.shard), "split": job.options.split, "options": asdict(job.options),
        "counts": {"read": counts["read"], "written": counts["written"],
                   "skipped": {r: counts[r] for r in REASONS if counts[r]}},
        "skipped_keys": skipped, "shards": shards,
    }
    storage.write_text(storage.join(sub_url, DONE), json.dumps(record, indent=1))
    return record


def _committed(sub_url: str, options: IngestOptions) -> dict[str, Any] | None:
    done_url = storage.join(sub_url, DONE)
    if not storage.exists(done_url):
        return None
    record = json.loads(storage.read_text(done_url))
    return record if record.get("options") == asdict(options) else None


def _merge_split_index(out_url: str, split: str, records: list[dict[str, Any]]) -> None:
    """Merge the committed sub-indexes with Streaming's ``merge_index``; upload the split's index.json."""
    with tempfile.TemporaryDirectory(prefix="maeclip-merge-") as tmp:
        paths = []
        for record in records:
            path = os.path.join(tmp, "parts", record["dir"], "index.json")
            os.makedirs(os.path.dirname(path))
            Path(path).write_bytes(storage.read_bytes(storage.join(out_url, split, record["dir"], "index.json")))
            paths.append(path)
        merged = os.path.join(tmp, "merged")
        os.makedirs(merged)
        merge_index(paths, merged)
        storage.write_bytes(storage.join(out_url, split, "index.json"), Path(merged, "index.json").read_bytes())


def build_manifest(records: list[dict[str, Any]], source: str) -> dict[str, Any]:
    """The corpus manifest (design §1) from committed shard records: counts, skipped keys, shard hashes."""
    skipped: Counter = Counter()
    for record in records:
        skipped.update(record["counts"]["skipped"])
    splits: Counter = Counter()
    for record in records:
        splits[record["split"]] += record["counts"]["written"]
    return {
        "generator": GENERATOR,
        "source": source,
        "counts": {"read": sum(r["counts"]["read"] for r in records),
                   "written": sum(r["counts"]["written"] for r in records),
                   "skipped": {r: skipped[r] for r in REASONS if skipped[r]}},
        "splits": dict(sorted(splits.items())),
        "skipped_keys": [{"split": r["split"], "input": r["input"], **k} for r in records for k in r["skipped_keys"]],
        "shards": [s for r in records for s in r["shards"]],
        "inputs": [{k: r[k] for k in ("split", "input", "dir", "counts", "options")} for r in records],
    }


def ingest(src_url: str, out_url: str, options: IngestOptions, *, on_error: str = "skip",
           workers: int = 1) -> dict[str, Any]:
    """Ingest ``src_url`` into ``out_url/<split>`` as MDS; return the manifest also written to ``out_url``."""
    if options.format not in FORMATS:
        raise DataError(f"--format: unknown format '{options.format}' (allowed: {', '.join(FORMATS)})")
    if on_error not in ("skip", "fail"):
        raise DataError(f"--on-error: '{on_error}' is not one of skip, fail")
    shards = list_input_shards(src_url, options.format)
    if not shards:
        raise DataError(f"the source {src_url} holds no {options.format} input shards")
    by_dir = {_dir_name(s): s for s in shards}
    if len(by_dir) != len(shards):
        raise DataError(f"the source {src_url} has input shards whose names collide")
    storage.check_writable(out_url)
    split_url = storage.join(out_url, options.split)
    done = {s: _committed(storage.join(split_url, _dir_name(s)), options) for s in shards}
    if any(storage.exists(storage.join(split_url, _dir_name(s), DONE)) and done[s] is None for s in shards):
        storage.remove(storage.join(split_url, "index.json"))  # it names shards that are about to be rewritten
    jobs = [_Job(s, out_url, options, on_error) for s in shards if done[s] is None]
    with tqdm(total=len(shards), initial=len(shards) - len(jobs), unit="shard", desc="ingest") as progress:
        for record in _run(jobs, workers):
            done[by_dir[record["dir"]]] = record
            progress.update()
    records = [done[s] for s in shards]
    if sum(r["counts"]["written"] for r in records) == 0:
        raise DataError(f"the source {src_url} holds no usable samples ({sum(r['counts']['read'] for r in records)} "
                        "read, all skipped)")
    _merge_split_index(out_url, options.split, records)
    manifest_url = storage.join(out_url, "manifest.json")
    others = []
    if storage.exists(manifest_url):  # another split of the same corpus: keep its records
        previous = json.loads(storage.read_text(manifest_url))
        if previous.get("generator") == GENERATOR:
            others = [r for r in _records_of(out_url, previous) if r["split"] != options.split]
    manifest = build_manifest(others + records, src_url)
    storage.write_text(manifest_url, json.dumps(manifest, indent=1))
    return manifest


def _records_of(out_url: str, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(storage.read_text(storage.join(out_url, i["split"], i["dir"], DONE)))
            for i in manifest["inputs"]]


def _run(jobs: list[_Job], workers: int) -> Iterator[dict[str, Any]]:
    """Records of the jobs as they finish: in this process, or in a spawned pool (no forked fsspec threads)."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(ingest_shard, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap_unordered(ingest_shard, jobs)
