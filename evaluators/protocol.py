"""The evaluation protocol: what an evaluation reads, what it keeps from each batch, and how it finishes.

An evaluation names the eval-set splits it reads (``Source``, by role: ``"test"``, and ``"train"`` for probes)
and how many samples it wants of each. ``evaluators.suite`` streams every split once, whoever reads it, and
shows each evaluation every batch of its splits as a ``Batch``; the evaluation keeps what it needs (features,
labels, a few tokens) and, after the last batch, ``finish`` turns what it kept into metrics and, optionally, an
overlay image. A ``Batch`` computes the image embeddings, tokens and pooled features at most once, for the first
evaluation that asks, so evaluations sharing a split share the forward passes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from PIL import Image
from torch import nn

from evaluators.features import device_of, image_tokens, kept, pooled, vision_tower
from evaluators.heads import DEFAULT_BUDGET, Budget
from trainer.config import Config
from trainer.data.eval_sets import EvalSet
from trainer.models.vit import VisionTransformer


@dataclass(frozen=True)
class SuiteOptions:
    """How much of each evaluation to run; the defaults keep the default suite to minutes on CPU."""

    batch_size: int = 64
    probe_train_samples: int = 2048
    k_shots: tuple[int, ...] = (1, 5, 10)
    grounding_samples: int = 256
    overlay_rows: int = 8
    progress_every: int = 10
    dense_samples: int = 512
    vqa_fusion: str = "cross-attention"
    head_budget: Budget = DEFAULT_BUDGET


DEFAULT_OPTIONS = SuiteOptions()


@dataclass(frozen=True)
class Source:
    """One split of one eval set: what the suite streams once for every evaluation reading it."""

    eval_set: EvalSet
    split: str

    def describe(self) -> str:
        return f"{self.eval_set.url} ({self.eval_set.format}) split '{self.split}'"


@dataclass(frozen=True)
class Context:
    """What every evaluation is built with: the model (in eval mode), its config and the suite's options."""

    model: nn.Module
    config: Config
    options: SuiteOptions
    has_text: bool  # a joint image-text space (not mae, m3ae)

    @property
    def device(self) -> torch.device:
        return device_of(self.model)

    @property
    def tower(self) -> VisionTransformer:
        return vision_tower(self.model)

    def unnormalise(self, images: torch.Tensor) -> torch.Tensor:
        """Eval-transformed images back to [0, 1] pixels, for overlays."""
        mean = torch.tensor(self.config.data.image_mean, device=images.device)[:, None, None]
        std = torch.tensor(self.config.data.image_std, device=images.device)[:, None, None]
        return images * std + mean


@dataclass
class Outcome:
    """What an evaluation finished with: metrics, an overlay to log, the tasks it skipped and why, and the
    (group, value) pairs it contributes to grouped means (VTAB-style linear-probe groups)."""

    metrics: dict[str, float] = field(default_factory=dict)
    overlay: Image.Image | None = None
    skipped: list[str] = field(default_factory=list)
    grouped: list[tuple[str, float]] = field(default_factory=list)

    def skip(self, evaluation: str, why: str) -> None:
        """Record a skipped task and say so on stderr, at once, in one line."""
        self.skipped.append(f"{evaluation}: {why}")
        print(f"[eval] {evaluation}: {why}", file=sys.stderr, flush=True)


def absent(key: str, labels: list[Any]) -> str | None:
    """Why a task cannot be scored on these labels (some image has no ``key`` label), or None when it can."""
    missing = sum(label is None for label in labels)
    if not missing:
        return None
    return f"no '{key}' labels" if missing == len(labels) else f"no '{key}' label on {missing} of {len(labels)} samples"


class Evaluation(Protocol):
    """One evaluation. ``name`` prefixes its stderr lines; ``needs_text`` ones are skipped for objectives
    without a text tower; ``reads`` maps each role to its split and its sample limit (None: all)."""

    name: str
    needs_text: bool

    def reads(self) -> dict[str, tuple[Source, int | None]]: ...

    def collect(self, role: str, batch: Batch) -> None: ...

    def finish(self) -> Outcome: ...


class Batch:
    """One eval batch and what the model makes of it, each computed once on first use.

    ``head(n)`` is the first ``n`` rows, sharing the computed values, for an evaluation that wants fewer samples
    than the split gives the others.
    """

    def __init__(self, context: Context, raw: dict[str, Any], parent: Batch | None = None) -> None:
        self.context = context
        self.keys: list[str] = raw["key"]
        self.captions: list[list[str]] = raw["captions"]
        self.metas: list[dict[str, Any]] = raw["meta"]
        self._pixels: torch.Tensor = raw["image"]
        self._parent = parent
        self._values: dict[Any, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def head(self, rows: int) -> Batch:
        raw = {"key": self.keys[:rows], "captions": self.captions[:rows], "meta": self.metas[:rows],
               "image": self._pixels[:rows]}
        return Batch(self.context, raw, parent=self)

    def labels(self, key: str) -> list[Any]:
        """Each image's ``key`` label, None where it has none."""
        return [meta.get("labels", {}).get(key) for meta in self.metas]

    def _value(self, name: Any, compute: Callable[[Batch], torch.Tensor]) -> torch.Tensor:
        if name not in self._values:
            # A head's rows are copied out of the whole batch's: a view kept across batches would keep it all.
            parent = self._parent
            self._values[name] = compute(self) if parent is None else parent._value(name, compute)[: len(self)].clone()
        return self._values[name]

    @property
    def images(self) -> torch.Tensor:
        """(B, 3, S, S) eval-transformed images on the model's device."""
        return self._value("images", lambda b: b._pixels.to(b.context.device))

    @property
    def tokens(self) -> torch.Tensor:
        """(B, 1 + L, D) image tokens after the tower's final LayerNorm, on the model's device."""
        return self._value("tokens", lambda b: image_tokens(b.context.model, b.images))

    def embeddings(self) -> torch.Tensor:
        """(B, E) unit image embeddings of the joint space, as owned float32 CPU copies."""
        return self._value("embeddings", lambda b: kept(b.context.model.encode_image(b.images)))

    def pooled(self, pool: str) -> torch.Tensor:
        """(B, D) ``pool`` feature of the image tower, before any projection, as owned float32 CPU copies."""
        return self._value(("pooled", pool), lambda b: kept(pooled(b.context.tower, b.tokens, pool)))


class DenseRows:
    """Every token (float16, on CPU) of a split's first ``limit`` images, and the first ``pictures`` of them as
    [0, 1] pixels for overlays: what the dense probes (VQA, segmentation) keep, bounded whatever the split's size."""

    def __init__(self, limit: int, pictures: int) -> None:
        self.limit, self.picture_limit = limit, pictures
        self.tokens: list[torch.Tensor] = []
        self.pictures: list[torch.Tensor] = []
        self.count = 0

    def take(self, batch: Batch) -> Batch | None:
        """Keep the batch's rows that fit under the limit; the view of those rows, or None when full."""
        if self.count >= self.limit:
            return None
        view = batch.head(self.limit - self.count)
        self.tokens.append(view.tokens.half().cpu())
        if self.count < self.picture_limit:
            shown = view.images[: self.picture_limit - self.count]
            self.pictures.append(view.context.unnormalise(shown).cpu())
        self.count += len(view)
        return view


class DenseProbe:
    """What the dense probes (VQA, segmentation) share: they read the corpus' train split (up to
    ``probe_train_samples``) and eval split, and keep the tokens of the first ``dense_samples`` images of each."""

    needs_text = False

    def __init__(self, context: Context, train: Source, test: Source) -> None:
        self.context, self.train, self.test = context, train, test
        options = context.options
        self.dense = {role: DenseRows(options.dense_samples, options.overlay_rows) for role in ("train", "test")}

    def reads(self) -> dict[str, tuple[Source, int | None]]:
        return {"train": (self.train, self.context.options.probe_train_samples), "test": (self.test, None)}
