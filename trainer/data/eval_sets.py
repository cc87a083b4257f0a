"""Eval sets that are not MDS: ImageFolder trees and clip_benchmark-style webdataset eval sets.

Both come out as the batches of ``loader.iter_eval_batches`` (keys, eval-transformed images, captions, meta),
with ``meta["labels"] = {"class": name, "label": index}``, so an evaluator reads any of them alike.

- ImageFolder (torchvision's layout): ``ROOT/<class>/<image>``; classes are the sorted folder names.
- clip_benchmark webdataset (its ``webdataset_builder``): ``ROOT/<split>/*.tar`` holding ``KEY.<webp|png|jpg>``
  with ``KEY.cls`` (class index) and/or ``KEY.txt`` (caption, for retrieval), and ``ROOT/classnames.txt``.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator
from typing import Any

from trainer import storage
from trainer.config import Config
from trainer.data.loader import DataError, collate_eval, iter_eval_batches
from trainer.data.sources import IMAGE_EXTENSIONS, class_name
from trainer.data.transforms import decode_tensor, eval_transform


def eval_set_kind(url: str) -> str:
    """``mds`` (an index.json), ``webdataset`` (a classnames.txt or tars), or ``imagefolder`` (folders)."""
    names = storage.list_dir(url)
    if not names:
        raise DataError(f"no eval set at {url}")
    if "index.json" in names:
        return "mds"
    if "classnames.txt" in names or any(n.endswith(".tar") for n in names):
        return "webdataset"
    return "imagefolder"


def classnames(url: str) -> list[str]:
    """Class names by label index: classnames.txt of a webdataset set, else the folders of an ImageFolder."""
    if eval_set_kind(url) == "webdataset":
        return [line.strip() for line in storage.read_text(storage.join(url, "classnames.txt")).splitlines()
                if line.strip()]
    return [class_name(folder) for folder in _folders(url)]


def _folders(url: str) -> list[str]:
    fs, path = storage.filesystem(url)
    return [n for n in storage.list_dir(url) if fs.isdir(posixpath.join(path, n))]


def _imagefolder_samples(url: str) -> Iterator[dict[str, Any]]:
    for label, folder in enumerate(_folders(url)):
        for file in storage.list_dir(storage.join(url, folder)):
            if file.rpartition(".")[2].lower() in IMAGE_EXTENSIONS:
                yield {"key": f"{folder}/{file}", "image": storage.read_bytes(storage.join(url, folder, file)),
                       "caption": "", "meta": {"labels": {"class": class_name(folder), "label": label}}}


def _webdataset_samples(url: str, split: str) -> Iterator[dict[str, Any]]:
    names = classnames(url) if storage.exists(storage.join(url, "classnames.txt")) else []
    split_url = storage.join(url, split) if split in storage.list_dir(url) else url
    tars = [n for n in storage.list_dir(split_url) if n.endswith(".tar")]
    for tar_name in sorted(tars, key=lambda n: (len(n), n)):  # clip_benchmark numbers shards 0.tar, 1.tar, ...
        with storage.open_file(storage.join(split_url, tar_name)) as handle, \
                tarfile.open(fileobj=handle, mode="r|*") as tar:
            files: dict[str, dict[str, bytes]] = {}
            for member in tar:
                if member.isfile():
                    key, _, extension = posixpath.basename(member.name).partition(".")
                    files.setdefault(key, {})[extension.lower()] = tar.extractfile(member).read()
            for key, parts in files.items():
                yield _webdataset_sample(key, parts, names)


def _webdataset_sample(key: str, parts: dict[str, bytes], names: list[str]) -> dict[str, Any]:
    image = next((parts[e] for e in ("webp", *IMAGE_EXTENSIONS) if e in parts), None)
    if image is None:
        raise DataError(f"eval sample '{key}' has no image ({', '.join(sorted(parts))})")
    labels = {}
    if "cls" in parts:
        label = int(parts["cls"].decode().strip())
        labels = {"class": names[label] if label < len(names) else str(label), "label": label}
    return {"key": key, "image": image, "caption": parts.get("txt", b"").decode("utf-8", "replace").strip(),
            "meta": {"labels": labels}}


def iter_eval_set(url: str, config: Config, batch_size: int, split: str = "test") -> Iterator[dict[str, Any]]:
    """Every sample of the eval set at ``url`` once, in a stable order, as ``iter_eval_batches`` batches."""
    kind = eval_set_kind(url)
    if kind == "mds":
        yield from iter_eval_batches(url, config, batch_size)
        return
    transform = eval_transform(config.data, config.model.image_size)
    samples = _webdataset_samples(url, split) if kind == "webdataset" else _imagefolder_samples(url)
    batch = []
    for sample in samples:
        batch.append(sample | {"image": transform(decode_tensor(sample["image"]), 0)})
        if len(batch) == batch_size:
            yield collate_eval(batch)
            batch = []
    if batch:
        yield collate_eval(batch)
