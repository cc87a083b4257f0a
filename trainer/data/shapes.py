"""The shapes corpus: procedurally drawn scenes of 1–3 coloured shapes with captions generated from the scene.

Each sample is drawn from its own ``random.Random`` seeded by (seed, split, index), so a corpus is byte-identical
for a seed and train/eval never share a sample stream. The largest object is the *primary*: it is mentioned
first in every caption and its colour and shape are the sample's labels (the zero-shot tasks score them).

v1 adds, per sample, what grounding and counting need: each object's box and visible-pixel mask (one PNG label
map, pixel value = 1 + object index, 0 = background, drawn exactly as the image), the object count and the
spatial relation of the primary to the next-largest object; captions vary their wording, the order of the
secondary objects and mention that relation. Class words (colour and shape names) are never replaced by
synonyms, so captions and the zero-shot prompts share a vocabulary. v1 images are identical to v0's.

The corpus is written only where the ownership rule of ``trainer/data/corpus.py`` allows (an empty URL, a shapes
corpus, a partial write of shapes); anything else, an ingested corpus included, is ``CorpusInUse``, untouched.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from streaming import MDSWriter

from trainer import storage
from trainer.data.corpus import check_owner, claim_corpus

GENERATOR_VERSION = "shapes-v1"
# Scenes are drawn from the v0 random stream, so v1 images equal v0 images; v1 changes captions and meta.
_SCENE_STREAM = "shapes-v0"
COLUMNS = {"key": "str", "image": "bytes", "caption": "str", "meta": "json"}
# Saturated, well-separated colours; names are the class names of the colour task.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 30),
    "purple": (140, 55, 185),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
RELATIONS = ("left of", "right of", "above", "below")
# Caption wordings of each relation; synonyms only for words that are not class names.
_RELATION_WORDS = {"left of": ("to the left of", "left of"), "right of": ("to the right of", "right of"),
                   "above": ("above", "over"), "below": ("below", "under", "beneath")}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive pixel box)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return not (a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1])


def _place(rng: random.Random, size: int, side: int, taken: list[tuple[int, int, int, int]]):
    box = None
    for _ in range(30):
        x0, y0 = rng.randint(1, size - side - 2), rng.randint(1, size - side - 2)
        box = (x0, y0, x0 + side, y0 + side)
        if not any(_overlaps(box, other) for other in taken):
            return box
    return box  # a crowded scene may overlap; the primary is drawn last so it stays whole


def _scene(rng: random.Random, size: int) -> list[SceneObject]:
    count = rng.choice((1, 2, 3))
    primary = (rng.choice(SHAPES), rng.choice(list(COLORS)))
    primary_box = _place(rng, size, int(size * rng.uniform(0.42, 0.58)), [])
    objects = [SceneObject(*primary, primary_box)]
    taken = [primary_box]
    while len(objects) < count:
        kind = (rng.choice(SHAPES), rng.choice(list(COLORS)))
        if kind == primary:
            continue
        box = _place(rng, size, int(size * rng.uniform(0.16, 0.26)), taken)
        taken.append(box)
        objects.append(SceneObject(*kind, box))
    return objects  # largest first


def _draw(obj: SceneObject, draw: ImageDraw.ImageDraw, fill: tuple[int, int, int] | int) -> None:
    x0, y0, x1, y1 = obj.bbox
    if obj.shape == "circle":
        draw.ellipse(obj.bbox, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(obj.bbox, fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # a five-pointed star
        cx, cy, outer = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        draw.polygon(_star_points(cx, cy, outer), fill=fill)


def _star_points(cx: float, cy: float, outer: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = outer if i % 2 == 0 else outer * 0.42
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _render(objects: list[SceneObject], rng: random.Random, size: int) -> tuple[bytes, Image.Image]:
    """The PNG image and its label map, drawn with the same (unantialiased) polygons in the same order."""
    shade = rng.randint(200, 245)
    background = tuple(min(255, shade + rng.randint(-8, 8)) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    label_map = Image.new("L", (size, size), 0)
    draw, label_draw = ImageDraw.Draw(image), ImageDraw.Draw(label_map)
    for number in reversed(range(len(objects))):  # the primary last, so nothing covers it
        _draw(objects[number], draw, COLORS[objects[number].color])
        _draw(objects[number], label_draw, number + 1)
    return _png(image), label_map


def relation(first: SceneObject, second: SceneObject) -> str:
    """Where ``first`` is relative to ``second``, along the axis on which their centres are further apart."""
    dx = (first.bbox[0] + first.bbox[2] - second.bbox[0] - second.bbox[2]) / 2
    dy = (first.bbox[1] + first.bbox[3] - second.bbox[1] - second.bbox[3]) / 2
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _next_largest(objects: list[SceneObject]) -> SceneObject:
    return max(objects[1:], key=lambda o: (o.bbox[2] - o.bbox[0]) * (o.bbox[3] - o.bbox[1]))


def _caption(objects: list[SceneObject], rng: random.Random) -> str:
    """A caption naming every object, the primary first; multi-object scenes may state the relation."""
    first = objects[0]
    picture = rng.choice(("a picture of", "an image of", "a drawing of", "a photo of"))
    if len(objects) == 1:
        frame = rng.choice(("a {c} {s}", "a {c} {s}.", "{p} a {c} {s}", "a single {c} {s}",
                            "one {c} {s} on a plain background", "{p} one {c} {s}"))
        return _articles(frame.format(c=first.color, s=first.shape, p=picture))
    lead = rng.choice(("a big {c} {s}", "a large {c} {s}", "a {c} {s}")).format(c=first.color, s=first.shape)
    second = _next_largest(objects)
    others = [o for o in objects[1:] if o is not second]
    small = rng.choice(("small", "little", "tiny"))
    if rng.random() < 0.5:
        words = rng.choice(_RELATION_WORDS[relation(first, second)])
        text = f"{lead} {words} a {small} {second.color} {second.shape}"
        if others:
            text += f" and a {small} {others[0].color} {others[0].shape}"
        frame = rng.choice(("{t}", "{p} {t}", "{n} shapes: {t}"))
    else:
        rest = [second, *others]
        rng.shuffle(rest)
        text = lead + rng.choice((" and ", " with ", " next to ")) + " and ".join(
            f"a {small} {o.color} {o.shape}" for o in rest)
        frame = rng.choice(("{t}", "{p} {t}", "{n} shapes: {t}"))
    return _articles(frame.format(t=text, p=picture, n=COUNT_WORDS[len(objects)]))


def _articles(text: str) -> str:
    """'a orange' -> 'an orange' (the only vowel-initial word after 'a' is a colour)."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _meta(objects: list[SceneObject], label_map: Image.Image) -> dict[str, Any]:
    areas = label_map.histogram()
    labels = {"color": objects[0].color, "shape": objects[0].shape, "count": len(objects),
              "relation": relation(objects[0], _next_largest(objects)) if len(objects) > 1 else None}
    return {
        "source": GENERATOR_VERSION,
        "labels": labels,
        "objects": [{"shape": o.shape, "color": o.color, "bbox": list(o.bbox), "area": areas[n + 1]}
                    for n, o in enumerate(objects)],
        "mask_png": base64.b64encode(_png(label_map)).decode("ascii"),
    }


def decode_mask(meta: dict[str, Any]) -> Image.Image:
    """The label map of a sample's meta (mode L; pixel value 1 + object index, 0 = background)."""
    return Image.open(io.BytesIO(base64.b64decode(meta["mask_png"])))


def make_sample(seed: int, split: str, index: int, image_size: int = 64) -> dict[str, Any]:
    """One sample of the corpus, in the MDS schema of docs/contracts.md §1."""
    rng = random.Random(f"{_SCENE_STREAM}/{seed}/{split}/{index}")
    objects = _scene(rng, image_size)
    image, label_map = _render(objects, rng, image_size)
    return {"key": f"{split}-{index:07d}", "image": image, "caption": _caption(objects, rng),
            "meta": _meta(objects, label_map)}


def _write_split(url: str, split: str, n: int, seed: int, image_size: int) -> list[dict[str, Any]]:
    """Write one split as MDS to ``url/split``; return its shards' names, sizes and sha256 hashes."""
    staging = tempfile.mkdtemp(prefix=f"maeclip-{split}-")
    target = storage.join(url, split)
    local = storage.local_path(target)
    try:
        out = local if local else (staging, target)
        with MDSWriter(out=out, columns=COLUMNS, size_limit="8mb", keep_local=True) as writer:
            for index in range(n):
                writer.write(make_sample(seed, split, index, image_size))
        written = Path(local or staging)
        shards = json.loads((written / "index.json").read_text())["shards"]
        return [
            {"file": f"{split}/{s['raw_data']['basename']}", "bytes": s["raw_data"]["bytes"],
             "samples": s["samples"],
             "sha256": hashlib.sha256((written / s["raw_data"]["basename"]).read_bytes()).hexdigest()}
            for s in shards
        ]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_shapes(out_url: str, n_train: int, n_eval: int, seed: int, image_size: int = 64) -> dict[str, Any]:
    """Write the train and eval splits and ``manifest.json`` under ``out_url``; return the manifest.

    CorpusInUse, before anything is written or removed, when ``out_url`` holds anything but a shapes corpus.
    """
    owner = claim_corpus(out_url, GENERATOR_VERSION)
    if owner.manifest is not None:  # first, so a rewrite killed midway is never taken for the old corpus
        storage.remove(storage.join(out_url, "manifest.json"))
    shards = []
    for split, n in (("train", n_train), ("eval", n_eval)):
        if owner.generator is not None:  # proven ours by its manifest or marker: never mix two generations
            storage.remove(storage.join(out_url, split))
        shards += _write_split(out_url, split, n, seed, image_size)
    total = n_train + n_eval
    manifest = {
        "generator": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "counts": {"read": total, "written": total, "skipped": {}},
        "splits": {"train": n_train, "eval": n_eval},
        "skipped_keys": [],
        "shards": shards,
    }
    storage.write_text(storage.join(out_url, "manifest.json"), json.dumps(manifest, indent=1))
    return manifest


def ensure_shapes(out_url: str, n_train: int, n_eval: int, seed: int, image_size: int = 64) -> str:
    """Write the corpus unless ``out_url`` already holds one of the same seed and sizes; return ``out_url``.

    CorpusInUse when ``out_url`` holds anything but a shapes corpus (``write_shapes``).
    """
    found = check_owner(out_url, GENERATOR_VERSION).manifest
    if found is not None:
        wanted = {"train": n_train, "eval": n_eval}
        if (found.get("generator"), found.get("seed"), found.get("splits"), found.get("image_size")) == (
            GENERATOR_VERSION, seed, wanted, image_size
        ):
            return out_url
    write_shapes(out_url, n_train, n_eval, seed, image_size)
    return out_url
