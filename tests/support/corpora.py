"""Test-only: small dirty corpora in the four ingest formats, with one bad sample of every skip reason.

``make_corpus(fmt, root, shards, per_shard)`` writes a source under ``root`` and returns what a correct ingest
must find: ``{"good": {key: caption}, "bad": {key: reason}}``. Ingest it with ``max_pixels=MAX_PIXELS``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from streaming import StreamingDataset

from trainer import storage
from trainer.data.ingest import IngestOptions

MAX_PIXELS = 150 * 150  # the oversized sample is 160 x 160; good ones are at most 96 x 72


def jpeg(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(4):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        image.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, min(size[0], x + 9), min(size[1], y + 9)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


UNDECODABLE = b"\xff\xd8\xff\xe0 this is not really a jpeg"
OVERSIZED = png((160, 160))
NON_UTF8 = b"caf\xe9 au lait"


def _good(shard: int, i: int) -> tuple[str, bytes, str]:
    size = (96, 72) if i % 3 == 0 else (48, 40)
    return f"{shard:05d}{i:04d}", jpeg(shard * 1000 + i, size), f"picture {i} of shard {shard}"


def _bad(shard: int) -> list[tuple[str, bytes | None, bytes | None, str]]:
    """(key, image, caption, reason) for shard 0; other shards are clean."""
    if shard:
        return []
    return [("bad-undecodable", UNDECODABLE, b"a broken picture", "undecodable"),
            ("bad-empty", jpeg(1), b"  \n ", "empty_caption"),
            ("bad-nonutf8", jpeg(2), NON_UTF8, "non_utf8_caption"),
            ("bad-noimage", None, b"a caption without a picture", "unpaired"),
            ("bad-oversized", OVERSIZED, b"a huge picture", "oversized")]


def make_corpus(fmt: str, root: Path, shards: int = 2, per_shard: int = 6) -> dict[str, dict[str, str]]:
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "imagefolder":
        return _imagefolder(root, shards, per_shard)
    expected: dict[str, dict[str, str]] = {"good": {}, "bad": {}}
    for shard in range(shards):
        rows = []
        for i in range(per_shard):
            key, image, caption = _good(shard, i)
            rows.append((key, image, caption.encode()))
            expected["good"][key] = caption
        for key, image, caption, reason in _bad(shard):
            rows.insert(1, (key, image, caption))
            expected["bad"][key] = reason
        {"webdataset": _tar, "parquet": _parquet, "csv": _csv}[fmt](root, shard, rows)
    if fmt == "webdataset":  # a caption-less image, only expressible as files
        with tarfile.open(root / "00000.tar", "a") as tar:
            _add(tar, "bad-nocaption.jpg", jpeg(3))
        expected["bad"]["bad-nocaption"] = "unpaired"
    return expected


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def _tar(root: Path, shard: int, rows: list) -> None:
    """img2dataset's layout: KEY.jpg, KEY.txt, KEY.json in the tar, a parquet of metadata beside it."""
    with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
        for key, image, caption in rows:
            if image is not None:
                _add(tar, f"{key}.jpg", image)
            if caption is not None:
                _add(tar, f"{key}.txt", caption)
            _add(tar, f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())
    pq.write_table(pa.table({"key": [r[0] for r in rows]}), root / f"{shard:05d}.parquet")


def _parquet(root: Path, shard: int, rows: list) -> None:
    table = pa.table({"key": [r[0] for r in rows], "image": pa.array([r[1] for r in rows], pa.binary()),
                      "caption": pa.array([r[2] for r in rows], pa.binary())})
    pq.write_table(table, root / f"part-{shard}.parquet")


def _csv(root: Path, shard: int, rows: list) -> None:
    """Images as paths relative to the CSV; the unpaired row points at a file that is not there."""
    (root / "images").mkdir(exist_ok=True)
    with open(root / f"part-{shard}.csv", "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "image", "caption"])
        for key, image, caption in rows:
            if image is not None:
                (root / "images" / f"{key}.img").write_bytes(image)
            writer.writerow([key, f"images/{key}.img", caption.decode("utf-8", "surrogateescape")])


def _imagefolder(root: Path, shards: int, per_shard: int) -> dict[str, dict[str, str]]:
    """Class folders; the bad kinds: a folder named "_" (no class name), a non-UTF-8 folder name, a text file,
    a corrupt image and an oversized one."""
    expected: dict[str, dict[str, str]] = {"good": {}, "bad": {}}
    for c in range(shards):
        name = f"class_{c}"
        (root / name).mkdir()
        for i in range(per_shard):
            (root / name / f"img{i}.jpg").write_bytes(jpeg(c * 100 + i, (96, 72) if i % 3 == 0 else (48, 40)))
            expected["good"][f"{name}/img{i}"] = f"a photo of a class {c}."
    (root / "class_0" / "broken.jpg").write_bytes(UNDECODABLE)
    (root / "class_0" / "notes.txt").write_text("not an image")
    (root / "class_0" / "huge.png").write_bytes(OVERSIZED)
    (root / "_").mkdir()
    (root / "_" / "x.jpg").write_bytes(jpeg(7))
    os.mkdir(os.fsencode(root) + b"/caf\xe9")
    (Path(os.fsdecode(os.fsencode(root) + b"/caf\xe9")) / "y.jpg").write_bytes(jpeg(8))
    expected["bad"] |= {"class_0/broken": "undecodable", "class_0/notes": "unpaired",
                        "class_0/huge": "oversized", "_/x": "empty_caption",
                        os.fsdecode(b"caf\xe9") + "/y": "non_utf8_caption"}
    return expected


def ingest_options(fmt: str, **changes: Any) -> IngestOptions:
    """Ingest options for these corpora: small images, and the pixel limit that makes one sample oversized."""
    return IngestOptions(format=fmt, resize=32, max_pixels=MAX_PIXELS, **changes)


def stored_samples(out: Path, split: str = "train") -> dict[str, dict]:
    """Every sample an ingest wrote to ``out/split``, by key (asserting no key twice)."""
    dataset = StreamingDataset(local=str(out / split), shuffle=False, batch_size=1)
    samples = [dataset[i] for i in range(dataset.num_samples)]
    keys = [s["key"] for s in samples]
    assert len(keys) == len(set(keys)), "duplicate keys"
    return {s["key"]: s for s in samples}


def object_hashes(url: str) -> dict[str, str]:
    """Every object under ``url`` (any storage): its path below ``url`` and the SHA-256 of its bytes."""
    fs, root = storage.filesystem(url)
    fs.invalidate_cache()
    if not fs.exists(root):
        return {}
    return {path[len(root):]: hashlib.sha256(fs.cat_file(path)).hexdigest() for path in fs.find(root)}
