"""Test-only: small eval sets of real pixels in the published formats that ``trainer.data.eval_sets`` reads.

Pixels come from scikit-learn's bundled data (no download): the 8x8 handwritten digits (labelled 0..9) and
crops of its two sample photos (china.jpg, flower.jpg) with captions that say which crop they are. The writers
lay them out as torchvision's ImageFolder, clip_benchmark's webdataset export, Karpathy's COCO split JSON, or
our MDS corpora.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images
from streaming import MDSWriter

from trainer import storage
from trainer.data.shapes import COLUMNS

GRID_ROWS, GRID_COLUMNS = ("top", "middle", "bottom"), ("left", "centre", "right")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def digits_images(n: int, size: int = 32) -> list[tuple[bytes, int]]:
    """The first ``n`` of sklearn's digits, upscaled (nearest) to ``size`` x ``size`` RGB PNG, with labels 0..9."""
    digits = load_digits()
    assert n <= len(digits.images)
    return [(_png(Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((size, size), Image.NEAREST)
                  .convert("RGB")), int(label))
            for image, label in zip(digits.images[:n], digits.target[:n], strict=True)]


@cache
def _photos() -> tuple[tuple[str, np.ndarray], ...]:
    photos = load_sample_images()
    return tuple((Path(name).stem, image) for name, image in zip(photos.filenames, photos.images, strict=True))


def photo_crops(n: int, size: int = 48) -> list[tuple[bytes, str]]:
    """``n`` (at most 18) crops of sklearn's sample photos as ``size`` x ``size`` PNGs: each photo cut in a 3 x 3
    grid, cell by cell with the photos alternating, each captioned e.g. "a crop of the china photo, top left"."""
    crops = []
    for r, row in enumerate(GRID_ROWS):
        for c, column in enumerate(GRID_COLUMNS):
            for name, image in _photos():
                h, w = image.shape[0] // 3, image.shape[1] // 3
                cell = Image.fromarray(image[r * h:(r + 1) * h, c * w:(c + 1) * w])
                crops.append((_png(cell.resize((size, size), Image.BICUBIC)),
                              f"a crop of the {name} photo, {row} {column}"))
    assert n <= len(crops)
    return crops[:n]


def write_imagefolder(root: Path, split: str, samples: list[tuple[bytes, int]], classnames: list[str]) -> None:
    """torchvision's layout: ``root/split/<classnames[label]>/<i>.png`` for sample i (``split`` "" for a tree of
    one split); every class gets its folder."""
    base = root / split if split else root
    for name in classnames:
        (base / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(samples):
        (base / classnames[label] / f"{i}.png").write_bytes(image)


def tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def wds_key(index: int) -> str:
    """clip_benchmark's export names sample i ``s%07d``."""
    return f"s{index:07d}"


def write_clip_benchmark_wds(root: Path, split: str, samples: list[tuple[bytes, Any]],
                             classnames: list[str] | None = None, templates: list[str] | None = None,
                             retrieval_captions: list[list[str]] | None = None, shard_size: int = 8) -> None:
    """clip_benchmark's webdataset export (``webdataset_builder.convert_dataset``): ``root/split/{0..n-1}.tar``
    and ``nshards.txt``, with ``root/classnames.txt`` and ``root/zeroshot_classification_templates.txt`` when given.

    A sample ``(png, label)`` is ``s%07d.png`` + ``.cls``; with ``retrieval_captions`` (one list per sample) the
    set is a retrieval set (``dataset_type.txt``) and each sample is the PNG + ``.txt`` of its captions, one a line.
    """
    (root / split).mkdir(parents=True, exist_ok=True)
    shards = [samples[i:i + shard_size] for i in range(0, len(samples), shard_size)]
    for number, shard in enumerate(shards):
        with tarfile.open(root / split / f"{number}.tar", "w") as tar:
            for offset, (image, label) in enumerate(shard):
                index = number * shard_size + offset
                tar_member(tar, f"{wds_key(index)}.png", image)
                if retrieval_captions is not None:
                    tar_member(tar, f"{wds_key(index)}.txt", "\n".join(retrieval_captions[index]).encode())
                else:
                    tar_member(tar, f"{wds_key(index)}.cls", str(label).encode())
    (root / split / "nshards.txt").write_text(str(len(shards)))
    if retrieval_captions is not None:
        (root / "dataset_type.txt").write_text("retrieval\n")
    if classnames is not None:
        (root / "classnames.txt").write_text("".join(f"{name}\n" for name in classnames))
    if templates is not None:
        (root / "zeroshot_classification_templates.txt").write_text("".join(f"{t}\n" for t in templates))


def write_karpathy(root: Path, dataset: str, images: list[tuple[bytes, list[str], str]]) -> None:
    """Karpathy's split JSON ``root/dataset_<dataset>.json``, COCO style: image i is
    ``root/val2014/COCO_val2014_<i>.png`` (``filepath`` "val2014"), with its captions as sentences and its split."""
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (image, captions, split) in enumerate(images):
        filename = f"COCO_val2014_{i:012d}.png"
        (root / "val2014" / filename).write_bytes(image)
        entries.append({"filepath": "val2014", "filename": filename, "split": split, "cocoid": i, "imgid": i,
                        "sentids": list(range(5 * i, 5 * i + len(captions))),
                        "sentences": [{"raw": caption, "tokens": caption.lower().split(), "imgid": i}
                                      for caption in captions]})
    (root / f"dataset_{dataset}.json").write_text(json.dumps({"images": entries, "dataset": dataset}))


def write_mds(url: str, split: str, samples: list[dict]) -> None:
    """An MDS split of our corpora's columns at ``url/split`` (any storage), plus a json ``captions`` column when
    the samples have one."""
    columns = COLUMNS | ({"captions": "json"} if any("captions" in s for s in samples) else {})
    target = storage.join(url, split)
    with tempfile.TemporaryDirectory() as staging:
        local = storage.local_path(target)
        with MDSWriter(out=local or (staging, target), columns=columns, size_limit="8mb") as writer:
            for sample in samples:
                writer.write(sample)


def upload(local: Path, url: str) -> str:
    """Every file under ``local`` copied to the same place under ``url`` (any storage); returns ``url``."""
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.write_bytes(storage.join(url, str(path.relative_to(local))), path.read_bytes())
    return url
