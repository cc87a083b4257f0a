"""Segmentation probe: a linear (1×1) head on frozen patch tokens, scored by mIoU against the shapes masks.

Classes are background and the four shapes (``CLASSES``): a pixel's class is the shape of the object whose
label-map value it carries (``meta["mask_png"]``, 1 + object index). The head maps each patch token to class
logits on the patch grid; the logits are upsampled bilinearly to the mask's resolution and trained with per-pixel
cross-entropy (the linear protocol of DINOv2-style segmentation probes, here without multi-scale tricks).
Tokens are standardised with the training split's per-channel mean and std, so one learning rate suits any
tower; the tower's pooling plays no part, so every objective of the family gets the same probe.

mIoU is the mean over classes of intersection / union, accumulated over the whole split (a confusion matrix),
over the classes that occur in the truth or the predictions. The majority baseline predicts the most frequent
training class (background) at every pixel. ``SegmentationProbe`` fits on the first ``dense_samples`` images of
the shapes corpus' train split that have a label map and scores the first ``dense_samples`` of its eval split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from evaluators.heads import DEFAULT_BUDGET, Budget, seeded, train_head
from evaluators.protocol import Batch, Context, DenseProbe, Outcome, Source
from trainer.data.shapes import COLORS, SHAPES, decode_mask

CLASSES = ("background", *SHAPES)
# Overlay colours per class: background grey, then one per shape.
PALETTE = np.array([(90, 90, 90), COLORS["red"], COLORS["green"], COLORS["blue"], COLORS["yellow"]], np.uint8)


def class_mask(meta: dict[str, Any], image_size: int) -> torch.Tensor | None:
    """(S, S) uint8 class indices of ``CLASSES`` in the eval transform's geometry; None without a label map.

    Resize-shorter-side (nearest) then centre-crop, like ``eval_transform`` treats the image.
    """
    if "mask_png" not in meta or not meta.get("objects"):
        return None
    lookup = np.zeros(256, np.uint8)
    for number, obj in enumerate(meta["objects"], start=1):
        lookup[number] = CLASSES.index(obj["shape"])
    classes = torch.from_numpy(lookup[np.array(decode_mask(meta))])
    resized = TF.resize(classes[None], image_size, interpolation=v2.InterpolationMode.NEAREST)
    return TF.center_crop(resized, image_size)[0]


def _grid(patches: torch.Tensor) -> tuple[int, int]:
    side = round(patches.shape[1] ** 0.5)
    if side * side != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patch tokens do not form a square grid")
    return side, side


class LinearSegHead(nn.Module):
    """Standardise each patch token, then one linear map to class logits: (B, L, D) → (B, C, g, g)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(mean.shape[0], classes)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        logits = self.linear((patches.float() - self.mean) / self.std)
        return logits.transpose(1, 2).reshape(len(patches), -1, *_grid(patches))


def upsampled_logits(head: LinearSegHead, patches: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(head(patches), size=size, mode="bilinear", align_corners=False)


def fit_segmentation(patches: torch.Tensor, masks: torch.Tensor, budget: Budget = DEFAULT_BUDGET,
                     progress_every: int = 100) -> LinearSegHead:
    """Train the 1×1 head on (N, L, D) patch tokens and (N, S, S) class masks for the budget (seeded)."""
    flat = patches.float().flatten(0, 1)
    mean, std = flat.mean(dim=0), flat.std(dim=0, unbiased=False).clamp(min=1e-6)
    head = seeded(lambda: LinearSegHead(mean, std, len(CLASSES)), budget.seed)
    size = tuple(masks.shape[-2:])

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(upsampled_logits(head, patches[rows], size), masks[rows].long())

    return train_head(head, len(patches), loss_of, budget, "segmentation probe", progress_every)


@torch.no_grad()
def predict(head: LinearSegHead, patches: torch.Tensor, size: tuple[int, int], chunk: int = 256) -> torch.Tensor:
    """(N, S, S) predicted class of every pixel, computed ``chunk`` images at a time."""
    return torch.cat([upsampled_logits(head, patches[i:i + chunk], size).argmax(dim=1).to(torch.uint8)
                      for i in range(0, len(patches), chunk)])


def confusion(predicted: torch.Tensor, truth: torch.Tensor, classes: int = len(CLASSES)) -> torch.Tensor:
    """(C, C) pixel counts, rows = true class, columns = predicted class."""
    pairs = truth.long().flatten() * classes + predicted.long().flatten()
    return torch.bincount(pairs, minlength=classes * classes).reshape(classes, classes)


def class_iou(matrix: torch.Tensor) -> torch.Tensor:
    """(C,) IoU per class from a confusion matrix; NaN for a class absent from truth and predictions."""
    hits = matrix.diag().double()
    union = matrix.sum(dim=0).double() + matrix.sum(dim=1).double() - hits
    return torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, float("nan")))


def mean_iou(matrix: torch.Tensor) -> float:
    return class_iou(matrix).nanmean().item()


def score_segmentation(predicted: torch.Tensor, truth: torch.Tensor, train_masks: torch.Tensor
                       ) -> dict[str, float]:
    """``eval/seg/{miou,pixel_accuracy,majority_miou,majority_pixel_accuracy}`` and ``eval/seg/iou/<class>``.

    A class absent from both truth and predictions has no IoU and is left out of the mean and the names.
    """
    matrix = confusion(predicted, truth)
    majority = int(torch.bincount(train_masks.long().flatten(), minlength=len(CLASSES)).argmax())
    baseline = confusion(torch.full_like(truth, majority), truth)
    metrics = {"eval/seg/miou": mean_iou(matrix),
               "eval/seg/pixel_accuracy": (matrix.diag().sum() / matrix.sum()).item(),
               "eval/seg/majority_miou": mean_iou(baseline),
               "eval/seg/majority_pixel_accuracy": (baseline.diag().sum() / baseline.sum()).item()}
    for name, value in zip(CLASSES, class_iou(matrix).tolist(), strict=True):
        if not np.isnan(value):
            metrics[f"eval/seg/iou/{name}"] = value
    return metrics


def evaluate_segmentation(train_patches: torch.Tensor, train_masks: torch.Tensor, test_patches: torch.Tensor,
                          test_masks: torch.Tensor, budget: Budget = DEFAULT_BUDGET, progress_every: int = 100
                          ) -> tuple[dict[str, float], torch.Tensor]:
    """(metrics, predicted test masks): fit on the train split, score on the test split beside the baseline."""
    head = fit_segmentation(train_patches, train_masks, budget, progress_every)
    predicted = predict(head, test_patches, tuple(test_masks.shape[-2:]))
    return score_segmentation(predicted, test_masks, train_masks), predicted


def overlay_grid(images: torch.Tensor, truth: torch.Tensor, predicted: torch.Tensor,
                 titles: Sequence[str] = ("image", "truth", "predicted")) -> Image.Image:
    """One row per image: the image, the true classes and the predicted classes blended over it (PNG-ready).

    ``images`` are (B, 3, S, S) in [0, 1]; masks (B, S, S) hold class indices.
    """
    size = images.shape[-1]
    grid = Image.new("RGB", (3 * size, 12 + len(images) * size), "white")
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(titles):
        draw.text((column * size + 1, 0), title, fill="black")
    for row in range(len(images)):
        picture = images[row].permute(1, 2, 0).clamp(0, 1).numpy()
        for column, classes in enumerate((None, truth[row], predicted[row])):
            shown = picture if classes is None else 0.4 * picture + 0.6 * PALETTE[classes.long().numpy()] / 255
            grid.paste(Image.fromarray((shown * 255).astype(np.uint8)), (column * size, 12 + row * size))
    return grid


class SegmentationProbe(DenseProbe):
    """``eval/seg/...`` (mIoU beside the majority baseline) and an overlay of the first eval images."""

    name = "seg"

    def __init__(self, context: Context, train: Source, test: Source) -> None:
        super().__init__(context, train, test)
        self.masks: dict[str, list[torch.Tensor | None]] = {"train": [], "test": []}

    def collect(self, role: str, batch: Batch) -> None:
        view = self.dense[role].take(batch)
        if view is not None:
            self.masks[role] += [class_mask(m, self.context.config.model.image_size) for m in view.metas]

    def _with_masks(self, role: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [i for i, mask in enumerate(self.masks[role]) if mask is not None]
        if not rows:
            return torch.empty(0), torch.empty(0)
        patches = torch.cat(self.dense[role].tokens)[rows, 1:]
        return patches, torch.stack([self.masks[role][i] for i in rows])

    def finish(self) -> Outcome:
        outcome = Outcome()
        train_patches, train_masks = self._with_masks("train")
        test_patches, test_masks = self._with_masks("test")
        if not len(train_masks) or not len(test_masks):
            outcome.skip(self.name, "skipping: the corpus has no object masks")
            return outcome
        options = self.context.options
        outcome.metrics, predicted = evaluate_segmentation(train_patches, train_masks, test_patches, test_masks,
                                                           options.head_budget, options.progress_every * 10)
        shown = [i for i, mask in enumerate(self.masks["test"][: options.overlay_rows]) if mask is not None]
        pictures = torch.cat(self.dense["test"].pictures)
        outcome.overlay = overlay_grid(pictures[shown], test_masks[: len(shown)], predicted[: len(shown)])
        return outcome
