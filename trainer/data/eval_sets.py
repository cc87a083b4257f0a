"""Evaluation sets in the formats they are published in, read as one kind of batch.

``open_eval_set(url)`` says where a set is and how it is stored (``EvalSet``); ``iter_eval_set`` yields every
sample of one split once, in a stable order, as ``{"key", "image", "caption", "captions", "meta"}`` batches
(``loader.collate_eval``), so an evaluator reads any of them alike. Classification sets put
``{"class": name, "label": index}`` in ``meta["labels"]``; ``classnames`` and ``templates`` give the rest.

- ``mds``: our corpora (``maeclip data shapes`` / ``ingest``); a split is ``URL/<split>``, read by
  ``loader.iter_eval_batches``.
- ``imagefolder``: torchvision's layout, ``URL[/<split>]/<class>/<image>``; classes are the sorted folder names
  (torchvision's ``ImageFolder`` order) and image files sort by name within a class.
- ``webdataset``: clip_benchmark's layout (1.6.2, ``datasets/builder.py: build_wds_dataset``):
  ``URL/<split>/{0..n-1}.tar`` with ``nshards.txt`` holding n, and ``URL/classnames.txt``,
  ``URL/zeroshot_classification_templates.txt``, ``URL/dataset_type.txt``. A sample is ``KEY.<webp|png|jpg|jpeg>``
  (that preference, as clip_benchmark's ``to_tuple``) with ``KEY.cls`` (class index) or ``KEY.txt`` (captions,
  one a line). Keys follow webdataset's rule (the path up to the first dot of the basename). ``dataset_type.txt``
  "retrieval" makes a retrieval set (no labels); anything else is classification, as in clip_benchmark.
- ``karpathy``: COCO / Flickr30k with Karpathy's split JSON (``dataset_coco.json``, ``dataset_flickr30k.json``):
  ``{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}, ...], "cocoid"/"imgid"}]}``, images at
  ``URL/<images>/<filepath>/<filename>``.

Eval sets are downloaded from elsewhere, so their bytes are untrusted: every read is bounded (``MAX_IMAGE_BYTES``,
``MAX_TEXT_BYTES``, ``MAX_ANNOTATION_BYTES``; a tar member is judged by its header before it is read, and tar
headers are checked as ingest checks them), an image path from the Karpathy JSON must lie strictly inside the
image root (``sources.Confinement``: no ``..``, absolute paths, other buckets or schemes, nothing fetched), and
anything malformed raises ``DataError`` with one line naming the URL (and key) and what is wrong.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from trainer import storage
from trainer.config import Config
from trainer.data.ingest import IngestOptions
from trainer.data.loader import DataError, collate_eval, iter_eval_batches, subset_priority
from trainer.data.sources import IMAGE_EXTENSIONS, Confinement, ForbiddenPath, class_name, tar_samples
from trainer.data.transforms import decode_tensor, eval_transform

FORMATS = ("mds", "imagefolder", "webdataset", "karpathy")
# What ingest reads of one image by default (32 MiB: no real photo is lost).
MAX_IMAGE_BYTES = IngestOptions.max_image_bytes
# classnames.txt, templates, dataset_type.txt, nshards.txt, and a tar's .cls / .txt members: ImageNet's 1,000
# names are 20 KB and five COCO captions a few hundred bytes.
MAX_TEXT_BYTES = 1 << 20
# Karpathy's dataset_coco.json is about 140 MB; room for larger sets, not for an unbounded read.
MAX_ANNOTATION_BYTES = 512 << 20
# clip_benchmark's image preference (``to_tuple(["webp", "png", "jpg", "jpeg"], ...)``).
WDS_IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")
_WDS_MARKERS = ("classnames.txt", "dataset_type.txt", "nshards.txt")


@dataclass(frozen=True)
class EvalSet:
    """Where an eval set is and how it is stored."""

    url: str  # root: file://, gs://, s3:// (any storage URL trainer.storage reads)
    format: str  # one of FORMATS
    annotations: str = ""  # karpathy only: the Karpathy-split JSON, relative to url (default: the one dataset_*.json)
    images: str = ""  # karpathy only: the image folder, relative to url (default: url itself)


# ---------------------------------------------------------------------------------------------------------
# Finding and opening a set.


def _looks_like(folders: list[str], files: list[str]) -> str:
    """The format a folder's own listing shows, or "" when it shows none."""
    if "index.json" in files:
        return "mds"
    if any(name in _WDS_MARKERS or name.endswith(".tar") for name in files):
        return "webdataset"
    return ""


def detect_format(url: str) -> str:
    """The format of the set at ``url``: ``mds`` (an index.json at ``url`` or in a split folder), ``webdataset``
    (classnames.txt, dataset_type.txt or tars, at ``url`` or in a split folder), ``karpathy`` (a dataset_*.json
    at ``url``), else ``imagefolder``. Split folders are looked into until one tells (a folder of images is a
    class folder), so a 1,000-class tree costs two listings. DataError when nothing is at ``url``."""
    folders, files = storage.list_folders_and_files(url)
    if not folders and not files:
        raise DataError(f"no eval set at {url}")
    if found := _looks_like(folders, files):
        return found
    if _karpathy_files(files):
        return "karpathy"
    for folder in folders:
        sub_folders, sub_files = storage.list_folders_and_files(storage.join(url, folder))
        if found := _looks_like(sub_folders, sub_files):
            return found
        if _images(sub_files):
            break  # a class folder: url is a single-split image folder
    return "imagefolder"


def open_eval_set(url: str, format: str = "", annotations: str = "", images: str = "") -> EvalSet:
    """The set at ``url`` in ``format`` ("" detects it: ``detect_format``); DataError for an unknown format, or
    ``annotations`` / ``images`` given for a format other than karpathy."""
    url = url.rstrip("/")
    format = format or detect_format(url)
    if format not in FORMATS:
        raise DataError(f"{url}: unknown eval set format '{format}' (one of {', '.join(FORMATS)})")
    if (annotations or images) and format != "karpathy":
        raise DataError(f"{url}: annotations and images are for karpathy sets, not {format}")
    return EvalSet(url, format, annotations, images)


def classnames(eval_set: EvalSet, split: str) -> list[str]:
    """Class names by label index: classnames.txt of a webdataset set, the class folders of an image folder's
    split (``sources.class_name`` of each: ImageNet wnids come back unchanged); [] for mds and karpathy."""
    if eval_set.format == "webdataset":
        return _text_lines(storage.join(eval_set.url, "classnames.txt"))
    if eval_set.format == "imagefolder":
        return [class_name(folder) for folder in _class_folders(_split_folder(eval_set.url, split))]
    return []


def templates(eval_set: EvalSet) -> list[str]:
    """Prompt templates of a webdataset set (zeroshot_classification_templates.txt, ``{c}`` for the class, as
    clip_benchmark writes them); [] otherwise."""
    if eval_set.format != "webdataset":
        return []
    return [t for t in _text_lines(storage.join(eval_set.url, "zeroshot_classification_templates.txt")) if t]


def split_location(eval_set: EvalSet, split: str) -> str:
    """Where ``split`` of the set is read from: two splits with the same location are the same samples (a
    single-split tree is read for any split name)."""
    if eval_set.format == "mds":
        return _mds_split(eval_set.url, split)
    if eval_set.format == "karpathy":
        return f"{_karpathy_annotations(eval_set)}#{split}"
    return _split_folder(eval_set.url, split)


def iter_eval_set(eval_set: EvalSet, split: str, config: Config, batch_size: int,
                  limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Every sample of ``split`` once, in a stable order, as batches of ``batch_size``:
    ``{"key", "image" (B, 3, S, S) eval-transformed, "caption" (the first or ""), "captions" (all), "meta"}``.

    ``limit`` (None: all): for mds and webdataset, the first ``limit`` samples in stored order; for imagefolder and
    karpathy, whose listing is known up front, the ``limit`` samples of lowest ``loader.subset_priority(key)``
    (spread over the classes, not the first class folders), yielded in stored order.
    """
    if limit is not None and limit < 0:
        raise DataError(f"{eval_set.url}: limit {limit} is negative")
    if eval_set.format == "mds":
        yield from _mds_batches(iter_eval_batches(_mds_split(eval_set.url, split), config, batch_size), limit)
        return
    if eval_set.format == "imagefolder":
        samples: Iterable[dict[str, Any]] = _read(_lowest_priority(_imagefolder_listing(eval_set.url, split), limit))
    elif eval_set.format == "karpathy":
        samples = _read(_lowest_priority(_karpathy_listing(eval_set, split), limit))
    elif eval_set.format == "webdataset":
        samples = itertools.islice(_webdataset_samples(eval_set.url, split), limit)
    else:
        raise DataError(f"{eval_set.url}: unknown eval set format '{eval_set.format}' (one of {', '.join(FORMATS)})")
    transform = eval_transform(config.data, config.model.image_size)
    batch = []
    for sample in samples:
        try:
            pixels = decode_tensor(sample["image"])
        except ValueError as err:
            raise DataError(f"{eval_set.url}: the image of '{sample['key']}' is {err}") from None
        batch.append(sample | {"image": transform(pixels, 0)})
        if len(batch) == batch_size:
            yield collate_eval(batch)
            batch = []
    if batch:
        yield collate_eval(batch)


def _mds_batches(batches: Iterator[dict[str, Any]], limit: int | None) -> Iterator[dict[str, Any]]:
    """The batches cut after ``limit`` samples, every meta with its ``labels`` ({} where a corpus has none)."""
    seen = 0
    for batch in batches:
        batch["meta"] = [{"labels": {}, **m} if isinstance(m, dict) else {"labels": {}} for m in batch["meta"]]
        if limit is not None and seen + len(batch["key"]) >= limit:
            if limit > seen:
                yield {name: value[:limit - seen] for name, value in batch.items()}
            return
        seen += len(batch["key"])
        yield batch


def _sample(key: str, image: bytes, captions: list[str], labels: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {"key": key, "image": image, "caption": captions[0] if captions else "", "captions": captions,
            "meta": {"labels": labels, **meta}}


def _lowest_priority(listing: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """The ``limit`` entries of lowest ``subset_priority`` of their keys, in listed order (all for None)."""
    if limit is None or limit >= len(listing):
        return listing
    chosen = set(heapq.nsmallest(limit, range(len(listing)), key=lambda i: subset_priority(listing[i]["key"])))
    return [entry for i, entry in enumerate(listing) if i in chosen]


def _read(listing: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Samples of listed entries (``{"url", "key", "captions", "labels", "meta"}``), each image read bounded."""
    for entry in listing:
        try:
            image = storage.read_bytes(entry["url"], limit=MAX_IMAGE_BYTES)
        except storage.TooLarge as err:
            raise DataError(f"the image of '{entry['key']}': {err}") from None
        except FileNotFoundError:
            raise DataError(f"the image of '{entry['key']}' is missing: {entry['url']}") from None
        yield _sample(entry["key"], image, entry["captions"], entry["labels"], **entry["meta"])


def _text_lines(url: str) -> list[str]:
    """The stripped lines of a small text file (clip_benchmark's reading), trailing blank ones dropped; [] when
    there is none."""
    text = _small_text(url)
    lines = [line.strip() for line in (text or "").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _small_text(url: str) -> str | None:
    """A metadata file read within ``MAX_TEXT_BYTES``; None when there is none."""
    try:
        return storage.read_text(url, limit=MAX_TEXT_BYTES)
    except FileNotFoundError:
        return None
    except ValueError as err:  # too large, not UTF-8
        raise DataError(str(err)) from None


def _images(files: list[str]) -> list[str]:
    return [f for f in files if f.rpartition(".")[2].lower() in IMAGE_EXTENSIONS and f.rpartition(".")[0]]


# ---------------------------------------------------------------------------------------------------------
# mds


def _mds_split(url: str, split: str) -> str:
    """``url/<split>``; ``url`` itself when it is a split (an index.json there) and ``url/<split>`` is not."""
    split_url = storage.join(url, split) if split else url
    if split and not storage.exists(storage.join(split_url, "index.json")) and \
            storage.exists(storage.join(url, "index.json")):
        return url
    return split_url


# ---------------------------------------------------------------------------------------------------------
# imagefolder


def _split_folder(url: str, split: str) -> str:
    """``url/<split>`` when that folder exists, else ``url`` (a set of one split)."""
    folders, _ = storage.list_folders_and_files(url)
    return storage.join(url, split) if split and split in folders else url


def _class_folders(split_url: str) -> list[str]:
    return storage.list_folders_and_files(split_url)[0]


def _imagefolder_listing(url: str, split: str) -> list[dict[str, Any]]:
    split_url = _split_folder(url, split)
    folders = _class_folders(split_url)
    if not folders:
        raise DataError(f"{split_url}: no class folders (an image folder is <class>/<image> for each class)")
    return [{"key": f"{folder}/{file}", "url": storage.join(split_url, folder, file), "captions": [],
             "labels": {"class": class_name(folder), "label": label}, "meta": {}}
            for label, folder in enumerate(folders)
            for file in _images(storage.list_folders_and_files(storage.join(split_url, folder))[1])]


# ---------------------------------------------------------------------------------------------------------
# webdataset (clip_benchmark)


def _wds_shards(url: str, split: str) -> list[str]:
    """``{0..n-1}.tar`` of ``url/<split>`` (``url`` without that folder) by its nshards.txt; without one, every
    tar there in numeric order."""
    split_url = _split_folder(url, split)
    text = _small_text(storage.join(split_url, "nshards.txt"))
    if text is not None:
        try:
            count = int(text.strip())
        except ValueError:
            raise DataError(f"{split_url}/nshards.txt: not a number of shards: {text.strip()[:40]!r}") from None
        if count < 1:
            raise DataError(f"{split_url}/nshards.txt: {count} shards")
        return [storage.join(split_url, f"{i}.tar") for i in range(count)]
    tars = [n for n in storage.list_folders_and_files(split_url)[1] if n.endswith(".tar")]
    if not tars:
        raise DataError(f"{split_url}: no shards (*.tar) of split '{split}'")
    return [storage.join(split_url, n) for n in sorted(tars, key=_shard_number)]


def _shard_number(name: str) -> tuple[int, int, str]:
    """0.tar, 1.tar, ..., 10.tar in numeric order, then any others by name."""
    stem = name.removesuffix(".tar")
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


class _WdsParts:
    """The files of one clip_benchmark sample that we use (images, .cls, .txt), each read only within its cap."""

    def __init__(self, shard_url: str) -> None:
        self.shard_url = shard_url
        self.files: dict[str, bytes] = {}

    def add(self, extension: str, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        if extension not in (*WDS_IMAGE_EXTENSIONS, "cls", "txt"):
            return  # skipped unread by the stream
        if extension in self.files:  # webdataset refuses it too
            raise DataError(f"{self.shard_url}: '{member.name}' repeats the .{extension} of its sample")
        limit = MAX_IMAGE_BYTES if extension in WDS_IMAGE_EXTENSIONS else MAX_TEXT_BYTES
        if member.size > limit:
            raise DataError(f"{self.shard_url}: '{member.name}' is {member.size} bytes, over the limit of {limit}")
        self.files[extension] = tar.extractfile(member).read()


def _webdataset_samples(url: str, split: str) -> Iterator[dict[str, Any]]:
    """Samples in shard order, streamed one tar (and one sample) at a time."""
    names = classnames(EvalSet(url, "webdataset"), split)
    retrieval = (_small_text(storage.join(url, "dataset_type.txt")) or "").strip().lower() == "retrieval"
    for shard in _wds_shards(url, split):
        try:
            for key, parts in tar_samples(shard, lambda shard=shard: _WdsParts(shard)):
                yield _wds_sample(shard, key, parts.files, names, retrieval)
        except FileNotFoundError:
            raise DataError(f"{shard}: no such shard") from None
        except tarfile.TarError as err:
            raise DataError(f"{shard}: unreadable tar: {err}") from None


def _wds_sample(shard: str, key: str, files: dict[str, bytes], names: list[str],
                retrieval: bool) -> dict[str, Any]:
    image = next((files[e] for e in WDS_IMAGE_EXTENSIONS if e in files), None)
    if image is None:
        raise DataError(f"{shard}: sample '{key}' has no image (.{', .'.join(WDS_IMAGE_EXTENSIONS)})")
    try:
        captions = [line.strip() for line in files.get("txt", b"").decode().splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise DataError(f"{shard}: the .txt of '{key}' is not UTF-8") from None
    labels: dict[str, Any] = {}
    if "cls" in files and not retrieval:
        try:
            label = int(files["cls"].decode(errors="replace").strip())
        except ValueError:
            raise DataError(f"{shard}: the .cls of '{key}' is not a class index: {files['cls'][:40]!r}") from None
        if label < 0 or (names and label >= len(names)):
            raise DataError(f"{shard}: the .cls of '{key}' is {label}, not an index of the {len(names)} classes "
                            "of classnames.txt")
        labels = {"class": names[label] if names else str(label), "label": label}
    return _sample(key, image, captions, labels)


# ---------------------------------------------------------------------------------------------------------
# karpathy


def _karpathy_files(files: list[str]) -> list[str]:
    return [f for f in files if f.startswith("dataset_") and f.endswith(".json")]


def _karpathy_annotations(eval_set: EvalSet) -> str:
    if eval_set.annotations:
        return storage.join(eval_set.url, eval_set.annotations)
    found = _karpathy_files(storage.list_folders_and_files(eval_set.url)[1])
    if len(found) != 1:
        raise DataError(f"{eval_set.url}: {len(found)} Karpathy split files (dataset_*.json) instead of one "
                        f"({', '.join(found) or 'none'}); name one as annotations")
    return storage.join(eval_set.url, found[0])


def _karpathy_listing(eval_set: EvalSet, split: str) -> list[dict[str, Any]]:
    """The entries of ``split`` in JSON order, every image path confined to the image root before any read."""
    annotations = _karpathy_annotations(eval_set)
    try:
        entries = json.loads(storage.read_bytes(annotations, limit=MAX_ANNOTATION_BYTES))["images"]
    except FileNotFoundError:
        raise DataError(f"{annotations}: no such Karpathy split file") from None
    except (ValueError, KeyError, TypeError, RecursionError) as err:  # too large, not JSON, no "images"
        raise DataError(f"{annotations}: not a Karpathy split file: {type(err).__name__}: {err}") from None
    if not isinstance(entries, list):
        raise DataError(f"{annotations}: 'images' is not a list")
    root = storage.join(eval_set.url, eval_set.images) if eval_set.images else eval_set.url
    try:
        confinement = Confinement(root if "://" in root else f"file://{os.path.abspath(root)}")
    except ValueError as err:  # not a file://, gs:// or s3:// root
        raise DataError(f"{root}: Karpathy images are read from file://, gs:// or s3:// only: {err}") from None
    listing = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("split") != split:
            continue
        filepath, filename, sentences = entry.get("filepath", ""), entry.get("filename"), entry.get("sentences", [])
        if not isinstance(filename, str) or not filename or not isinstance(filepath, str) or \
                not isinstance(sentences, list) or \
                not all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences):
            raise DataError(f"{annotations}: images[{index}] is not a Karpathy entry (a string filename, "
                            "sentences with a string 'raw')")
        key = f"{filepath}/{filename}" if filepath else filename
        try:
            url = confinement.resolve(key)
        except ForbiddenPath as err:
            shown = key if len(key) <= 120 else key[:117] + "..."
            raise DataError(f"{annotations}: images[{index}] {shown!r} is refused: {err}") from None
        ids = {k: entry[k] for k in ("cocoid", "imgid") if isinstance(entry.get(k), int | str)}
        listing.append({"key": key, "url": url, "captions": [s["raw"].strip() for s in sentences],
                        "labels": {}, "meta": ids})
    if not listing:
        raise DataError(f"{annotations}: no images of split '{split}'")
    return listing
