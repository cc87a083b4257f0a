"""Question/answer pairs generated from a shapes scene's meta, for the VQA probe.

Four question types, at most one of each per image, so accuracy can be reported by type:
- ``color``: "what color is the triangle?" for a shape that occurs once in the scene → its colour;
- ``count``: "how many shapes are there?" → "one" / "two" / "three";
- ``relation``: "where is the red circle relative to the blue star?" for two objects each unique in the scene →
  "left of" / "right of" / "above" / "below" (the generator's own ``relation``: the axis on which the centres
  are further apart);
- ``exists``: "is there a green square?" → "yes" / "no", each about half the time.

Which object a question names is drawn from a ``random.Random`` seeded by (seed, sample key), so the questions of
an image are the same in every run and independent of batching. Words are the generator's class names, so a
CLIP text tower trained on the captions has seen every content word.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from trainer.data.shapes import COLORS, COUNT_WORDS, SHAPES, SceneObject, relation

QUESTION_TYPES = ("color", "count", "relation", "exists")


@dataclass(frozen=True)
class Question:
    """One question about one image: its type, text and the single correct answer."""

    qtype: str
    text: str
    answer: str


def _objects(meta: dict[str, Any]) -> list[SceneObject]:
    return [SceneObject(o["shape"], o["color"], tuple(o["bbox"])) for o in meta["objects"]]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def scene_questions(meta: dict[str, Any], key: str, seed: int = 0) -> list[Question]:
    """The questions of one scene (type order of ``QUESTION_TYPES``); none when the meta has no objects."""
    objects = _objects(meta) if meta.get("objects") else []
    if not objects:
        return []
    rng = random.Random(f"vqa/{seed}/{key}")
    shape_counts = Counter(o.shape for o in objects)
    kind_counts = Counter((o.color, o.shape) for o in objects)
    questions = []
    single = [o for o in objects if shape_counts[o.shape] == 1]
    if single:
        named = rng.choice(single)
        questions.append(Question("color", f"what color is the {named.shape}?", named.color))
    questions.append(Question("count", "how many shapes are there?", COUNT_WORDS[len(objects)]))
    unique = [o for o in objects if kind_counts[(o.color, o.shape)] == 1]
    if len(unique) >= 2:
        first, second = rng.sample(unique, 2)
        text = f"where is the {first.color} {first.shape} relative to the {second.color} {second.shape}?"
        questions.append(Question("relation", text, relation(first, second)))
    if rng.random() < 0.5:
        named = rng.choice(objects)
        color, shape, answer = named.color, named.shape, "yes"
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in kind_counts]
        (color, shape), answer = rng.choice(absent), "no"
    questions.append(Question("exists", f"is there {_article(color)} {color} {shape}?", answer))
    return questions
