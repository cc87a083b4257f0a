"""VQA probe: a small fusion head on a frozen image tower (and frozen text tower), scored by answer accuracy.

The head answers by classifying over the answers seen in training (the usual VQA-as-classification setup). Two
fusions, by switch:
- ``cross-attention``: the question vector queries the image tokens (CLS and every patch, LayerNorm'd) with
  multi-head attention; the attended vector and the question go through a two-layer MLP.
- ``pooled-mlp``: the baseline without spatial access, the same MLP on the tower's pooled feature and the question.

Questions are encoded by the model's frozen text tower (``encode_text``). Objectives without one (mae, m3ae)
get a learned bag-of-words question embedding instead (mean of word embeddings over a vocabulary built from the
training questions), trained with the head: the image tower stays frozen either way, so their VQA numbers still
measure what the image tokens hold, and the suite says on stderr which encoder was used.

Scoring: the shapes questions have one correct answer (exact match); VQAv2's have ten human answers and the
standard soft accuracy min(#humans who gave the answer / 3, 1) (Antol et al. 2015; the official script also
averages over the ten leave-one-out subsets of annotators, which we do not). Answers are compared after
``normalize_answer`` (lower case, surrounding space and a final full stop removed). Beside each type's
accuracy we report the majority baseline: the most frequent training answer of that type, always given.
``VqaProbe`` asks the generated questions (``evaluators.questions``) about the first ``dense_samples`` images of
the shapes corpus' train and eval splits.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from evaluators.features import kept, pooled
from evaluators.heads import DEFAULT_BUDGET, Budget, seeded, train_head
from evaluators.protocol import Batch, Context, DenseProbe, Outcome, Source
from evaluators.questions import Question, scene_questions
from trainer.data.tokenizer import tokenize

FUSIONS = ("cross-attention", "pooled-mlp")
PAD, UNKNOWN = 0, 1


@dataclass
class VqaSet:
    """Questions about a set of images.

    ``images`` holds one frozen feature per image: tokens (N, T, D) for cross-attention, pooled (N, D) for the
    MLP. ``image`` maps each question to its row; ``embeddings`` (Q, E) are the frozen text tower's question
    vectors, or None for the bag-of-words fallback. ``answers`` are the human answers (one for shapes);
    ``soft`` selects VQAv2's soft accuracy over exact match.
    """

    images: torch.Tensor
    image: torch.Tensor
    texts: list[str]
    answers: list[tuple[str, ...]]
    qtypes: list[str]
    embeddings: torch.Tensor | None = None
    soft: bool = False


def normalize_answer(answer: str) -> str:
    return re.sub(r"\s+", " ", answer.strip().lower()).rstrip(".").strip()


def soft_accuracy(predicted: str, humans: Sequence[str]) -> float:
    """VQAv2's accuracy of one answer: min(#humans who gave it / 3, 1)."""
    wanted = normalize_answer(predicted)
    return min(sum(normalize_answer(h) == wanted for h in humans) / 3, 1.0)


def answer_score(predicted: str, answers: Sequence[str], soft: bool) -> float:
    if soft:
        return soft_accuracy(predicted, answers)
    return float(normalize_answer(predicted) == normalize_answer(answers[0]))


def target_answer(answers: Sequence[str]) -> str:
    """The training target of a question: its most frequent human answer (ties: alphabetically first)."""
    counts = Counter(normalize_answer(a) for a in answers)
    return min(counts, key=lambda a: (-counts[a], a))


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def build_vocabulary(texts: Sequence[str]) -> dict[str, int]:
    """Word ids of the training questions; 0 pads, 1 is every word unseen in training."""
    return {w: i for i, w in enumerate(sorted({w for t in texts for w in words(t)}), start=2)}


def word_ids(texts: Sequence[str], vocabulary: dict[str, int]) -> torch.Tensor:
    """(Q, longest question) word ids, right-padded with ``PAD``."""
    rows = [[vocabulary.get(w, UNKNOWN) for w in words(t)] or [UNKNOWN] for t in texts]
    ids = torch.full((len(rows), max(len(r) for r in rows)), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    return ids


class FusionHead(nn.Module):
    """Question + frozen image feature → answer logits (see the module docstring for the two fusions)."""

    def __init__(self, image_width: int, question_width: int, answers: int, fusion: str, vocabulary: int = 0,
                 hidden: int = 256, heads: int = 4) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown VQA fusion '{fusion}' (fusions: {', '.join(FUSIONS)})")
        self.fusion = fusion
        if vocabulary:
            self.question: nn.Module = nn.EmbeddingBag(vocabulary, hidden, mode="mean", padding_idx=PAD)
        else:
            self.question = nn.Sequential(nn.LayerNorm(question_width), nn.Linear(question_width, hidden))
        self.image_norm = nn.LayerNorm(image_width)
        if fusion == "cross-attention":
            self.attend = nn.MultiheadAttention(hidden, heads, kdim=image_width, vdim=image_width, batch_first=True)
        else:
            self.image_proj = nn.Linear(image_width, hidden)
        self.classify = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, answers))

    def forward(self, images: torch.Tensor, questions: torch.Tensor) -> torch.Tensor:
        q = self.question(questions)
        images = self.image_norm(images.float())
        if self.fusion == "cross-attention":
            seen = self.attend(q[:, None], images, images, need_weights=False)[0][:, 0]
        else:
            seen = self.image_proj(images)
        return self.classify(torch.cat([seen, q], dim=-1))


@dataclass(frozen=True)
class FittedVqa:
    """A trained head with its answer list and, for bag-of-words questions, its vocabulary."""

    head: FusionHead
    answers: list[str]
    vocabulary: dict[str, int] | None

    def questions(self, data: VqaSet) -> torch.Tensor:
        if self.vocabulary is None:
            if data.embeddings is None:
                raise ValueError("the probe was fitted on text-tower embeddings; this set has none")
            return data.embeddings.float()
        return word_ids(data.texts, self.vocabulary)

    @torch.no_grad()
    def predict(self, data: VqaSet, chunk: int = 512) -> list[str]:
        questions = self.questions(data)
        found = []
        for start in range(0, len(data.texts), chunk):
            rows = slice(start, start + chunk)
            logits = self.head(data.images[data.image[rows]], questions[rows])
            found.extend(self.answers[i] for i in logits.argmax(dim=1).tolist())
        return found


def fit_vqa(train: VqaSet, fusion: str, budget: Budget = DEFAULT_BUDGET, progress_every: int = 100) -> FittedVqa:
    """Train the fusion head on ``train`` for the budget (seeded: the same set gives the same head)."""
    targets = [target_answer(a) for a in train.answers]
    answers = sorted(set(targets))
    index = {a: i for i, a in enumerate(answers)}
    y = torch.tensor([index[t] for t in targets])
    vocabulary = build_vocabulary(train.texts) if train.embeddings is None else None
    width = train.embeddings.shape[1] if train.embeddings is not None else 0
    head = seeded(lambda: FusionHead(train.images.shape[-1], width, len(answers), fusion,
                                     vocabulary=len(vocabulary) + 2 if vocabulary is not None else 0),
                  budget.seed)
    fitted = FittedVqa(head, answers, vocabulary)
    questions = fitted.questions(train)

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(train.images[train.image[rows]], questions[rows]), y[rows])

    train_head(head, len(targets), loss_of, budget, f"vqa probe ({fusion})", progress_every)
    return fitted


def majority_answers(data: VqaSet) -> dict[str, str]:
    """The most frequent training target of each question type (ties: alphabetically first)."""
    by_type: dict[str, list[str]] = {}
    for qtype, answers in zip(data.qtypes, data.answers, strict=True):
        by_type.setdefault(qtype, []).append(target_answer(answers))
    return {t: target_answer(found) for t, found in by_type.items()}


def _safe(name: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", name.lower())


def score_vqa(test: VqaSet, predicted: Sequence[str], majority: dict[str, str]) -> dict[str, float]:
    """``eval/vqa/<type>/{accuracy,majority}`` and the same over all questions (``eval/vqa/{accuracy,majority}``).

    A type never seen in training has no majority answer: its baseline scores 0.
    """
    scores: dict[str, list[tuple[float, float]]] = {}
    for qtype, answers, guess in zip(test.qtypes, test.answers, predicted, strict=True):
        baseline = answer_score(majority[qtype], answers, test.soft) if qtype in majority else 0.0
        scores.setdefault(qtype, []).append((answer_score(guess, answers, test.soft), baseline))
    metrics = {}
    everything = [pair for pairs in scores.values() for pair in pairs]
    for name, pairs in [*sorted(scores.items()), ("", everything)]:
        prefix = f"eval/vqa/{_safe(name)}/" if name else "eval/vqa/"
        metrics[f"{prefix}accuracy"] = sum(p[0] for p in pairs) / len(pairs)
        metrics[f"{prefix}majority"] = sum(p[1] for p in pairs) / len(pairs)
    return metrics


def evaluate_vqa(train: VqaSet, test: VqaSet, fusion: str, budget: Budget = DEFAULT_BUDGET,
                 progress_every: int = 100) -> tuple[dict[str, float], list[str]]:
    """(metrics, predictions on ``test``): fit on ``train``, score on ``test`` beside the majority baseline."""
    fitted = fit_vqa(train, fusion, budget, progress_every)
    predicted = fitted.predict(test)
    return score_vqa(test, predicted, majority_answers(train)), predicted


def shapes_questions(keys: Sequence[str], metas: Sequence[dict], first_row: int, seed: int = 0
                     ) -> tuple[list[Question], list[int]]:
    """The generated questions of a batch of shapes samples and, for each, its image's row (from ``first_row``)."""
    questions, rows = [], []
    for offset, (key, meta) in enumerate(zip(keys, metas, strict=True)):
        for question in scene_questions(meta, key, seed):
            questions.append(question)
            rows.append(first_row + offset)
    return questions, rows


@dataclass(frozen=True)
class VqaItem:
    """One VQAv2 question: its image file, text, the ten human answers and the answer type."""

    image_path: Path
    question: str
    answers: tuple[str, ...]
    answer_type: str


def load_vqav2(questions_json: Path, annotations_json: Path, image_dir: Path) -> list[VqaItem]:
    """Read VQAv2-format annotations; images are found in ``image_dir`` by the image id ending their file name
    (COCO's ``COCO_val2014_000000000042.jpg`` or plainly ``42.jpg``). A question without an image is an error."""
    images = {}
    for path in sorted(image_dir.iterdir()):
        digits = re.search(r"(\d+)$", path.stem)
        if digits and path.is_file():
            images[int(digits.group(1))] = path
    questions = {q["question_id"]: q for q in json.loads(Path(questions_json).read_text())["questions"]}
    items = []
    for note in json.loads(Path(annotations_json).read_text())["annotations"]:
        question = questions[note["question_id"]]
        if note["image_id"] not in images:
            raise FileNotFoundError(f"no image for image_id {note['image_id']} in {image_dir}")
        items.append(VqaItem(images[note["image_id"]], question["question"],
                             tuple(a["answer"] for a in note["answers"]), note.get("answer_type", "all")))
    return items


def _palette_text(draw: ImageDraw.ImageDraw, at: tuple[int, int], text: str, right: bool) -> None:
    draw.text(at, text, fill=(0, 110, 0) if right else (190, 0, 0))


def overlay_grid(images: torch.Tensor, rows: Sequence[Sequence[tuple[Question, str]]]) -> Image.Image:
    """One row per image: the image, then its questions with the predicted answer (green right, red wrong)
    and the truth. ``images`` are (B, 3, S, S) in [0, 1]."""
    size, line = images.shape[-1], 11
    height = max(size, line * max((len(r) for r in rows), default=1))
    grid = Image.new("RGB", (size + 420, len(images) * (height + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for row, asked in enumerate(rows):
        top = row * (height + 4)
        picture = (images[row].permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)
        grid.paste(Image.fromarray(picture), (0, top))
        for n, (question, guess) in enumerate(asked):
            right = normalize_answer(guess) == normalize_answer(question.answer)
            _palette_text(draw, (size + 4, top + n * line), f"{question.text} {guess} ({question.answer})", right)
    return grid


class VqaProbe(DenseProbe):
    """``eval/vqa/...`` (accuracy and majority baseline per question type) and an overlay of the first eval
    images' questions with the head's answers."""

    name = "vqa"

    def __init__(self, context: Context, train: Source, test: Source) -> None:
        super().__init__(context, train, test)
        self.questions: dict[str, list[Question]] = {"train": [], "test": []}
        self.image: dict[str, list[int]] = {"train": [], "test": []}
        self.embeddings: dict[str, list[torch.Tensor]] = {"train": [], "test": []}

    def collect(self, role: str, batch: Batch) -> None:
        first = self.dense[role].count
        view = self.dense[role].take(batch)
        if view is None:
            return
        questions, rows = shapes_questions(view.keys, view.metas, first, self.context.options.head_budget.seed)
        self.questions[role] += questions
        self.image[role] += rows
        if self.context.has_text and questions:
            ids = tokenize([q.text for q in questions], self.context.config.model.context_length)
            self.embeddings[role].append(kept(self.context.model.encode_text(ids.to(self.context.device))))

    def _set(self, role: str) -> VqaSet:
        tokens = torch.cat(self.dense[role].tokens)
        if self.context.options.vqa_fusion == "pooled-mlp":
            tower = self.context.tower
            tokens = torch.cat([pooled(tower, part.float().to(self.context.device), tower.pool).cpu()
                                for part in tokens.split(256)])
        questions, embeddings = self.questions[role], self.embeddings[role]
        return VqaSet(tokens, torch.tensor(self.image[role]), [q.text for q in questions],
                      [(q.answer,) for q in questions], [q.qtype for q in questions],
                      torch.cat(embeddings) if embeddings else None)

    def finish(self) -> Outcome:
        outcome = Outcome()
        if not self.questions["test"] or not self.questions["train"]:
            outcome.skip(self.name, "skipping: the corpus has no scene objects to ask about")
            return outcome
        if not self.context.has_text:
            print("[eval] vqa: no text tower: questions are encoded by a learned bag of words", file=sys.stderr,
                  flush=True)
        options = self.context.options
        outcome.metrics, predicted = evaluate_vqa(self._set("train"), self._set("test"), options.vqa_fusion,
                                                  options.head_budget, options.progress_every * 10)
        pictures = torch.cat(self.dense["test"].pictures)
        rows: list[list[tuple[Question, str]]] = [[] for _ in range(len(pictures))]
        for question, image, guess in zip(self.questions["test"], self.image["test"], predicted, strict=True):
            if image < len(rows):
                rows[image].append((question, guess))
        outcome.overlay = overlay_grid(pictures, rows)
        return outcome
