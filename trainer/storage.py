"""Storage URLs through fsspec: ``file://``, ``gs://`` (gcsfs), ``s3://`` (s3fs). No scheme is special-cased.

Every failure to reach storage is raised as ``StorageError`` with the URL in the message, so callers can
report it on one line instead of a traceback.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import fsspec
from fsspec.core import url_to_fs


class StorageError(RuntimeError):
    """Storage that cannot be reached, read or written; the message names the URL."""


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path inside it."""
    try:
        return url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise StorageError(f"no filesystem for '{url}': {err}") from err


def join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *parts)


def local_path(url: str) -> str | None:
    """The local path of a ``file://`` URL, else None."""
    return url[len("file://"):] if url.startswith("file://") else None


@contextmanager
def _reporting(url: str, action: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        raise
    except Exception as err:  # gcsfs/s3fs/aiohttp raise many types; all mean the same to callers
        raise StorageError(f"cannot {action} '{url}': {type(err).__name__}: {err}") from err


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    with _reporting(url, "check"):
        return fs.exists(path)


class TooLarge(ValueError):
    """An object larger than its reader allows (untrusted bytes are read with a bound)."""


def read_bytes(url: str, limit: int | None = None) -> bytes:
    """The object's bytes; with ``limit``, TooLarge instead of reading more than ``limit`` bytes."""
    fs, path = filesystem(url)
    with _reporting(url, "read"):
        if limit is None:
            return fs.cat_file(path)
        with fs.open(path, "rb") as handle:
            data = handle.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"'{url}' is larger than the {limit} bytes allowed for it")
    return data


def read_text(url: str, limit: int | None = None) -> str:
    """The object as UTF-8 text (bounded like ``read_bytes``); ValueError naming the URL when it is not UTF-8."""
    data = read_bytes(url, limit)
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        raise ValueError(f"'{url}' is not UTF-8 text: {err}") from err


def write_bytes(url: str, data: bytes) -> None:
    fs, path = filesystem(url)
    with _reporting(url, "write"):
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(path, data)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode())


@contextmanager
def open_file(url: str, mode: str = "rb") -> Iterator[IO]:
    fs, path = filesystem(url)
    with _reporting(url, "open"):
        if "w" in mode and posixpath.dirname(path):
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
        handle = fs.open(path, mode)
    with handle:
        yield handle


def list_dir(url: str) -> list[str]:
    """Names (not paths) of the entries directly under ``url``; empty when it does not exist."""
    fs, path = filesystem(url)
    with _reporting(url, "list"):
        if not fs.exists(path):
            return []
        fs.invalidate_cache(path)
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def list_folders_and_files(url: str) -> tuple[list[str], list[str]]:
    """``(folders, files)``: the names directly under ``url``, each sorted, from one listing (a bucket answers
    with its prefixes as folders); both empty when it does not exist."""
    fs, path = filesystem(url)
    with _reporting(url, "list"):
        if not fs.exists(path):
            return [], []
        fs.invalidate_cache(path)
        entries = fs.ls(path, detail=True)
    folders, files = set(), set()
    for entry in entries:
        name = posixpath.basename(entry["name"].rstrip("/"))
        if name and entry["name"].rstrip("/") != path.rstrip("/"):  # some stores list a folder's own marker
            (folders if entry.get("type") == "directory" else files).add(name)
    return sorted(folders), sorted(files - folders)


def remove(url: str) -> None:
    fs, path = filesystem(url)
    with _reporting(url, "remove"):
        if fs.exists(path):
            fs.rm(path, recursive=True)


class NotWritable(StorageError):
    """A local path we cannot write under (a file in the way, no permission): the user's to fix, not an outage."""


def check_writable(url: str) -> None:
    """Write and delete a probe object under ``url``; raise StorageError when that fails (NotWritable for a
    ``file://`` URL, where the cause is the path itself)."""
    probe = join(url, ".maeclip-write-probe")
    try:
        write_bytes(probe, b"ok")
        remove(probe)
    except (StorageError, OSError) as err:
        error = NotWritable if local_path(url) is not None else StorageError
        raise error(f"cannot write to '{url}': {err}") from err
