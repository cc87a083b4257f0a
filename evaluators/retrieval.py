"""Image↔text retrieval: recall@K in both directions, as CLIP and clip_benchmark report it.

Image→text: an image is a hit at K when any of its captions is among the K texts most similar to it.
Text→image: a caption is a hit at K when its image is among the K images most similar to it. Ties count
against the model: an item's rank is the number of candidates scoring at least as high as it, minus itself,
so a constant similarity never scores. Similarities are computed in row blocks, so memory stays bounded by
``block × N`` however large the eval set. ``Retrieval`` scores one split: every image with its captions (COCO
and Flickr30k have five; an MDS corpus, one); images without a caption are left out, with a line saying so.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from evaluators.features import kept
from evaluators.protocol import Batch, Context, Outcome, Source
from trainer.data.tokenizer import tokenize


def _true_ranks(similarity: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Per row, the 0-based rank of its best correct column: how many wrong columns score ≥ it."""
    best = similarity.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)
    return ((similarity >= best) & ~correct).sum(dim=1)


def recall_at_k(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    block: int = 1024,
) -> dict[str, float]:
    """``image_to_text_R<k>`` and ``text_to_image_R<k>`` (MLflow names allow no "@") for each k.

    ``image_features`` (N, E) and ``text_features`` (M, E) are scored by dot product (pass unit vectors for
    cosine); ``text_to_image`` (M,) names the image each caption describes, so an image may have several
    captions (COCO has five).
    """
    images, texts = image_features.float(), text_features.float()
    owner = text_to_image.long()
    image_ranks, text_ranks = [], []
    for start in range(0, images.shape[0], block):
        rows = torch.arange(start, min(start + block, images.shape[0]))
        correct = owner[None, :] == rows[:, None]
        if not correct.any(dim=1).all():
            raise ValueError("every image needs at least one caption for image→text retrieval")
        image_ranks.append(_true_ranks(images[rows] @ texts.T, correct))
    for start in range(0, texts.shape[0], block):
        rows = torch.arange(start, min(start + block, texts.shape[0]))
        correct = torch.zeros(len(rows), images.shape[0], dtype=torch.bool)
        correct[torch.arange(len(rows)), owner[rows]] = True
        text_ranks.append(_true_ranks(texts[rows] @ images.T, correct))
    by_image, by_text = torch.cat(image_ranks), torch.cat(text_ranks)
    metrics = {}
    for k in ks:
        metrics[f"image_to_text_R{k}"] = (by_image < k).float().mean().item()
        metrics[f"text_to_image_R{k}"] = (by_text < k).float().mean().item()
    return metrics


class Retrieval:
    """``eval/retrieval/<task>/{image_to_text,text_to_image}_R{1,5,10}`` on one split."""

    name = "retrieval"
    needs_text = True

    def __init__(self, context: Context, source: Source, task: str) -> None:
        self.context, self.source, self.task = context, source, task
        self.images: list[torch.Tensor] = []
        self.texts: list[torch.Tensor] = []
        self.owner: list[int] = []
        self.uncaptioned = 0

    def reads(self) -> dict[str, tuple[Source, int | None]]:
        return {"test": (self.source, None)}

    def collect(self, role: str, batch: Batch) -> None:
        rows = [i for i, captions in enumerate(batch.captions) if captions]
        self.uncaptioned += len(batch) - len(rows)
        if not rows:
            return
        first = sum(len(part) for part in self.images)
        self.images.append(batch.embeddings()[rows])
        captions = [caption for i in rows for caption in batch.captions[i]]
        self.owner += [first + n for n, i in enumerate(rows) for _ in batch.captions[i]]
        ids = tokenize(captions, self.context.config.model.context_length).to(self.context.device)
        self.texts.append(kept(self.context.model.encode_text(ids)))

    def finish(self) -> Outcome:
        outcome = Outcome()
        if not self.images:
            outcome.skip(self.name, f"skipping {self.task}: the {self.source.split} split has no captions")
            return outcome
        if self.uncaptioned:
            print(f"[eval] retrieval: {self.task}: {self.uncaptioned} images without a caption left out",
                  file=sys.stderr, flush=True)
        scores = recall_at_k(torch.cat(self.images), torch.cat(self.texts), torch.tensor(self.owner))
        outcome.metrics = {f"eval/retrieval/{self.task}/{name}": value for name, value in scores.items()}
        return outcome
