"""``maeclip data ingest``: web-style corpora into MDS (docs/contracts.md §1) at any storage URL, resumably.

Each input shard (a tar, a table file, a class folder) becomes its own MDS sub-directory ``OUT/SPLIT/NAME/``,
written through Streaming's uploader and committed by a ``done.json`` written last. A rerun skips committed
shards and redoes any others, so a killed ingest resumes without duplicates; the output bytes depend only on
the input and the options (never on timing or ``--workers``), so the rerun's shards hash the same. The split's
``index.json`` is merged from the committed sub-indexes (``streaming.base.util.merge_index``) only at the end,
so it never names a shard that is not there. ``OUT/manifest.json`` sums the committed shards' counts.

Sources are untrusted. ``sources.py`` reads nothing over the per-sample limits and no image outside the source
root or the allowed prefixes; ``judge`` opens only the formats we store (``Image.open(formats=...)``: JPEG, PNG,
WebP, so no other PIL plugin ever parses input), judges the pixel count from the header before decoding, strips
control characters from captions, and skips any bad sample with a reason. Output names are checked: a split must
match ``SPLIT_PATTERN``, and sub-directory names are sanitised. A shard that cannot be read (a corrupt tar, an
unreadable table) is listed under ``failed`` in the manifest; the other shards are still committed, indexed and
counted, and ``ingest`` then raises ``IngestIncomplete``. A rerun retries only the failed shards.

Duplicate keys are resolved per split, deterministically, by ``duplicate_keys`` (``skip`` the later sample, or
``suffix`` it as ``KEY-dupN``), in shard order: the first occurrence wins. Within a shard this is done while
writing. Across shards each committed shard records its keys; after the shards are written, one pass in shard
order finds the keys that an earlier shard already took, and rewrites the (rare) shard that has any with that
list (``taken`` in its ``done.json``). A shard's bytes thus depend only on its input, the options and the keys
of earlier shards, never on ``--workers``; a rerun recomputes the lists from the committed records and rewrites
only a shard whose list changed (say, when an earlier shard that had failed is now read), so reruns stay
idempotent.
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
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from streaming import MDSWriter
from streaming.base.util import merge_index
from tqdm import tqdm

from trainer import storage
from trainer.config import normalize_url
from trainer.data.corpus import claim_corpus
from trainer.data.loader import DataError
from trainer.data.shapes import COLUMNS
from trainer.data.sources import (
    FORMATS,
    InputShard,
    RawRecord,
    ReadLimits,
    TableColumns,
    list_input_shards,
    read_records,
    storage_location,
)

GENERATOR = "ingest-v2"
REASONS = ("undecodable", "empty_caption", "non_utf8_caption", "unpaired", "oversized", "forbidden_path",
           "duplicate_key", "non_utf8_key")
DONE = "done.json"
# Streaming's default shard size (MDSWriter ``size_limit`` = 1 << 26).
SHARD_SIZE_LIMIT = 1 << 26
# The image formats ingest decodes (img2dataset's encode formats); PIL's other plugins never see the input.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
SPLIT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_DIR_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DUPLICATE_POLICIES = ("skip", "suffix")
# C0 controls (NUL included), DEL and C1 controls become spaces; whitespace is then collapsed.
_CONTROLS = dict.fromkeys([*range(0x20), *range(0x7F, 0xA0)], " ")


@dataclass(frozen=True)
class IngestOptions:
    """Everything that decides the output bytes; a committed shard written with other options is redone."""

    format: str
    split: str = "train"
    # Shorter side in pixels, as img2dataset's default ``image_size`` 256; 0 keeps the stored image.
    resize: int = 256
    jpeg_quality: int = 90
    # Larger images are skipped as oversized, judged from the header; PIL warns from 89.5 MP
    # (``Image.MAX_IMAGE_PIXELS``) and refuses twice that, which is also skipped as oversized.
    max_pixels: int = 89_478_485
    image_column: str = "image"
    caption_column: str = "caption"
    key_column: str = "key"
    # CLIP's ImageNet prompt "a photo of a {}." (Radford et al. 2021, prompt engineering section).
    caption_template: str = "a photo of a {class}."
    # 32 MiB of encoded image: a max_pixels photo is ~10-25 MB as a high-quality JPEG, so no real one is lost.
    max_image_bytes: int = 32 << 20
    # 16 KiB of caption: CLIP's text tower reads 77 tokens (a few hundred bytes) and web alt-texts rarely pass a
    # few KB, so this keeps every real caption, even in 4-byte UTF-8 scripts, while bounding what a row may hold.
    max_caption_bytes: int = 16 << 10
    # Storage URL prefixes (file://, gs://, s3://) that table cells may name images under, besides the source.
    allowed_prefixes: tuple[str, ...] = ()
    # A repeated key in a split: "skip" the later sample or "suffix" it as KEY-dupN (first occurrence wins).
    duplicate_keys: str = "skip"

    def __post_init__(self) -> None:
        prefixes = self.allowed_prefixes
        object.__setattr__(self, "allowed_prefixes", (prefixes,) if isinstance(prefixes, str) else tuple(prefixes))


class SkippedSample(DataError):
    """A bad sample under ``--on-error fail``: names the key and the reason."""


class IngestIncomplete(DataError):
    """Some input shards could not be read; the others were ingested and the manifest lists the failed ones."""


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


def normalize_caption(text: str) -> str:
    """Control characters (C0 with NUL, DEL, C1) as spaces, then runs of whitespace as one space, trimmed."""
    return " ".join(text.translate(_CONTROLS).split())


def judge(record: RawRecord, options: IngestOptions) -> tuple[dict[str, Any] | None, str, str]:
    """The MDS sample of a raw record, or None with the skip reason and a detail for the manifest."""
    if record.refused is not None:
        return None, *record.refused
    if record.image is None or record.caption is None:
        return None, "unpaired", "no image" if record.image is None else "no caption"
    if len(record.caption) > options.max_caption_bytes:
        return None, "oversized", f"caption over the limit of {options.max_caption_bytes} bytes"
    if len(record.image) > options.max_image_bytes:
        return None, "oversized", f"image over the limit of {options.max_image_bytes} bytes"
    try:
        caption = record.caption.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, "non_utf8_caption", str(err)
    caption = normalize_caption(caption)
    if not caption:
        return None, "empty_caption", ""
    try:
        record.key.encode("utf-8")  # a tar member name that is not UTF-8 arrives with surrogate escapes
    except UnicodeEncodeError as err:
        return None, "non_utf8_key", str(err)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides, below
            with Image.open(io.BytesIO(record.image), formats=IMAGE_FORMATS) as image:
                if image.width * image.height > options.max_pixels:  # judged from the header, never decoded
                    return None, "oversized", f"{image.width}x{image.height}"
                image.load()
                data = _fit(image, record.image, options)
    except Image.DecompressionBombError as err:  # PIL's own refusal, also from the header
        return None, "oversized", str(err)[:200]
    except Exception as err:  # UnidentifiedImageError, OSError, SyntaxError, struct.error...: hostile bytes
        return None, "undecodable", f"{type(err).__name__}: {err}"[:200]
    meta = {"source": f"{options.format}", **record.meta}
    return {"key": record.key, "image": data, "caption": caption, "meta": meta}, "", ""


def _dir_name(shard: InputShard) -> str:
    """A storage-safe, stable sub-directory name; unusual or long names get a hash so two never collide."""
    if _DIR_PATTERN.fullmatch(shard.name):
        return shard.name
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", shard.name.encode("utf-8", "surrogateescape").decode("ascii", "replace"))
    digest = hashlib.sha256(shard.name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    name = f"{safe.strip('._-')[:40].strip('._-') or 'shard'}-{digest}"
    assert _DIR_PATTERN.fullmatch(name), name  # the construction above guarantees it
    return name


def _display(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


@dataclass(frozen=True)
class _Job:
    shard: InputShard
    out_url: str
    options: IngestOptions
    on_error: str
    # key -> [new key or None (dropped), input that took it first]: keys that earlier shards took
    taken: Mapping[str, list] = field(default_factory=dict)


class _InputFailed(Exception):
    """The reader of an input shard raised: the input cannot be read (not a bad sample, not the output)."""


def _reading(records: Iterator[RawRecord]) -> Iterator[RawRecord]:
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as err:  # corrupt tar, bad table, unreachable source: all mean "this shard failed"
            raise _InputFailed(_one_line(err)) from err
        yield record


def _free_name(key: str, taken: Mapping[str, Any] | set[str], *more: set[str]) -> str:
    n = 1
    while (name := f"{key}-dup{n}") in taken or any(name in m for m in more):
        n += 1
    return name


class _Tally:
    """Counts, skipped and renamed keys, and the keys kept (before the cross-shard list) of one shard."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.skipped: list[dict[str, str]] = []
        self.renamed: list[dict[str, str]] = []
        self.keys: list[str] = []


def _samples(job: _Job, tally: _Tally) -> Iterator[dict[str, Any]]:
    options = job.options
    columns = TableColumns(options.image_column, options.caption_column, options.key_column)
    limits = ReadLimits(options.max_image_bytes, options.max_caption_bytes, options.allowed_prefixes)
    seen: set[str] = set()
    records = read_records(job.shard, options.format, columns, options.caption_template, limits)
    for record in _reading(records):
        tally.counts["read"] += 1
        sample, reason, detail = judge(record, options)
        if sample is not None:
            sample, reason, detail = _dedupe(sample, seen, job, tally)
        if sample is None:
            if job.on_error == "fail":
                raise SkippedSample(f"{job.shard.url}: sample '{record.key}' is {reason} ({detail})")
            tally.counts[reason] += 1
            tally.skipped.append({"key": record.key, "reason": reason, "detail": detail})
            continue
        tally.counts["written"] += 1
        yield sample


def _dedupe(sample: dict[str, Any], seen: set[str], job: _Job,
            tally: _Tally) -> tuple[dict[str, Any] | None, str, str]:
    """Resolve the sample's key within the shard, then against the keys that earlier shards took."""
    key, suffix = sample["key"], job.options.duplicate_keys == "suffix"
    if key in seen:
        if not suffix:
            return None, "duplicate_key", "repeated in this input"
        new = _free_name(key, seen)
        tally.renamed.append({"key": key, "to": new, "reason": "duplicate_key", "detail": "repeated in this input"})
        key = sample["key"] = new
    seen.add(key)
    tally.keys.append(key)
    if key in job.taken:
        new, owner = job.taken[key]
        detail = f"also in input '{owner}'"
        if new is None:
            return None, "duplicate_key", detail
        tally.renamed.append({"key": key, "to": new, "reason": "duplicate_key", "detail": detail})
        sample["key"] = new
    return sample, "", ""


def ingest_shard(job: _Job) -> dict[str, Any]:
    """Write one input shard's MDS sub-directory and commit it; return the committed record.

    When the input cannot be read, return ``{"input", "dir", "split", "error"}`` instead, leaving nothing behind.
    """
    sub_url = storage.join(job.out_url, job.options.split, _dir_name(job.shard))
    storage.remove(sub_url)  # the leftovers of a killed run
    staging = tempfile.mkdtemp(prefix="maeclip-ingest-")
    local = storage.local_path(sub_url)
    tally = _Tally()
    base = {"input": _display(job.shard.name), "dir": _dir_name(job.shard), "split": job.options.split}
    try:
        out = local if local else (staging, sub_url)
        try:
            with MDSWriter(out=out, columns=COLUMNS, size_limit=SHARD_SIZE_LIMIT, keep_local=True,
                           progress_bar=False) as writer:
                for sample in _samples(job, tally):
                    writer.write(sample)
        except _InputFailed as failure:
            storage.remove(sub_url)
            return {**base, "error": str(failure)}
        written = Path(local or staging)
        index = json.loads((written / "index.json").read_text())
        shards = [{"file": f"{job.options.split}/{_dir_name(job.shard)}/{s['raw_data']['basename']}",
                   "bytes": s["raw_data"]["bytes"], "samples": s["samples"],
                   "sha256": hashlib.sha256((written / s["raw_data"]["basename"]).read_bytes()).hexdigest()}
                  for s in index["shards"]]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    counts = tally.counts
    record = {
        **base, "options": _options_record(job.options),
        "counts": {"read": counts["read"], "written": counts["written"],
                   "skipped": {r: counts[r] for r in REASONS if counts[r]}, "renamed": len(tally.renamed)},
        "skipped_keys": tally.skipped, "renamed_keys": tally.renamed, "shards": shards,
        "keys": tally.keys, "taken": dict(job.taken),
    }
    storage.write_text(storage.join(sub_url, DONE), json.dumps(record, indent=1))
    return record


def _options_record(options: IngestOptions) -> dict[str, Any]:
    """The options as stored in ``done.json`` (tuples as lists), so stored and current ones compare equal."""
    return json.loads(json.dumps(asdict(options)))


def _committed(sub_url: str, options: IngestOptions) -> dict[str, Any] | None:
    done_url = storage.join(sub_url, DONE)
    if not storage.exists(done_url):
        return None
    record = json.loads(storage.read_text(done_url))
    return record if record.get("options") == _options_record(options) and "keys" in record else None


def _taken_lists(records: list[dict[str, Any]], policy: str) -> list[dict[str, list]]:
    """For each committed shard in shard order, its keys that earlier shards took: key -> [new key, owner]."""
    owner: dict[str, str] = {}
    lists = []
    for record in records:
        own = set(record["keys"])
        taken: dict[str, list] = {}
        chosen: set[str] = set()
        for key in record["keys"]:
            if key in owner:
                new = _free_name(key, owner, own, chosen) if policy == "suffix" else None
                if new is not None:
                    chosen.add(new)
                taken[key] = [new, owner[key]]
        for key in record["keys"]:
            final = taken[key][0] if key in taken else key
            if final is not None:
                owner[final] = record["input"]
        lists.append(taken)
    return lists


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


def build_manifest(records: list[dict[str, Any]], source: str,
                   failed: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The corpus manifest (docs/contracts.md §1) from committed shard records: counts, skipped keys, shard hashes, and
    the input shards that could not be read (``failed``, only when there are any)."""
    skipped: Counter = Counter()
    for record in records:
        skipped.update(record["counts"]["skipped"])
    splits: Counter = Counter()
    for record in records:
        splits[record["split"]] += record["counts"]["written"]
    manifest = {
        "generator": GENERATOR,
        "source": source,
        "counts": {"read": sum(r["counts"]["read"] for r in records),
                   "written": sum(r["counts"]["written"] for r in records),
                   "skipped": {r: skipped[r] for r in REASONS if skipped[r]},
                   "renamed": sum(r["counts"].get("renamed", 0) for r in records)},
        "splits": dict(sorted(splits.items())),
        "skipped_keys": [{"split": r["split"], "input": r["input"], **k} for r in records for k in r["skipped_keys"]],
        "renamed_keys": [{"split": r["split"], "input": r["input"], **k} for r in records
                         for k in r.get("renamed_keys", [])],
        "shards": [s for r in records for s in r["shards"]],
        "inputs": [{k: r[k] for k in ("split", "input", "dir", "counts", "options")} for r in records],
    }
    if failed:
        manifest["failed"] = failed
    return manifest


def check_options(options: IngestOptions, on_error: str = "skip") -> None:
    """DataError for options that ingest cannot honour, before anything is read or written."""
    if options.format not in FORMATS:
        raise DataError(f"--format: unknown format '{options.format}' (allowed: {', '.join(FORMATS)})")
    if on_error not in ("skip", "fail"):
        raise DataError(f"--on-error: '{on_error}' is not one of skip, fail")
    if not isinstance(options.split, str) or not SPLIT_PATTERN.fullmatch(options.split):
        raise DataError(f"--split: {options.split!r} is not a split name (1-64 letters, digits, '_' or '-', "
                        "starting with a letter or digit)")
    if options.duplicate_keys not in DUPLICATE_POLICIES:
        raise DataError(f"--duplicate-keys: '{options.duplicate_keys}' is not one of {', '.join(DUPLICATE_POLICIES)}")
    for name in ("max_pixels", "max_image_bytes", "max_caption_bytes"):
        if not isinstance(getattr(options, name), int) or getattr(options, name) < 1:
            raise DataError(f"--{name.replace('_', '-')}: must be a positive number, not {getattr(options, name)!r}")
    for prefix in options.allowed_prefixes:
        try:
            _, parts = storage_location(prefix)
        except ValueError as err:
            raise DataError(f"--allow-prefix: {err}") from None
        if not parts:
            raise DataError(f"--allow-prefix: '{prefix}' names a whole store; name a folder or bucket in it")


def ingest(src_url: str, out_url: str, options: IngestOptions, *, on_error: str = "skip",
           workers: int = 1) -> dict[str, Any]:
    """Ingest ``src_url`` into ``out_url/<split>`` as MDS; return the manifest also written to ``out_url``.

    IngestIncomplete (after writing the manifest and index of the good shards) when some shards failed;
    CorpusInUse, before anything is written, when ``out_url`` holds anything but an ingested corpus or a partial
    ingest (``trainer/data/corpus.py``).
    """
    check_options(options, on_error)
    shards = list_input_shards(src_url, options.format)
    if not shards:
        raise DataError(f"the source {src_url} holds no {options.format} input shards")
    by_dir = {_dir_name(s): s for s in shards}
    if len(by_dir) != len(shards):
        raise DataError(f"the source {src_url} has input shards whose names collide")
    claim_corpus(out_url, GENERATOR)  # CorpusInUse unless out_url is empty or ingest's; marks it ours first
    split_url = storage.join(out_url, options.split)
    index_url = storage.join(split_url, "index.json")
    done = {s: _committed(storage.join(split_url, _dir_name(s)), options) for s in shards}
    if any(storage.exists(storage.join(split_url, _dir_name(s), DONE)) and done[s] is None for s in shards):
        storage.remove(index_url)  # it names shards that are about to be rewritten
    failed: dict[InputShard, dict[str, str]] = {}
    jobs = [_Job(s, out_url, options, on_error) for s in shards if done[s] is None]
    desc, initial = "ingest", len(shards) - len(jobs)
    for _ in range(len(shards) + 1):  # each round either settles or loses a failed shard
        with tqdm(total=initial + len(jobs), initial=initial, unit="shard", desc=desc) as progress:
            for record in _run(jobs, workers):
                shard = by_dir[record["dir"]]
                if "error" in record:
                    done[shard], failed[shard] = None, {k: record[k] for k in ("split", "input", "error")}
                else:
                    done[shard] = record
                    failed.pop(shard, None)
                progress.update()
        good = [s for s in shards if done[s] is not None]
        lists = _taken_lists([done[s] for s in good], options.duplicate_keys)
        jobs = [_Job(s, out_url, options, on_error, taken) for s, taken in zip(good, lists, strict=True)
                if done[s]["taken"] != taken]
        if not jobs:
            break
        storage.remove(index_url)  # it names shards that are about to be rewritten
        desc, initial = "re-key", 0
    records = [done[s] for s in shards if done[s] is not None]
    failures = [failed[s] for s in shards if s in failed]
    if not failures and sum(r["counts"]["written"] for r in records) == 0:
        raise DataError(f"the source {src_url} holds no usable samples ({sum(r['counts']['read'] for r in records)} "
                        "read, all skipped)")
    if records:
        _merge_split_index(out_url, options.split, records)
    else:
        storage.remove(index_url)
    manifest_url = storage.join(out_url, "manifest.json")
    others, other_failures = [], []
    if storage.exists(manifest_url):  # another split of the same corpus: keep its records
        previous = json.loads(storage.read_text(manifest_url))
        if previous.get("generator") == GENERATOR:
            others = [r for r in _records_of(out_url, previous) if r["split"] != options.split]
            other_failures = [f for f in previous.get("failed", []) if f["split"] != options.split]
    manifest = build_manifest(others + records, src_url, other_failures + failures)
    storage.write_text(manifest_url, json.dumps(manifest, indent=1))
    if failures:
        named = "; ".join(f"{f['input']} ({f['error']})" for f in failures[:5])
        more = f"; and {len(failures) - 5} more" if len(failures) > 5 else ""
        message = (f"{len(failures)} of {len(shards)} input shards of {src_url} could not be read and were left "
                   f"out: {named}{more}. The others are ingested ({manifest_url} lists the failed ones); rerun "
                   "after fixing them to ingest only those")
        raise IngestIncomplete(" ".join(message.split()))  # one line, whatever the shard names hold
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


def ingest_source(src: str, out: str, *, on_error: str = "skip", workers: int = 1, **options: Any) -> dict[str, Any]:
    """Ingest ``src`` into the corpus at ``out`` (``options``: ``IngestOptions`` fields); return its summary.

    What ``maeclip data ingest`` and the pipelines' ``ingest_corpus`` step both run.
    """
    out = normalize_url(out, "--out")
    if options.get("allowed_prefixes"):  # bare paths become file:// URLs, as SRC and --out do
        options["allowed_prefixes"] = tuple(normalize_url(p, "--allow-prefix") for p in options["allowed_prefixes"])
    manifest = ingest(normalize_url(src, "SRC"), out, IngestOptions(**options), on_error=on_error, workers=workers)
    return {"url": out, "counts": manifest["counts"], "splits": manifest["splits"]}
