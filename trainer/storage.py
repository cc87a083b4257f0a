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


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with _reporting(url, "read"):
        return fs.cat_file(path)


def read_text(url: str) -> str:
    return read_bytes(url).decode()


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


def remove(url: str) -> None:
    fs, path = filesystem(url)
    with _reporting(url, "remove"):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def check_writable(url: str) -> None:
    """Write and delete a probe object under ``url``; raise StorageError when that fails."""
    probe = join(url, ".maeclip-write-probe")
    try:
        write_bytes(probe, b"ok")
        remove(probe)
    except (StorageError, OSError) as err:
        raise StorageError(f"cannot write to '{url}': {err}") from err
