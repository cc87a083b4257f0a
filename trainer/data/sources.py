"""Readers for the corpora that ``maeclip data ingest`` accepts, as streams of raw records per input shard.

A reader finds and pairs things; ``ingest.py`` judges them, with one set of checks (and skip reasons) for every
format. Captions stay raw bytes and images stay encoded. Sources are read through fsspec, so a corpus may sit in
a bucket as well as on disk. Sources are untrusted, so a reader also enforces what can only be enforced while
reading, and marks a record it refuses with a reason instead of raising:

* Bounded reads: nothing larger than the per-sample limits (``ReadLimits``) is read. A tar is read as a stream
  (``r|*``) and a member is judged by the size in its header, so an oversized one is skipped unread; tar headers
  themselves (pax, GNU long names) are bounded too. A file named by a table cell or found in an image folder is
  read up to the limit plus one byte. A CSV record is bounded in characters (``csv.field_size_limit`` raised to
  match), and parquet row groups are read in batches sized from their declared bytes.
* Confinement: an image path in a table cell may name only an object under the *source root* (the source URL
  given to ingest when it is a folder, else the folder holding the source file) or under one of the allowed
  storage prefixes (``file://``, ``gs://``, ``s3://``). Paths are normalised with ``posixpath`` and compared by
  components, so ``..``, absolute paths, ``file://`` URLs outside the root and ``root/../root2`` tricks are
  refused; so are other schemes (``http(s)://`` and anything unknown), which are never fetched. A refused cell
  makes a ``forbidden_path`` record. (Symlinks under the root are followed: whoever controls the root's files
  controls its images anyway.)
* A shard that cannot be read at all (a corrupt or truncated tar, an unreadable table) raises from the reader;
  a tar must end with its end-of-archive block, so a cut one is an error rather than a silently short shard.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

import pyarrow.parquet as pq

from trainer import storage

FORMATS = ("webdataset", "parquet", "csv", "imagefolder")
# img2dataset writes the image as KEY.jpg by default (``encode_format``); png and webp are its other choices.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# img2dataset's per-sample .json is a few hundred bytes; a larger one is dropped unread (metadata is a courtesy).
MAX_META_BYTES = 64 << 10
# A pax or GNU long-name header holds a path and a few attributes; tarfile reads one whole, so bound it.
MAX_TAR_HEADER_BYTES = 1 << 20
# Room in one CSV record, beside the caption, for the key, the image path and other columns (img2dataset's url,
# sizes, similarity scores and so on).
CSV_RECORD_EXTRA_CHARS = 64 << 10
# Decoded bytes of one parquet batch, judged from the row group's declared sizes (pyarrow decodes a batch whole).
PARQUET_BATCH_BYTES = 64 << 20
PARQUET_MAX_BATCH_ROWS = 256
# Stores a table cell may name, by scheme (fsspec's aliases included); anything else is refused unread.
_STORES = {"file": "file", "gs": "gs", "gcs": "gs", "s3": "s3", "s3a": "s3"}
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)
_P = TypeVar("_P")


@dataclass(frozen=True)
class InputShard:
    """One unit of ingest work: a tar, a table file or a class folder; ``name`` is unique in the source.

    ``root`` is the source root that the table cells of this shard may name files under.
    """

    name: str
    url: str
    root: str


@dataclass
class RawRecord:
    """A sample as found. ``image`` or ``caption`` is None when the source has no such part for the key.

    ``refused`` is ``(reason, detail)`` when the reader would not read the sample (oversized, forbidden_path).
    """

    key: str
    image: bytes | None
    caption: bytes | None
    meta: dict[str, Any] = field(default_factory=dict)
    refused: tuple[str, str] | None = None


@dataclass(frozen=True)
class TableColumns:
    """Column names of parquet and CSV sources; a missing key column numbers the rows instead."""

    image: str = "image"
    caption: str = "caption"
    key: str = "key"


@dataclass(frozen=True)
class ReadLimits:
    """What a reader may read for one sample, and where table cells may point (besides the source root)."""

    image_bytes: int
    caption_bytes: int
    allowed_prefixes: tuple[str, ...] = ()


def list_input_shards(src_url: str, fmt: str) -> list[InputShard]:
    """The input shards of ``src_url`` in a stable order; a file URL is a source of one shard."""
    fs, path = storage.filesystem(src_url)
    if not storage.exists(src_url):
        raise FileNotFoundError(f"no such source: {src_url}")
    src_url = src_url.rstrip("/")
    if fmt == "imagefolder":
        return [InputShard(name, storage.join(src_url, name), src_url) for name in storage.list_dir(src_url)
                if fs.isdir(posixpath.join(path, name))]
    suffix = {"webdataset": ".tar", "parquet": ".parquet", "csv": ".csv"}[fmt]
    if not fs.isdir(path):
        return [InputShard(posixpath.basename(path).removesuffix(suffix), src_url, posixpath.dirname(src_url))]
    return [InputShard(name.removesuffix(suffix), storage.join(src_url, name), src_url)
            for name in storage.list_dir(src_url) if name.endswith(suffix)]


def read_records(shard: InputShard, fmt: str, columns: TableColumns, caption_template: str,
                 limits: ReadLimits) -> Iterator[RawRecord]:
    """The raw records of one input shard, in stored order."""
    if fmt == "webdataset":
        yield from _webdataset_records(shard, limits)
    elif fmt == "parquet":
        yield from _parquet_records(shard, columns, limits)
    elif fmt == "csv":
        yield from _csv_records(shard, columns, limits)
    else:
        yield from _imagefolder_records(shard, caption_template, limits)


# ---------------------------------------------------------------------------------------------------------
# Where table cells may point.


class ForbiddenPath(ValueError):
    """A table cell names something outside the source root and the allowed prefixes."""


def _components(path: str) -> tuple[str, ...]:
    """Path components after normalisation; ``..`` cannot climb above the first component."""
    return tuple(part for part in posixpath.normpath("/" + path).split("/") if part)


def storage_location(url: str) -> tuple[str, tuple[str, ...]]:
    """``(store, components)`` of a ``file://``, ``gs://`` or ``s3://`` URL (a bucket is the first component).

    ValueError for anything else, including a relative ``file://`` URL.
    """
    match = _URL.fullmatch(url)
    scheme = match.group(1).lower() if match else ""
    if scheme not in _STORES:
        raise ValueError(f"'{url}' is not a file://, gs:// or s3:// URL")
    rest = match.group(2)
    if scheme == "file" and not rest.startswith("/"):
        raise ValueError(f"'{url}' is not an absolute file:// URL")
    return _STORES[scheme], _components(rest)


def _url(store: str, components: tuple[str, ...]) -> str:
    return f"{store}:///{'/'.join(components)}" if store == "file" else f"{store}://{'/'.join(components)}"


class Confinement:
    """The places (the source root, then the allowed prefixes) that table cells may name objects under."""

    def __init__(self, root: str, allowed_prefixes: tuple[str, ...] = ()) -> None:
        self.root = root
        self.base = storage_location(root)
        self.places = [self.base, *(storage_location(p) for p in allowed_prefixes)]

    def resolve(self, cell: str) -> str:
        """The URL that ``cell`` names (a path relative to the root, an absolute path, or a storage URL);
        ForbiddenPath, without touching storage, unless it lies strictly under one of the places."""
        if "\x00" in cell or "::" in cell:  # fsspec reads "a::b" as a chain of filesystems
            raise ForbiddenPath("not a plain path")
        if "://" in cell:
            match = _URL.fullmatch(cell)
            scheme = match.group(1).lower() if match else ""
            if scheme not in _STORES:
                raise ForbiddenPath(f"scheme '{scheme}://' is not read" if scheme else "not a storage URL")
            try:
                store, parts = storage_location(cell)
            except ValueError as err:
                raise ForbiddenPath(str(err)) from None
        elif cell.startswith("/"):
            store, parts = "file", _components(cell)
        else:
            store, parts = self.base[0], _components("/".join(self.base[1]) + "/" + cell)
        for place_store, place in self.places:
            if store == place_store and len(parts) > len(place) and parts[:len(place)] == place:
                return _url(store, parts)
        raise ForbiddenPath(f"outside the source root {self.root} and the allowed prefixes")


def _read_bounded(url: str, limit: int) -> bytes | None:
    """At most ``limit + 1`` bytes of the object at ``url`` (more means too large); None when there is none."""
    fs, path = storage.filesystem(url)
    try:
        with fs.open(path, "rb") as handle:
            return handle.read(limit + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        return None


def _oversized(what: str, limit: int, size: int | None = None) -> tuple[str, str]:
    """The refusal of a part over its limit; ``size`` when known (a bounded read knows only "more")."""
    return "oversized", f"{what} over the limit of {limit} bytes" + (f" ({size} bytes)" if size else "")


# ---------------------------------------------------------------------------------------------------------
# webdataset tars.


class _CheckedTarInfo(tarfile.TarInfo):
    """Tar headers that fail loudly: tarfile ends a stream quietly at a corrupt or missing header past the first,
    which would turn a truncated shard into a short one; and it reads pax and GNU long-name headers whole."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as err:
            what = "no end-of-archive block (truncated)" if isinstance(err, tarfile.EmptyHeaderError) else err
            raise tarfile.ReadError(f"bad tar header at byte {tar.offset}: {what}") from None

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:  # tarfile's documented extension point
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                         tarfile.GNUTYPE_LONGLINK) and self.size > MAX_TAR_HEADER_BYTES:
            raise tarfile.ReadError(f"tar extended header of {self.size} bytes at byte {self.offset}")
        return super()._proc_member(tar)


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's grouping rule: the key is the path up to the first dot of the basename."""
    directory, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(directory, stem), extension.lower()


class _Parts:
    """The files of one webdataset sample that ingest uses, read only when within the limits."""

    def __init__(self, limits: ReadLimits) -> None:
        self.limits = limits
        self.image: bytes | None = None
        self.image_rank = len(IMAGE_EXTENSIONS)  # the best extension seen: jpg before jpeg, png, webp
        self.caption: bytes | None = None
        self.meta: bytes | None = None
        self.image_refused: tuple[str, str] | None = None
        self.caption_refused: tuple[str, str] | None = None

    def add(self, extension: str, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        limits = self.limits
        if extension in IMAGE_EXTENSIONS:
            rank = IMAGE_EXTENSIONS.index(extension)
            if rank >= self.image_rank:
                return  # a worse-ranked image than one already kept is not read
            self.image_rank, self.image, self.image_refused = rank, None, None
            if member.size > limits.image_bytes:
                self.image_refused = _oversized("image", limits.image_bytes, member.size)
            else:
                self.image = tar.extractfile(member).read()
        elif extension == "txt":
            self.caption, self.caption_refused = None, None
            if member.size > limits.caption_bytes:
                self.caption_refused = _oversized("caption", limits.caption_bytes, member.size)
            else:
                self.caption = tar.extractfile(member).read()
        elif extension == "json" and member.size <= MAX_META_BYTES:
            self.meta = tar.extractfile(member).read()
        # anything else (and unread data of a refused member) is skipped by the stream's next header

    def record(self, key: str) -> RawRecord:
        meta: dict[str, Any] = {}
        if self.meta is not None:
            try:
                meta = {"source_meta": json.loads(self.meta)}  # img2dataset's per-sample url, sizes, status
            except (ValueError, RecursionError):
                meta = {}  # metadata is a courtesy; a sample is judged by its image and caption
        return RawRecord(key, self.image, self.caption, meta, self.image_refused or self.caption_refused)


def tar_samples(url: str, new_parts: Callable[[], _P]) -> Iterator[tuple[str, _P]]:
    """The samples of the webdataset tar at ``url`` as ``(key, parts)``, streamed one sample at a time.

    The files of one sample are consecutive in a webdataset tar (the format's rule; ``_split_member`` names the
    key): every regular file of a sample is offered to ``parts.add(extension, member, tar)`` while the stream
    stands at it, to read then or to leave, skipped unread. Headers are checked (``_CheckedTarInfo``), so a
    corrupt or truncated tar raises ``tarfile.ReadError`` instead of ending early.
    """
    with storage.open_file(url) as handle, \
            tarfile.open(fileobj=handle, mode="r|*", tarinfo=_CheckedTarInfo) as tar:
        key, parts = None, new_parts()
        while (member := tar.next()) is not None:
            tar.members.clear()  # stream mode keeps every header it has read; a tar may hold millions
            if not member.isfile():
                continue
            member_key, extension = _split_member(member.name)
            if member_key != key and key is not None:
                yield key, parts
                parts = new_parts()
            key = member_key
            parts.add(extension, member, tar)
        if key is not None:
            yield key, parts


def _webdataset_records(shard: InputShard, limits: ReadLimits) -> Iterator[RawRecord]:
    for key, parts in tar_samples(shard.url, lambda: _Parts(limits)):
        yield parts.record(key)


# ---------------------------------------------------------------------------------------------------------
# Tables.


def _image_from_cell(value: Any, confinement: Confinement,
                     limits: ReadLimits) -> tuple[bytes | None, tuple[str, str] | None]:
    """Bytes as stored, a Hugging Face image struct, or a path (see ``Confinement``); None when missing."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | bytearray | memoryview):
        if len(value) > limits.image_bytes:
            return None, _oversized("image", limits.image_bytes, len(value))
        return bytes(value), None
    if not isinstance(value, str) or not value:
        return None, None
    try:
        url = confinement.resolve(value)
    except ForbiddenPath as err:
        shown = value if len(value) <= 120 else value[:117] + "..."
        return None, ("forbidden_path", f"{shown!r}: {err}")
    data = _read_bounded(url, limits.image_bytes)
    if data is not None and len(data) > limits.image_bytes:
        return None, _oversized("image", limits.image_bytes)
    return data, None


def _caption_from_cell(value: Any) -> bytes | None:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")  # CSV text read with surrogateescape keeps bad bytes
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return None  # not text (a number, a list): no caption


def _parquet_records(shard: InputShard, columns: TableColumns, limits: ReadLimits) -> Iterator[RawRecord]:
    confinement = Confinement(shard.root, limits.allowed_prefixes)
    with storage.open_file(shard.url) as handle:
        # buffer_size reads column chunks page by page instead of whole (pre_buffer would read them at once)
        table = pq.ParquetFile(handle, buffer_size=1 << 20, pre_buffer=False)
        names = set(table.schema_arrow.names)
        _require(names, columns, shard.url)
        wanted = [c for c in (columns.image, columns.caption, columns.key) if c in names]
        row = 0
        for group in range(table.num_row_groups):
            meta = table.metadata.row_group(group)  # total_byte_size: uncompressed, all columns (an upper bound)
            per_row = max(1, meta.total_byte_size // max(1, meta.num_rows))
            batch_rows = max(1, min(PARQUET_MAX_BATCH_ROWS, PARQUET_BATCH_BYTES // per_row))
            for batch in table.iter_batches(batch_size=batch_rows, row_groups=[group], columns=wanted):
                for item in batch.to_pylist():
                    yield _table_record(item, columns, shard, row, confinement, limits)
                    row += 1


class _RecordTooLong(Exception):
    """A CSV record longer than its bound; the rest of its line was dropped unread."""


class _BoundedLines:
    """Lines of a text stream for ``csv.reader``, refusing a record (which may span lines) over ``limit`` chars."""

    def __init__(self, text: IO[str], limit: int) -> None:
        self.text, self.limit = text, limit
        self.start_record()

    def start_record(self) -> None:
        self.used, self.quotes = 0, 0

    def __iter__(self) -> _BoundedLines:
        return self

    def __next__(self) -> str:
        line = self.text.readline(self.limit - self.used + 1)
        if not line:
            raise StopIteration
        self.used += len(line)
        self.quotes += line.count('"')
        if self.used > self.limit:
            # drop the rest of the record in small pieces: up to a line end outside quotes (an even count of '"'
            # so far; doubled quotes inside a quoted field keep it even)
            while line and not (line.endswith(("\n", "\r")) and self.quotes % 2 == 0):
                line = self.text.readline(1 << 16)
                self.quotes += line.count('"')
            raise _RecordTooLong
        return line


@contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """Let csv fields be as long as a whole bounded record (the default is 128 KiB), for this read only."""
    previous = csv.field_size_limit()
    csv.field_size_limit(max(previous, limit))
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _csv_records(shard: InputShard, columns: TableColumns, limits: ReadLimits) -> Iterator[RawRecord]:
    confinement = Confinement(shard.root, limits.allowed_prefixes)
    bound = limits.caption_bytes + CSV_RECORD_EXTRA_CHARS
    with storage.open_file(shard.url) as handle, _csv_field_limit(bound):
        text = io.TextIOWrapper(handle, encoding="utf-8", errors="surrogateescape", newline="")
        lines = _BoundedLines(text, bound)
        reader = csv.reader(lines)
        try:
            header = next(reader, [])
        except _RecordTooLong:
            raise ValueError(f"{shard.url}: the header is longer than {bound} characters") from None
        _require(set(header), columns, shard.url)
        row = 0
        while True:
            lines.start_record()
            try:
                fields = next(reader)
            except StopIteration:
                break
            except (_RecordTooLong, csv.Error) as err:
                detail = f"CSV record over {bound} characters" if isinstance(err, _RecordTooLong) else \
                    f"malformed CSV record: {err}"
                reason = "oversized" if isinstance(err, _RecordTooLong) else "undecodable"
                yield RawRecord(f"{shard.name}-{row:08d}", None, None, refused=(reason, detail))
                row += 1
                continue
            if not fields:
                continue  # a blank line, as csv.DictReader skips it
            item = dict(zip(header, fields, strict=False))  # short rows lack columns, as in DictReader
            yield _table_record(item, columns, shard, row, confinement, limits)
            row += 1


def _require(names: set[str], columns: TableColumns, url: str) -> None:
    missing = [c for c in (columns.image, columns.caption) if c not in names]
    if missing:
        raise ValueError(f"{url}: no column {', '.join(missing)} (columns: {', '.join(sorted(names))}); "
                         "name them with --image-column / --caption-column")


def _table_record(item: dict[str, Any], columns: TableColumns, shard: InputShard, row: int,
                  confinement: Confinement, limits: ReadLimits) -> RawRecord:
    key = item.get(columns.key)
    key = str(key) if key not in (None, "") else f"{shard.name}-{row:08d}"
    image, refused = _image_from_cell(item.get(columns.image), confinement, limits)
    return RawRecord(key, image, _caption_from_cell(item.get(columns.caption)), refused=refused)


# ---------------------------------------------------------------------------------------------------------
# Image folders.


def class_name(folder: str) -> str:
    """The class of an image folder: its name with underscores as spaces (ImageNet-style folders)."""
    return folder.replace("_", " ").strip()


def _imagefolder_records(shard: InputShard, caption_template: str, limits: ReadLimits) -> Iterator[RawRecord]:
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
        image = _read_bounded(storage.join(shard.url, file), limits.image_bytes)
        refused = None
        if image is not None and len(image) > limits.image_bytes:
            image, refused = None, _oversized("image", limits.image_bytes)
        yield RawRecord(key, image, caption.encode("utf-8", "surrogateescape"), meta, refused)
