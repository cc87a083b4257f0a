"""Readers for the corpora that ``maeclip data ingest`` accepts, as streams of raw records per input shard.

A reader only finds and pairs things; it judges nothing. Captions stay raw bytes and images stay encoded, so
that ``ingest.py`` applies one set of checks (and one set of skip reasons) to every format. Sources are read
through fsspec, so a corpus may sit in a bucket as well as on disk.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from trainer import storage

FORMATS = ("webdataset", "parquet", "csv", "imagefolder")
# img2dataset writes the image as KEY.jpg by default (``encode_format``); png and webp are its other choices.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class InputShard:
    """One unit of ingest work: a tar, a table file or a class folder; ``name`` is unique in the source."""

    name: str
    url: str


@dataclass
class RawRecord:
    """A sample as found. ``image`` or ``caption`` is None when the source has no such part for the key."""

    key: str
    image: bytes | None
    caption: bytes | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TableColumns:
    """Column names of parquet and CSV sources; a missing key column numbers the rows instead."""

    image: str = "image"
    caption: str = "caption"
    key: str = "key"


def list_input_shards(src_url: str, fmt: str) -> list[InputShard]:
    """The input shards of ``src_url`` in a stable order; a file URL is a source of one shard."""
    fs, path = storage.filesystem(src_url)
    if not storage.exists(src_url):
        raise FileNotFoundError(f"no such source: {src_url}")
    if fmt == "imagefolder":
        return [InputShard(name, storage.join(src_url, name)) for name in storage.list_dir(src_url)
                if fs.isdir(posixpath.join(path, name))]
    suffix = {"webdataset": ".tar", "parquet": ".parquet", "csv": ".csv"}[fmt]
    if not fs.isdir(path):
        return [InputShard(posixpath.basename(path).removesuffix(suffix), src_url)]
    return [InputShard(name.removesuffix(suffix), storage.join(src_url, name))
            for name in storage.list_dir(src_url) if name.endswith(suffix)]


def read_records(shard: InputShard, fmt: str, columns: TableColumns, caption_template: str) -> Iterator[RawRecord]:
    """The raw records of one input shard, in stored order."""
    if fmt == "webdataset":
        yield from _webdataset_records(shard)
    elif fmt == "parquet":
        yield from _parquet_records(shard, columns)
    elif fmt == "csv":
        yield from _csv_records(shard, columns)
    else:
        yield from _imagefolder_records(shard, caption_template)


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's grouping rule: the key is the path up to the first dot of the basename."""
    directory, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(directory, stem), extension.lower()


def _webdataset_record(key: str, files: dict[str, bytes]) -> RawRecord:
    image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
    meta: dict[str, Any] = {}
    if "json" in files:
        try:
            meta = {"source_meta": json.loads(files["json"])}  # img2dataset's per-sample url, sizes, status
        except ValueError:
            meta = {}  # metadata is a courtesy; a sample is judged by its image and caption
    return RawRecord(key, image, files.get("txt"), meta)


def _webdataset_records(shard: InputShard) -> Iterator[RawRecord]:
    """Files of one sample are consecutive in a webdataset tar (the format's rule); group them by key."""
    with storage.open_file(shard.url) as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
        key, files = None, {}
        for member in tar:
            if not member.isfile():
                continue
            member_key, extension = _split_member(member.name)
            if member_key != key and key is not None:
                yield _webdataset_record(key, files)
                files = {}
            key = member_key
            files[extension] = tar.extractfile(member).read()
        if key is not None:
            yield _webdataset_record(key, files)


def _image_from_cell(value: Any, table_url: str) -> bytes | None:
    """Bytes as stored, a Hugging Face image struct, or a path relative to the table (None when missing)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if not isinstance(value, str) or not value:
        return None
    url = value if "://" in value else storage.join(posixpath.dirname(table_url), value)
    try:
        return storage.read_bytes(url)
    except FileNotFoundError:
        return None


def _caption_from_cell(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")  # CSV text read with surrogateescape keeps bad bytes
    return bytes(value)


def _parquet_records(shard: InputShard, columns: TableColumns) -> Iterator[RawRecord]:
    with storage.open_file(shard.url) as handle:
        table = pq.ParquetFile(handle)
        names = set(table.schema_arrow.names)
        _require(names, columns, shard.url)
        wanted = [c for c in (columns.image, columns.caption, columns.key) if c in names]
        row = 0
        for batch in table.iter_batches(batch_size=256, columns=wanted):
            for item in batch.to_pylist():
                yield _table_record(item, columns, shard, row)
                row += 1


def _csv_records(shard: InputShard, columns: TableColumns) -> Iterator[RawRecord]:
    with storage.open_file(shard.url) as handle:
        text = io.TextIOWrapper(handle, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.DictReader(text)
        _require(set(reader.fieldnames or ()), columns, shard.url)
        for row, item in enumerate(reader):
            yield _table_record(item, columns, shard, row)


def _require(names: set[str], columns: TableColumns, url: str) -> None:
    missing = [c for c in (columns.image, columns.caption) if c not in names]
    if missing:
        raise ValueError(f"{url}: no column {', '.join(missing)} (columns: {', '.join(sorted(names))}); "
                         "name them with --image-column / --caption-column")


def _table_record(item: dict[str, Any], columns: TableColumns, shard: InputShard, row: int) -> RawRecord:
    key = item.get(columns.key)
    key = str(key) if key not in (None, "") else f"{shard.name}-{row:08d}"
    return RawRecord(key, _image_from_cell(item[columns.image], shard.url), _caption_from_cell(item[columns.caption]))


def class_name(folder: str) -> str:
    """The class of an image folder: its name with underscores as spaces (ImageNet-style folders)."""
    return folder.replace("_", " ").strip()


def _imagefolder_records(shard: InputShard, caption_template: str) -> Iterator[RawRecord]:
    """Images of one class folder; a file with another extension has no image, so it counts as unpaired."""
    name = class_name(shard.name)
    caption = caption_template.format(**{"class": name}) if name else ""
    for file in storage.list_dir(shard.url):
        stem, _, extension = file.rpartition(".")
        key = f"{shard.name}/{stem or file}"
        meta = {"labels": {"class": name}}
        if extension.lower() not in IMAGE_EXTENSIONS:
            yield RawRecord(key, None, None, meta)
            continue
        yield RawRecord(key, storage.read_bytes(storage.join(shard.url, file)),
                        caption.encode("utf-8", "surrogateescape"), meta)
